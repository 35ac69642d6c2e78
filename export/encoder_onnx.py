"""Export the EMRRG vision side (encoder + projector) to ONNX, and validate it against PyTorch.

The graph is `EMRRG.encode_images` as one function of the pixels:

    pixel_values (B, V, 3, S, S) f32  --encoder per view-->  (B*V, L, D)  --mean over V-->  (B, L, D)
        --llama_proj-->  (B, L, H_llm)  --LayerNorm-->  visual_tokens (B, L, H_llm) f32

B (studies) and V (views per study) are dynamic; S and L = (S/16)^2 + 1 are fixed by the encoder config.
Each mixer makes one `com.emrrg::SelectiveScan` node (four directions fused as G=4 groups; the flips and
column reorders are Gathers outside it), or, in the `pure_onnx` variant, one call of a standard-ONNX scan
function (emrrg.export.onnx_ops). The variant is recorded in the model's metadata as `emrrg.scan_variant`.

Export-only rewrites (context managers; each docstring says what it avoids), all with the reference's
arithmetic and checked against it before the export:
  - onnx_ops.scan_as_custom_op: the scan as one opaque custom-op call (no unrolled loop, no fixed L);
  - fused_mixer_layout: the mixer's stacked direction weights (emrrg/ops/directions.py) as initializers;
  - fused_swiglu: w1 and w2 as one MatMul (so ORT CPU fuses its INT8 form).

Every export ends with `validate_encoder`: ONNX Runtime against the f32 PyTorch reference on the same
preprocessed images, ✓/✗ per image set, a typed `ValidationError` when a named threshold is missed
(optimum's `validate_model_outputs` habit).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
import types
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F

from emrrg.runtime.contract import ENCODER_INPUT, ENCODER_OUTPUT
from emrrg.export import onnx_ops
from emrrg.export.errors import ValidationError
from emrrg.model import visual_tokens

VARIANTS = ("custom_op", "pure_onnx")
INPUT_NAME, OUTPUT_NAME = ENCODER_INPUT, ENCODER_OUTPUT   # the bundle contract's names (emrrg.runtime.contract)
METADATA_VARIANT = "emrrg.scan_variant"
_DROP_NODE_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node")  # local paths, bulky


# ---------------------------------------------------------------------------------------------------
# Accuracy thresholds: all of them, in one place
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Thresholds:
    max_nmse: float                # sum (onnx - ref)^2 / sum ref^2 over the whole output
    min_mean_cosine: float         # mean over tokens of cos(onnx_token, ref_token), each token a H_llm vector
    max_abs: float | None = None   # max |onnx - ref|; None for quantized graphs (a scale-free metric is fairer)


# f32 ONNX vs f32 PyTorch: the same arithmetic in another order (ORT's GEMM blocking, its LayerNorm, the
# scan's accumulation order). The outputs are LayerNorm'd, O(1), so f32 rounding gives |Δ| ~ 1e-5 and
# NMSE ~ 1e-11; a real export bug (a wrong reorder, a missed bias) gives NMSE ~ 1e-2 and above.
F32_THRESHOLDS = Thresholds(max_nmse=1e-8, min_mean_cosine=0.99999, max_abs=1e-3)
# INT8 Q/DQ vs f32 PyTorch: the acceptance bar is a mean token cosine >= 0.995. For unit-scale
# tokens NMSE ~ 2 (1 - cos), so 1e-2 is the same bar in NMSE.
INT8_THRESHOLDS = Thresholds(max_nmse=1e-2, min_mean_cosine=0.995)


# ---------------------------------------------------------------------------------------------------
# The module that is exported
# ---------------------------------------------------------------------------------------------------

class VisualTokens(nn.Module):
    """EMRRG.encode_images as one module: (B, V, 3, S, S) pixel values -> (B, L, H_llm) visual tokens, then the
    model's finding tokens if it has them (emrrg.findings: (B, L + K * finding_slots, H_llm))."""

    def __init__(self, encoder: nn.Module, projector: nn.Module, findings: nn.Module | None = None):
        super().__init__()
        self.encoder = encoder
        self.projector = projector
        self.findings = findings

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder.encode_study(pixel_values)                    # (B, L, D), views averaged
        return visual_tokens(tokens, self.projector, self.findings)


