"""Test helper: adapters with non-zero weights, so that merging them changes the model."""
import torch


def randomize_adapters(module, scale: float = 0.05, seed: int = 0, names=("lora", "cross_attn")) -> None:
    """Adapters start as the identity update (up = 0): draw every parameter whose name contains one of
    `names` from N(0, scale^2), in named_parameters() order, from a generator seeded with `seed`."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(n in name for n in names):
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
