"""The MambaXray-VL encoder: upstream key layout, parameter counts, direction orders, the fused scan."""
import math

import pytest
import torch
import torch.nn.functional as F

from emrrg.config import ENCODER_PRESETS, encoder_config
from emrrg.encoder import MambaXrayEncoder
from emrrg.ops.directions import column_order
from emrrg.ops.selective_scan import selective_scan_ref

# Fused (one G=4 call + gathers) vs four separate calls on flipped / transposed copies: the same f32
# arithmetic in a different order (concatenated channels, index_select vs flip), so f32 rounding only.
RTOL_FUSED, ATOL_FUSED = 1e-5, 1e-5


def upstream_keys(D: int, depth: int, N: int = 16, img: int = 224, patch: int = 16) -> dict[str, tuple]:
    """The upstream `visual_encoder.*` key -> shape table, written out by hand from the upstream release (emrrg/encoder.py lists the keys)."""
    r, H, L = math.ceil(D / 16), D * 4 * 2 // 3, (img // patch) ** 2 + 1
    keys = {"patch_embed.proj.weight": (D, 3, patch, patch), "patch_embed.proj.bias": (D,),
            "cls_token": (1, 1, D), "pos_embed": (1, L, D), "norm_f.weight": (D,), "norm_f.bias": (D,)}
    for i in range(depth):
        p = f"layers.{i}."
        keys.update({p + "norm1.weight": (D,), p + "norm1.bias": (D,), p + "norm2.weight": (D,), p + "norm2.bias": (D,),
                     p + "mlp.w1.weight": (H, D), p + "mlp.w1.bias": (H,), p + "mlp.w2.weight": (H, D),
                     p + "mlp.w2.bias": (H,), p + "mlp.w3.weight": (D, H), p + "mlp.w3.bias": (D,),
                     p + "mixer.in_proj.weight": (2 * D, D), p + "mixer.out_proj.weight": (D, D)})
        for s in ("", "_b", "_c", "_c_b"):
            m = p + "mixer."
            keys.update({m + f"A{s}_log": (D, N), m + f"D{s}": (D,), m + f"conv1d{s}.weight": (D, 1, 4),
                         m + f"conv1d{s}.bias": (D,), m + f"x_proj{s}.weight": (r + 2 * N, D),
                         m + f"dt_proj{s}.weight": (D, r), m + f"dt_proj{s}.bias": (D,)})
    return keys


def test_base_parameter_count():
    n = sum(p.numel() for p in MambaXrayEncoder(encoder_config("base")).parameters())
    print(f"base encoder: {n / 1e6:.4f}M parameters")
    assert abs(n - 84.26e6) <= 0.05e6


@pytest.mark.parametrize("preset,D,depth", [("tiny", 32, 2), ("base", 768, 12)])
def test_state_dict_is_upstream_layout(preset, D, depth):
    cfg = encoder_config(preset)
    enc = MambaXrayEncoder(cfg)
    want = upstream_keys(D, depth, img=cfg.img_size, patch=cfg.patch_size)
    got = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert got == want
    # And a state dict in that layout loads strictly into a fresh model.
    fresh = MambaXrayEncoder(cfg)
    fresh.load_state_dict({k: torch.randn(s) for k, s in want.items()}, strict=True)


def test_large_shape():
    cfg = encoder_config("large")
    assert (cfg.d_model, cfg.depth, cfg.mlp_hidden, cfg.dt_rank) == (1024, 24, 2730, 64)


def test_column_order():
    order = column_order(197)
    assert order[98] == 98                                         # cls stays in the middle
    assert torch.equal(order[order], torch.arange(197))            # transposing twice is the identity
    # Without the cls token, the order reads the 14x14 grid column by column.
    patches = torch.cat([torch.arange(98), torch.arange(99, 197)])
    grid = patches.view(14, 14)
    no_cls = torch.cat([order[:98], order[99:]])
    assert torch.equal(no_cls, grid.t().reshape(-1))