def visual_tokens_module(model: nn.Module, projector: nn.Module | None = None) -> VisualTokens:
    """An EMRRG (visual_encoder, llama_proj, layer_norm), a VisualTokens, or an encoder plus a projector."""
    if isinstance(model, VisualTokens):
        if projector is not None:
            raise ValueError("pass a projector only together with a bare encoder")
        return model
    if all(hasattr(model, k) for k in ("visual_encoder", "llama_proj", "layer_norm")):
        if projector is not None:
            raise ValueError("an EMRRG model brings its own projector (llama_proj + layer_norm)")
        return VisualTokens(model.visual_encoder, nn.Sequential(model.llama_proj, model.layer_norm),
                            getattr(model, "finding_prompt", None))
    if hasattr(model, "encode_study"):
        if projector is None:
            raise ValueError("a bare encoder needs projector=nn.Sequential(nn.Linear(D, H_llm), nn.LayerNorm(H_llm))")
        return VisualTokens(model, projector)
    raise TypeError(f"cannot export {type(model).__name__}: expected an EMRRG, a VisualTokens, "
                    "or a MambaXrayEncoder with a projector")


# ---------------------------------------------------------------------------------------------------
# Export-only rewrites (same arithmetic, a graph that ONNX Runtime / TensorRT run well)
# ---------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def fused_swiglu(module: nn.Module) -> Iterator[nn.Module]:
    r"""Export-only rewrite: SwiGLU's w1 and w2 become one Linear(D, 2H) followed by a split.

    Avoids: in the INT8 graph, w1 and w2 read the same quantized norm2 output, and ONNX Runtime's CPU QDQ
    fusion (DQ -> MatMul => MatMulIntegerToFloat) skips a MatMul whose QuantizeLinear feeds more than one
    DequantizeLinear, so both ran as float MatMuls behind a per-run weight DequantizeLinear, slower than f32.
    One MatMul reads the activation once, fuses, and is one larger GEMM for TensorRT as well.

        x -> w1 -> silu --\                      x -> [w1; w2] -> split -> silu(a) * b -> w3
        x -> w2 ----------* -> w3        ==>
    """
    from emrrg.encoder import SwiGLU

    mlps = [m for m in module.modules() if isinstance(m, SwiGLU)]
    try:
        for m in mlps:
            w12 = nn.Linear(m.w1.in_features, 2 * m.w1.out_features, bias=True)
            with torch.no_grad():
                w12.weight.copy_(torch.cat([m.w1.weight, m.w2.weight]))         # (2H, D)
                w12.bias.copy_(torch.cat([m.w1.bias, m.w2.bias]))
            m._export_w12 = w12

            def forward(x, m=m):
                a, b = m._export_w12(x).chunk(2, dim=-1)                        # (..., H) each
                return m.w3(F.silu(a) * b)
            m.forward = forward
        yield module
    finally:
        for m in mlps:
            m.__dict__.pop("forward", None)
            if "_export_w12" in m._modules:
                del m._modules["_export_w12"]


