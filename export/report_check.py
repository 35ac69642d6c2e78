"""`emrrg-export --calib-reports ANNOTATION`: a report-level check in the 4-bit decoder's ladder (opt-in).

The ladder (quantize_decoder.choose_decoder_config) keeps the first encoding within the teacher-forced thresholds
(top-1, KL). An encoding can pass them and still change what a reader sees: a flipped near-tie early in a beam
search changes every later sentence. With --calib-reports, a rung that passes is also made to write reports for
the first `--calib-reports-limit` studies of the annotation's validation split, and is kept only when its report
metrics (against the annotation's reference reports) stay within REPORT_BANDS of the f32 decoder's on the same
studies; otherwise the ladder goes on to the next rung.

Both sides decode the same prompt embeddings (the f32 PyTorch encoder's visual tokens, the checkpoint's prompt)
with the checkpoint's own decoding settings, through the runtime's generation loop (emrrg.runtime.generation)
and shared-cache step model, so the only difference between them is the decoder graph.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np

log = logging.getLogger("emrrg.export")     # stderr, hidden by -q (runtime/logs.py)

# Relative change of a candidate's report metric from the f32 decoder's, on the same studies: the fidelity
# targets of the INT8 + 4-bit bundle (CE-F1 within 1%, BLEU-4 and CIDEr within 5%).
REPORT_BANDS = {"CE_F1": 0.01, "BLEU_4": 0.05, "CIDEr": 0.05}
DEFAULT_REPORT_LIMIT = 24      # validation studies: ~2 minutes per rung on 2 cores with SmolLM2 and 3 beams


def report_metrics(preds: list[str], refs: list[str]) -> dict[str, float]:
    """BLEU-4, CIDEr and CE-F1 (micro) of `preds` against `refs` (no METEOR: it needs Java)."""
    from emrrg.evaluate import score_reports

    s = score_reports(preds, refs, meteor=False)
    return {"BLEU_4": float(s["nlg"]["BLEU_4"]), "CIDEr": float(s["nlg"]["CIDEr"]), "CE_F1": float(s["ce"]["f1_micro"])}


def within_bands(got: dict[str, float], ref: dict[str, float]) -> dict[str, dict]:
    """Per metric: the relative change from `ref` and whether it is within its band. A metric that is 0 for the
    reference must stay 0 (no relative change is defined)."""
    out = {}
    for k, band in REPORT_BANDS.items():
        rel = (got[k] - ref[k]) / ref[k] if ref[k] else (0.0 if got[k] == ref[k] else float("inf"))
        out[k] = {"f32": round(ref[k], 4), "candidate": round(got[k], 4), "rel": round(rel, 4),
                  "band": band, "ok": abs(rel) <= band}
    return out


class ReportCheck:
    """accept(decoder_onnx) -> (ok, details) for choose_decoder_config, on the first `limit` val studies."""

    def __init__(self, model, annotation: str | Path, dec, limit: int = DEFAULT_REPORT_LIMIT,
                 log: Callable[[str], None] = log.info):
        import dataclasses

        import torch

        from emrrg.evaluate import load_split
        from emrrg.export.decoder_onnx import ort_session
        from emrrg.runtime import contract as C
        from emrrg.runtime.generation import DecodeSettings

        split = load_split(annotation, "val", limit)
        self.refs = [e["report"] for e in split.examples]
        self.dec, self.log, self.tokenizer = dec, log, model.tokenizer
        self.embed = np.load(dec.embed_tokens)
        self.settings = DecodeSettings.resolve(dataclasses.asdict(model.cfg.generation), {},
                                               eos_token_id=dec.spec.eos_token_id)
        cross = ort_session(dec.cross_kv) if dec.cross_kv is not None else None
        self.prompts, self.visual_kv = [], []
        with torch.no_grad():
            for ex in split.examples:
                visual = model.encode_images(model.pixel_values([str(p) for p in split.images(ex)]))
                self.prompts.append(model.prompt_embeds(visual).numpy().astype(np.float32))
                self.visual_kv.append(dict(zip([o.name for o in cross.get_outputs()],
                                               cross.run(None, {C.CROSS_KV_INPUT: visual.numpy()})))
                                      if cross is not None else None)
        self.baseline: dict | None = None

    def reports(self, decoder_onnx: Path) -> list[str]:
        from emrrg.export.decoder_onnx import ort_session
        from emrrg.model import decode_report
        from emrrg.runtime.decoder_shared import SharedCacheDecoder
        from emrrg.runtime.generation import generate

        sp, s = self.dec.spec, self.settings
        longest = max(p.shape[1] for p in self.prompts) + s.max_new_tokens
        step = SharedCacheDecoder(ort_session(decoder_onnx), self.embed, sp.num_layers, sp.kv_heads, sp.head_dim,
                                  longest, s.num_beams, tuple(sp.hybrid_layers))
        out = []
        for prompt, kv in zip(self.prompts, self.visual_kv):
            step.set_visual_kv(kv)
            step.reserve(s.num_beams, prompt.shape[1] + s.max_new_tokens)
            out.append(decode_report(self.tokenizer, generate(step, prompt, s)))
        return out

    def __call__(self, decoder_onnx: Path) -> tuple[bool, dict]:
        if self.baseline is None:
            if self.dec.decoder is None:
                raise RuntimeError("--calib-reports needs the f32 decoder (not the streamed reference)")
            self.log(f"report check: f32 decoder on {len(self.refs)} validation studies")
            self.baseline = report_metrics(self.reports(self.dec.decoder), self.refs)
        self.log(f"report check: candidate {Path(decoder_onnx).parent.name}")
        bands = within_bands(report_metrics(self.reports(Path(decoder_onnx)), self.refs), self.baseline)
        ok = all(b["ok"] for b in bands.values())
        return ok, {"studies": len(self.refs), "metrics": bands, "passed": ok}