def naive_mixer(mixer, hs):
    """Four separate scans on explicitly flipped / transposed copies, combined as the paper writes it."""
    cfg = mixer.cfg
    b, L, _ = hs.shape
    n, r = cfg.d_state, cfg.dt_rank
    x, z = mixer.in_proj(hs).chunk(2, dim=-1)
    g = math.isqrt(L - 1)

    def transpose(t):  # (b, L, D): cls out at L//2, transpose the grid, cls back at L//2
        cls = t[:, L // 2:L // 2 + 1]
        p = torch.cat([t[:, :L // 2], t[:, L // 2 + 1:]], 1)
        p = p.view(b, g, g, -1).transpose(1, 2).reshape(b, g * g, -1)
        return torch.cat([p[:, :L // 2], cls, p[:, L // 2:]], 1)

    def one(xs, zs, s):
        xs = xs.transpose(1, 2)
        xs = F.silu(F.conv1d(xs, getattr(mixer, f"conv1d{s}").weight, getattr(mixer, f"conv1d{s}").bias,
                             padding=cfg.d_conv - 1, groups=xs.shape[1])[..., :L])
        dt, B, C = getattr(mixer, f"x_proj{s}")(xs.transpose(1, 2)).split([r, n, n], -1)
        dt = dt @ getattr(mixer, f"dt_proj{s}").weight.t()
        y = selective_scan_ref(xs, dt.transpose(1, 2), -torch.exp(getattr(mixer, f"A{s}_log")),
                               B.transpose(1, 2)[:, None], C.transpose(1, 2)[:, None], getattr(mixer, f"D{s}"),
                               zs.transpose(1, 2), getattr(mixer, f"dt_proj{s}").bias)
        return y.transpose(1, 2)  # (b, L, D)

    a = one(x, z, "")
    bb = one(x.flip(1), z.flip(1), "_b")
    c = one(transpose(x), transpose(z), "_c")
    d = one(transpose(x).flip(1), transpose(z).flip(1), "_c_b")
    return mixer.out_proj(((a + bb.flip(1)) + transpose(c + d.flip(1))) / 4)


@pytest.mark.parametrize("preset", ["tiny", "base"])
def test_fused_mixer_matches_four_separate_scans(preset):
    torch.manual_seed(0)
    cfg = encoder_config(preset, depth=1, d_model=32)  # base geometry (197 tokens) with a small width
    mixer = MambaXrayEncoder(cfg).layers[0].mixer
    for p in mixer.parameters():  # de-symmetrise the four directions
        p.data.add_(torch.randn_like(p) * 0.05)
    hs = torch.randn(2, cfg.num_tokens, cfg.d_model)
    with torch.no_grad():
        fused, naive = mixer(hs), naive_mixer(mixer, hs)
    diff = (fused - naive).abs()
    print(f"{preset}: fused vs separate max {diff.max():.3e} mean {diff.mean():.3e}")
    torch.testing.assert_close(fused, naive, rtol=RTOL_FUSED, atol=ATOL_FUSED)


def test_cls_in_middle_and_multiview_average():
    torch.manual_seed(0)
    enc = MambaXrayEncoder(encoder_config("tiny")).eval()
    views = torch.randn(1, 2, 3, 64, 64)
    with torch.no_grad():
        avg = enc.encode_study(views)
        sep = (enc(views[:, 0]) + enc(views[:, 1])) / 2
        assert avg.shape == (1, 17, 32)
        torch.testing.assert_close(avg, sep, rtol=1e-6, atol=1e-6)
        # The cls token sits at index L//2 of what the first block sees (pos_embed zeroed to read it off).
        enc.pos_embed.zero_()
        seen = []
        enc.layers[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        enc(views[:, 0])
        patches = enc.patch_embed(views[:, 0])                     # (1, 16, D)
        assert torch.equal(seen[0][0, 8], enc.cls_token[0, 0])
        assert torch.equal(seen[0][0, :8], patches[0, :8]) and torch.equal(seen[0][0, 9:], patches[0, 8:])


def test_presets_build():
    for name in ENCODER_PRESETS:
        cfg = encoder_config(name)
        assert cfg.num_tokens == (cfg.img_size // cfg.patch_size) ** 2 + 1


# Re-gridding at a whole-number ratio on a nearest-upsampled image: the resampled kernel sums each p x p block
# of the new patch to what one old pixel weighed, so the outputs are the same sums in another order (f32 rounding
# over 3 * 32 * 32 products, then the blocks).
RTOL_RESIZE, ATOL_RESIZE = 1e-4, 1e-4


def test_resize_to_a_larger_patch_keeps_the_tokens_on_an_upsampled_image():
    torch.manual_seed(0)
    enc = MambaXrayEncoder(encoder_config("tiny")).eval()           # 64 px, patch 16: a 4 x 4 grid
    img = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = enc(img)
        enc.resize(128, 32)
        after = enc(F.interpolate(img, scale_factor=2, mode="nearest"))
    assert enc.cfg.img_size == 128 and enc.cfg.patch_size == 32 and enc.patch_embed.proj.weight.shape[-1] == 32
    assert enc.pos_embed.shape == before.shape[:1] + (17, 32)
    torch.testing.assert_close(after, before, rtol=RTOL_RESIZE, atol=ATOL_RESIZE)


def test_resize_to_a_finer_grid_keeps_cls_and_resamples_positions():
    torch.manual_seed(0)
    enc = MambaXrayEncoder(encoder_config("tiny"))
    cls_pos = enc.pos_embed[0, 8].clone()
    enc.pos_embed.data[0, :8] = 1.0
    enc.pos_embed.data[0, 9:] = 1.0                                # a constant grid stays constant
    enc.resize(128, 16)                                            # 8 x 8 grid, 65 tokens
    assert enc.pos_embed.shape == (1, 65, 32)
    assert torch.equal(enc.pos_embed[0, 32], cls_pos)
    torch.testing.assert_close(torch.cat([enc.pos_embed[0, :32], enc.pos_embed[0, 33:]]), torch.ones(64, 32))
    assert enc(torch.randn(1, 3, 128, 128)).shape == (1, 65, 32)