@contextlib.contextmanager
def fused_mixer_layout(module: nn.Module) -> Iterator[nn.Module]:
    """Export-only: each ARMMixer's stacked direction weights frozen as parameters of their own.

    The mixer runs the four directions batched (emrrg/ops/directions.py) on weights it stacks on every call.
    Exported as they are, those stacks are Concat nodes over the per-direction initializers, and the INT8
    quantizer (and ORT's constant folding of MatMul weights) wants each MatMul / Conv weight to be one
    initializer. Here stacked_weights returns copies made once, registered on the mixer, so that the export
    sees them as initializers; the arithmetic is the same.
    """
    from emrrg.mixer import ARMMixer
    from emrrg.ops.directions import WEIGHTS

    mixers = [m for m in module.modules() if isinstance(m, ARMMixer)]
    try:
        for m in mixers:
            with torch.no_grad():
                stacked = m.stacked_weights()
            for k in WEIGHTS:
                m.register_parameter(f"_export_{k}", nn.Parameter(stacked[k].detach().clone(), requires_grad=False))
            m.stacked_weights = types.MethodType(lambda self: {k: getattr(self, f"_export_{k}") for k in WEIGHTS}, m)
        yield module
    finally:
        for m in mixers:
            m.__dict__.pop("stacked_weights", None)
            for k in WEIGHTS:
                m._parameters.pop(f"_export_{k}", None)


# ---------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------

def _strip_node_metadata(model: onnx.ModelProto) -> None:
    for nd in model.graph.node:
        keep = [p for p in nd.metadata_props if p.key not in _DROP_NODE_METADATA]
        del nd.metadata_props[:]
        nd.metadata_props.extend(keep)


def set_metadata(model: onnx.ModelProto, entries: Mapping[str, str]) -> None:
    """Set (replace) model-level metadata_props."""
    props = {p.key: p.value for p in model.metadata_props}
    props.update({k: str(v) for k, v in entries.items()})
    del model.metadata_props[:]
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)


def get_metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def save_model(model: onnx.ModelProto, out_path: str | os.PathLike, check: bool = True) -> dict:
    """decoder_onnx.save_onnx (external data above its EXTERNAL_DATA_ABOVE_BYTES) with onnx.checker; returns
    {'bytes', 'external_data'}."""
    from emrrg.export.decoder_onnx import needs_external_data, save_onnx

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    external = needs_external_data(model)
    if check and not external:
        onnx.checker.check_model(model, full_check=False)
    save_onnx(model, out, external=external)
    if check and external:
        onnx.checker.check_model(str(out), full_check=False)  # the path form reads the external data
    data = out.with_name(out.name + ".data")
    return {"bytes": out.stat().st_size + (data.stat().st_size if external else 0),
            "external_data": data.name if external else None}


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """'domain::op' (or 'op' for ai.onnx) -> count over the main graph."""
    return dict(sorted(Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in model.graph.node).items()))


