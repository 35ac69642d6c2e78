"""Command lines of the PyTorch side: emrrg-init, emrrg-import, emrrg-generate.

Every known failure (bad checkpoint, unknown preset, unreadable image, missing asset) ends in one
line on stderr and exit status 2; nothing is left half-written (checkpoints are written atomically).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
import time
from contextlib import contextmanager

from emrrg.config import DECODER_PRESETS, ENCODER_PRESETS, GENERATION_PRESETS
from emrrg.runtime import logs
from emrrg.runtime.helpfmt import CommandParser, DefaultsHelpFormatter


def _known_errors() -> tuple[type[BaseException], ...]:
    from emrrg.assets import MissingAssetError
    from emrrg.checkpoint import CheckpointError
    from emrrg.config import UnknownPresetError
    from emrrg.decoder import DecoderLoadError
    from emrrg.lora import AdapterMismatchError
    from emrrg.runtime.preprocess import ImageError

    return (CheckpointError, UnknownPresetError, DecoderLoadError, AdapterMismatchError, ImageError,
            MissingAssetError, FileExistsError, FileNotFoundError)


def require_torch(prog: str) -> None:
    """One line and exit 2, naming the extra to install, when PyTorch is missing (the runtime extra has none).

    Checked with find_spec, which does not import torch: a command may still refuse bad options first."""
    try:
        found = importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # a broken install or an import blocker: as good as absent
        found = False
    if not found:
        print(f"{prog}: error: this command needs PyTorch, which is not installed; install the export extra: "
              "pip install 'emrrg[export]' (the runtime commands emrrg-run / emrrg-serve need no PyTorch)",
              file=sys.stderr)
        raise SystemExit(2)


@contextmanager
def _cli_errors(prog: str, needs_torch: bool = True):
    if needs_torch:
        require_torch(prog)
    from emrrg.export.cli import quiet_library_warnings

    quiet_library_warnings()
    try:
        yield
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was written", file=sys.stderr)
        raise SystemExit(130) from None
    except _known_errors() as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    return CommandParser(prog=prog, description=description,
                                   formatter_class=DefaultsHelpFormatter)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--decoder", default="smollm2-135m", choices=list(DECODER_PRESETS), help="decoder preset")
    p.add_argument("--decoder-path", default=None, help="local HF Llama folder (for --decoder llama2-7b) (default: none; the preset's "
                                                                   "own weights)")
    p.add_argument("--dataset", default="mimic", choices=list(GENERATION_PRESETS), help="decoding preset")
    p.add_argument("--llm-lora-rank", type=int, default=0, help="peft LoRA rank on q_proj/v_proj (0: none)")


def init_main(argv: list[str] | None = None) -> None:
    p = _parser("emrrg-init", "Write a checkpoint with a randomly initialised encoder and projector over a "
                              "preset decoder (the real SmolLM2 by default), offline.")
    p.add_argument("-o", "--output", required=True, help="checkpoint directory to create (must not exist)")
    p.add_argument("--encoder", default="base", choices=list(ENCODER_PRESETS), help="encoder preset")
    _model_args(p)
    p.add_argument("--lora-rank", type=int, default=0, help="Partial LoRA rank on the encoder (0: none)")
    p.add_argument("--hybrid-layers", default="", help="comma-separated decoder layers with gated cross-attention, "
                                                       "'every8' for every 8th, '' for none")
    p.add_argument("--seed", type=int, default=0, help="torch seed of the random initialisation")
    a = p.parse_args(argv)
    with _cli_errors(p.prog):
        import torch

        from emrrg.checkpoint import save_checkpoint
        from emrrg.config import make_config
        from emrrg.decoder import default_hybrid_layers, load_base_decoder
        from emrrg.model import EMRRG, count_parameters

        torch.manual_seed(a.seed)
        dec = {"lora_rank": a.llm_lora_rank}
        if a.decoder_path:
            dec["path"] = a.decoder_path
        cfg = make_config(a.encoder, a.decoder, a.dataset, encoder_overrides={"lora_rank": a.lora_rank},
                          decoder_overrides=dec)
        t0 = time.perf_counter()
        # a --decoder-path LLM's weights stay in its folder (the checkpoint names it): without hybrid layers or
        # LLM LoRA to initialise, only its shapes are needed (a 7B would take 28 GB in f32)
        shapes_only = cfg.decoder.source == "path" and not a.hybrid_layers and not a.llm_lora_rank
        llm, tok = load_base_decoder(cfg.decoder, weights=not shapes_only)
        if a.hybrid_layers == "every8":
            cfg.decoder.hybrid_layers = default_hybrid_layers(llm.config.num_hidden_layers)
        elif a.hybrid_layers:
            cfg.decoder.hybrid_layers = tuple(int(x) for x in a.hybrid_layers.split(","))
        model = EMRRG(cfg, llm, tok)
        out = save_checkpoint(model, a.output)
        print(f"wrote {out}: encoder {a.encoder} ({count_parameters(model.visual_encoder) / 1e6:.2f}M), "
              f"decoder {a.decoder} ({count_parameters(model.llama_model) / 1e6:.1f}M) in {time.perf_counter() - t0:.1f}s")


def import_main(argv: list[str] | None = None) -> None:
    p = _parser("emrrg-import", "Convert upstream MambaXray-VL / EMRRG .pth files (read with weights_only=True) "
                                "into an emrrg checkpoint directory.")
    p.add_argument("encoder_pth", help="MambaXrayCLIP-*.pth with {'model': {'visual_encoder.*': ...}}")
    p.add_argument("--emrrg", default=None, help="EMRRG checkpoint .pth with the trainable parameters over the base "
                                                       "(default: none; the encoder .pth alone)")
    p.add_argument("-o", "--output", required=True, help="checkpoint directory to create (must not exist)")
    _model_args(p)
    a = p.parse_args(argv)
    with _cli_errors(p.prog):
        from emrrg.checkpoint import import_upstream

        out = import_upstream(a.encoder_pth, a.output, decoder=a.decoder, decoder_path=a.decoder_path,
                              emrrg_pth=a.emrrg, dataset=a.dataset, llm_lora_rank=a.llm_lora_rank)
        print(f"wrote {out}")


def generate_main(argv: list[str] | None = None) -> None:
    p = _parser("emrrg-generate", "Reference report generation with the f32 PyTorch model. Several images are "
                                  "the views of one study.")
    p.add_argument("checkpoint", help="emrrg checkpoint directory")
    p.add_argument("images", nargs="+", help="DICOM / PNG / JPEG views of one study")
    p.add_argument("--beams", type=int, default=None, help="beam count (default: the checkpoint's dataset preset)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="(default: the dataset preset)")
    p.add_argument("--min-new-tokens", type=int, default=None, help="(default: the dataset preset)")
    p.add_argument("--no-repeat-ngram-size", type=int, default=None, help="0 = off (default: the checkpoint's)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--llm-4bit", choices=("none", "nf4"), default="none",
                   help="nf4: merge the LoRA, then hold the LLM's linears in bitsandbytes NF4 (lm_head f32)")
    a = p.parse_args(argv)
    with _cli_errors(p.prog):
        import torch

        from emrrg.checkpoint import load_checkpoint

        if a.threads:
            torch.set_num_threads(a.threads)
        t0 = time.perf_counter()
        model = load_checkpoint(a.checkpoint)
        if a.llm_4bit == "nf4":
            from emrrg.decoder import quantize_llm_nf4

            model.merge_adapters()
            n = quantize_llm_nf4(model.llama_model)
            if not logs.quiet():
                print(f"[LLM: {n} linear layers in NF4]", file=sys.stderr)
        t1 = time.perf_counter()
        px = model.pixel_values(a.images)
        gen = model.cfg.generation
        gen = type(gen).resolve(dataclasses.asdict(gen), {
            "num_beams": a.beams, "max_new_tokens": a.max_new_tokens, "min_new_tokens": a.min_new_tokens,
            "no_repeat_ngram_size": a.no_repeat_ngram_size})
        ids = model.generate_ids(px, gen)
        t2 = time.perf_counter()
        print(model.decode(ids[0].tolist()))
        if not logs.quiet():  # -q: the report alone
            print(f"[{ids.shape[1]} tokens; load {t1 - t0:.1f}s, generate {t2 - t1:.1f}s]", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    generate_main()