def export_encoder(model: nn.Module, out_path: str | os.PathLike, variant: str = "custom_op", *,
                   projector: nn.Module | None = None, opset: int = onnx_ops.DEFAULT_OPSET,
                   layout_rewrites: bool = True, metadata: Mapping[str, str] | None = None) -> dict:
    """Export the encoder + projector (views averaged, like EMRRG.encode_images) to `out_path`.

    model: an EMRRG, a VisualTokens, or a MambaXrayEncoder together with `projector`.
    variant: "custom_op" (com.emrrg::SelectiveScan nodes; needs the op library / TensorRT plugin to run)
             or "pure_onnx" (standard ONNX Scan inside model-local functions; runs anywhere, slower).
    layout_rewrites: apply fused_swiglu and fused_mixer_layout (same arithmetic, a faster graph).
    Returns {'path', 'variant', 'opset', 'bytes', 'external_data', 'nodes', 'scan_nodes', 'op_counts',
             'num_tokens', 'hidden', 'export_s'}.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    t0 = time.perf_counter()
    module = visual_tokens_module(model, projector).eval()
    cfg = module.encoder.cfg
    # B = V = 2 in the example: torch.export specialises dimensions of size 0 and 1.
    example = torch.randn(2, 2, cfg.in_chans, cfg.img_size, cfg.img_size)
    dynamic = {INPUT_NAME: {0: torch.export.Dim("batch"), 1: torch.export.Dim("views")}}
    check = example[:1, :1]                                                 # one image: the eager check is slow
    with torch.no_grad():
        want = module(check)                                                 # (1, L, H), the reference path
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        if layout_rewrites:
            stack.enter_context(fused_swiglu(module))
            stack.enter_context(fused_mixer_layout(module))
        stack.enter_context(onnx_ops.scan_as_custom_op(module))
        got = module(check)
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):  # f32 reordering only; a rewrite bug is O(1)
            raise onnx_ops.ScanExportError(
                f"the export-only rewrites change the output (max |diff| {(got - want).abs().max().item():.3e})")
        hidden = got.shape[-1]
        prog = torch.onnx.export(module, (example,), dynamo=True, dynamic_shapes=dynamic, opset_version=opset,
                                 custom_translation_table=onnx_ops.custom_translation_table(),
                                 input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], verbose=False)
    proto = prog.model_proto
    _strip_node_metadata(proto)
    n_scan = onnx_ops.count_scan_nodes(proto)["custom_op"]
    if n_scan != cfg.depth:
        raise onnx_ops.ScanExportError(f"expected one {onnx_ops.DOMAIN}::{onnx_ops.OP_TYPE} node per layer "
                                       f"({cfg.depth}), the export has {n_scan}")
    if variant == "pure_onnx":
        proto = onnx_ops.expand_scan_nodes(proto, opset)
    set_metadata(proto, {
        METADATA_VARIANT: variant,
        "emrrg.precision": "fp32",
        "emrrg.layout_rewrites": "fused_swiglu,fused_mixer_layout" if layout_rewrites else "none",
        "emrrg.encoder_config": json.dumps(asdict(cfg), sort_keys=True),
        "emrrg.num_tokens": int(got.shape[1]),
        "emrrg.hidden": hidden,
        "emrrg.inputs": f"{INPUT_NAME}: (batch, views, {cfg.in_chans}, {cfg.img_size}, {cfg.img_size}) float32, "
                        "runtime.preprocess normalisation",
        **(metadata or {}),
    })
    proto.producer_name, proto.doc_string = "emrrg.export", "EMRRG visual tokens: encoder, views averaged, projector"
    saved = save_model(proto, out_path)
    scans = onnx_ops.count_scan_nodes(proto)
    return {"path": str(out_path), "variant": variant, "opset": opset, **saved,
            "nodes": len(proto.graph.node), "scan_nodes": scans[variant], "op_counts": op_counts(proto),
            "num_tokens": int(got.shape[1]), "hidden": int(hidden), "export_s": round(time.perf_counter() - t0, 2)}


def pure_onnx_twin(custom_op_path: str | os.PathLike, out_path: str | os.PathLike) -> dict:
    """Write the pure_onnx variant of an exported custom_op graph without a second torch export.

    The same graph as export_encoder(variant="pure_onnx") gives: each SelectiveScan node becomes a call of
    the standard-ONNX scan function, every other node and tensor name is unchanged.
    """
    model = onnx.load(str(custom_op_path))
    meta = get_metadata(model)
    if meta.get(METADATA_VARIANT) != "custom_op":
        raise ValueError(f"{custom_op_path} is not a custom_op export ({METADATA_VARIANT}={meta.get(METADATA_VARIANT)!r})")
    opset = next((op.version for op in model.opset_import if op.domain in ("", "ai.onnx")), onnx_ops.DEFAULT_OPSET)
    pure = onnx_ops.expand_scan_nodes(model, opset)
    set_metadata(pure, {METADATA_VARIANT: "pure_onnx"})
    saved = save_model(pure, out_path)
    return {"path": str(out_path), "variant": "pure_onnx", **saved, "nodes": len(pure.graph.node),
            "scan_nodes": onnx_ops.count_scan_nodes(pure)["pure_onnx"], "op_counts": op_counts(pure)}


# ---------------------------------------------------------------------------------------------------
# Sessions
# ---------------------------------------------------------------------------------------------------

def needs_op_library(onnx_path: str | os.PathLike) -> bool:
    """True when the graph holds com.emrrg::SelectiveScan nodes (reads the graph, not the weights)."""
    m = onnx.load(str(onnx_path), load_external_data=False)
    return onnx_ops.count_scan_nodes(m)["custom_op"] > 0


def make_session(onnx_path: str | os.PathLike, providers: Sequence[str] = ("CPUExecutionProvider",),
                 oplib: str | os.PathLike | bool | None = "auto", threads: int | None = None):
    """An onnxruntime.InferenceSession for an exported encoder.

    oplib: "auto" registers libemrrg_ops.so when the graph needs it (OpLibraryMissingError says how to
    build it); a path registers that file; None / False registers nothing.
    """
    import onnxruntime as ort

    from emrrg.runtime.sessions import session_options

    if oplib == "auto":
        oplib = needs_op_library(onnx_path)
    return ort.InferenceSession(str(onnx_path), session_options(threads, oplib=oplib), providers=list(providers))


# ---------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------

def as_pixel_values(images, size: int) -> np.ndarray:
    """Images -> (B, V, 3, S, S) float32. A sequence of paths/arrays gives one single-view study each;
    a (B, 3, S, S) array gets V=1; a (B, V, 3, S, S) array passes through."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if isinstance(images, np.ndarray) and images.dtype != object and images.ndim in (4, 5) and images.shape[-3] == 3:
        x = images[:, None] if images.ndim == 4 else images
        if x.shape[-1] != size or x.shape[-2] != size:
            raise ValueError(f"pixel values are {x.shape[-2]}x{x.shape[-1]}, the encoder takes {size}x{size}")
        return np.ascontiguousarray(x, dtype=np.float32)
    from emrrg.runtime.preprocess import preprocess

    if len(images) == 0:
        raise ValueError("no images to validate on")
    return np.stack([preprocess(p, size) for p in images])[:, None]        # (B, 1, 3, S, S)


def compare(out: np.ndarray, ref: np.ndarray) -> dict:
    """Scale-free comparison of (B, L, H) token tensors: max |Δ|, NMSE, token cosines, finiteness."""
    out64, ref64 = out.astype(np.float64), ref.astype(np.float64)
    finite = bool(np.isfinite(out64).all())
    diff = out64 - ref64
    nmse = float((diff ** 2).sum() / max((ref64 ** 2).sum(), 1e-30))
    cos = (out64 * ref64).sum(-1) / np.maximum(np.linalg.norm(out64, axis=-1) * np.linalg.norm(ref64, axis=-1), 1e-30)
    return {"finite": finite, "max_abs": float(np.abs(diff).max()), "mean_abs": float(np.abs(diff).mean()),
            "nmse": nmse, "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
            "per_study_cosine": [float(c) for c in cos.mean(-1)]}


def _failures(m: dict, th: Thresholds) -> list[str]:
    why = []
    if not m["finite"]:
        why.append("NaN/inf in the output")
    if not m["nmse"] <= th.max_nmse:
        why.append(f"NMSE {m['nmse']:.3e} > {th.max_nmse:.0e}")
    if not m["mean_cosine"] >= th.min_mean_cosine:
        why.append(f"mean token cosine {m['mean_cosine']:.6f} < {th.min_mean_cosine}")
    if th.max_abs is not None and not m["max_abs"] <= th.max_abs:
        why.append(f"max |Δ| {m['max_abs']:.3e} > {th.max_abs:.0e}")
    return why


def is_quantized(onnx_path: str | os.PathLike) -> bool:
    m = onnx.load(str(onnx_path), load_external_data=False)
    return any(n.op_type in ("DequantizeLinear", "QuantizeLinear") for n in m.graph.node)


def run_reference(reference: nn.Module, pixel_values: np.ndarray, batch_size: int = 4) -> np.ndarray:
    """The f32 PyTorch visual tokens, (B, L, H), in chunks of `batch_size` studies."""
    module = visual_tokens_module(reference).eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(pixel_values), batch_size):
            outs.append(module(torch.from_numpy(pixel_values[i:i + batch_size])).float().numpy())
    return np.concatenate(outs)


def run_onnx(session, pixel_values: np.ndarray, batch_size: int = 4) -> np.ndarray:
    return np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: pixel_values[i:i + batch_size]})[0]
                           for i in range(0, len(pixel_values), batch_size)])


def validate_encoder(onnx_path: str | os.PathLike, reference: nn.Module, images, *,
                     thresholds: Thresholds | None = None, providers: Sequence[str] = ("CPUExecutionProvider",),
                     oplib: str | os.PathLike | bool | None = "auto", batch_size: int = 4,
                     reference_outputs: Mapping[str, np.ndarray] | None = None, verbose: bool = True,
                     raise_on_failure: bool = True) -> dict:
    """Run the ONNX encoder in ONNX Runtime against the f32 PyTorch reference on the same pixels.

    images: one image set (paths / arrays / a pixel_values array) or a mapping {set name: image set}.
    thresholds: default F32_THRESHOLDS, or INT8_THRESHOLDS when the graph holds Q/DQ nodes.
    reference_outputs: {set name: (B, L, H)} already computed (skips the slow PyTorch run).
    Prints ✓/✗ per set; raises ValidationError naming every miss (or, with raise_on_failure=False, returns
    them under 'failures' with passed=False); returns the figures for the manifest.
    """
    ref_module = visual_tokens_module(reference).eval()
    size = ref_module.encoder.cfg.img_size
    sets = dict(images) if isinstance(images, Mapping) else {"images": images}
    th = thresholds or (INT8_THRESHOLDS if is_quantized(onnx_path) else F32_THRESHOLDS)
    session = make_session(onnx_path, providers, oplib)
    report = {"onnx": str(onnx_path), "providers": list(session.get_providers()), "thresholds": asdict(th), "sets": {}}
    failed = []
    if verbose:
        print(f"Validating {Path(onnx_path).name} ({', '.join(session.get_providers())}) against PyTorch f32:")
    for name, imgs in sets.items():
        px = as_pixel_values(imgs, size)
        ref = reference_outputs[name] if reference_outputs and name in reference_outputs else \
            run_reference(ref_module, px, batch_size)
        out = run_onnx(session, px, batch_size)
        if out.shape != ref.shape:
            raise ValidationError(f"{name}: ONNX output {out.shape} != reference {ref.shape}")
        m = compare(out, ref)
        m["studies"], m["views"] = int(px.shape[0]), int(px.shape[1])
        why = _failures(m, th)
        m["passed"] = not why
        report["sets"][name] = m
        if verbose:
            mark = "✓" if not why else "✗"
            print(f"  {mark} {name} [{px.shape[0]} x {px.shape[1]} views]: max|Δ| {m['max_abs']:.3e}  "
                  f"NMSE {m['nmse']:.3e}  mean cos {m['mean_cosine']:.6f} (min {m['min_cosine']:.6f})"
                  + ("" if not why else "  <- " + "; ".join(why)))
        if why:
            failed.append(f"{name}: " + "; ".join(why))
    report["passed"] = not failed
    if failed and not raise_on_failure:
        report["failures"] = failed
    elif failed:
        raise ValidationError(f"{Path(onnx_path).name} misses its thresholds {asdict(th)}:\n  " + "\n  ".join(failed))
    return report


__all__ = [
    "VARIANTS", "INPUT_NAME", "OUTPUT_NAME", "METADATA_VARIANT", "Thresholds", "F32_THRESHOLDS", "INT8_THRESHOLDS",
    "ValidationError", "VisualTokens", "visual_tokens_module", "fused_swiglu", "fused_mixer_layout", "export_encoder",
    "pure_onnx_twin", "save_model", "set_metadata",
    "get_metadata", "op_counts", "needs_op_library", "make_session", "as_pixel_values", "compare", "run_reference",
    "run_onnx", "validate_encoder", "is_quantized",
]
