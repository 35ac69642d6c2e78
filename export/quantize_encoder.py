"""INT8 encoder: explicit Q/DQ ONNX, calibrated on chest X-rays, SelectiveScan left in float.

The result runs in ONNX Runtime (CPU, CUDA) and parses in TensorRT: standard `QuantizeLinear` /
`DequantizeLinear` only (no QLinear* ops, no com.microsoft ops), int8 with zero point 0 (symmetric
activations, symmetric per-channel weights, as TensorRT's explicit quantization wants), biases in float.
Only MatMul / Gemm / Conv inputs are quantized; the scan, the LayerNorms, softplus / exp and the gates
stay float, and so (by default) do x_proj / dt_proj, which compute the scan's delta, B and C, and the
mixer's depthwise conv1d, which computes its u. Before calibration, SmoothQuant (`smooth_activations`,
f32-exact) moves per-channel activation outliers into the per-channel-quantized weights.

Calibration around a custom op (a pitfall): ORT's `quantize_static` runs the
calibration in its own InferenceSession built from a bare SessionOptions, which cannot load
libemrrg_ops.so, so a graph holding com.emrrg::SelectiveScan cannot be calibrated as it is. We quantize
the pure_onnx twin instead and then put the custom op back:

    f32 custom_op ──expand_scan_nodes──> f32 pure_onnx      (same graph; each scan is a call of a
                                                               standard-ONNX function, every other tensor
                                                               keeps its name)
    f32 pure_onnx ──quantize_static(QDQ, calibrated on X-rays)──> int8 pure_onnx   (runs with no library)
    int8 pure_onnx ──collapse_scan_functions──> int8 custom_op   (the function calls become SelectiveScan
                                                                  nodes again, reading the same tensors)

So the ranges are measured on exactly the graph that ships (the scan functions compute what the op
computes), with ORT's public API only, and without the op library on the export machine.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import onnx

from emrrg.export import onnx_ops
from emrrg.runtime import logs
from emrrg.export.errors import ExportError, QuantizationError
from emrrg.export.options import WEIGHT_NMSE_BUDGET
from emrrg.export.decoder_onnx import probe_session, save_onnx
from emrrg.export.encoder_onnx import METADATA_VARIANT, get_metadata, op_counts, save_model, set_metadata

IMAGE_SUFFIXES = (".dcm", ".dicom", ".png", ".jpg", ".jpeg")
QUANTIZED_OP_TYPES = ("MatMul", "Gemm", "Conv")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
# Ops ORT may emit that TensorRT (and any non-ORT runtime) cannot take.
_FORBIDDEN_PREFIX = ("QLinear",)
_FORBIDDEN_OPS = ("MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "MatMulIntegerToFloat")
# Walking up from the scan's delta / B / C inputs passes only through these (layout and split ops).
_LAYOUT_OPS = {"Transpose", "Concat", "Split", "Reshape", "Unsqueeze", "Squeeze", "Slice", "Gather",
               "Identity", "Cast", "Flatten", "Expand"}


class CalibrationError(ExportError, ValueError):
    """No usable calibration images (an empty folder, only unreadable files, a path that is not a folder)."""


# ---------------------------------------------------------------------------------------------------
# Calibration images
# ---------------------------------------------------------------------------------------------------

def _looks_like_image(path: Path) -> bool:
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:  # DICOM archives often have files without a suffix: check the 'DICM' magic at 128
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def list_calibration_images(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Candidate images (DICOM / PNG / JPEG by suffix or DICOM magic) under `folder`, sorted.

    Raises CalibrationError when `folder` is not a directory or holds no candidate at all.
    """
    root = Path(folder)
    if not root.exists():
        raise CalibrationError(f"calibration folder {root} does not exist")
    if not root.is_dir():
        raise CalibrationError(f"--calib expects a folder of DICOM/PNG/JPEG images; {root} is a file")
    files = sorted(p for p in (root.rglob("*") if recursive else root.iterdir())
                   if p.is_file() and not p.name.startswith(".") and _looks_like_image(p))
    if not files:
        raise CalibrationError(f"no DICOM/PNG/JPEG images in {root} (looked for {', '.join(IMAGE_SUFFIXES)} "
                               "and DICOM files without a suffix)")
    return files


def load_calibration_set(images: Iterable | str | os.PathLike | None, size: int) -> tuple[np.ndarray, dict]:
    """Images (a folder, paths, or None for the 18 offline real X-rays) -> ((n, 3, S, S) f32, facts).

    Unreadable files are skipped with their reason (in facts['skipped']); none readable -> CalibrationError.
    """
    from emrrg.runtime.bundle import sha256_file
    from emrrg.runtime.preprocess import ImageError, preprocess

    if images is None:
        from emrrg.assets import real_xrays

        source, paths = "emrrg.assets.real_xrays()", list(real_xrays())
    elif isinstance(images, (str, os.PathLike)) and Path(images).is_dir():
        source, paths = str(images), list_calibration_images(images)
    elif isinstance(images, (str, os.PathLike)):
        raise CalibrationError(f"calibration images must be a folder or a list of files; {images} is not a folder")
    else:
        source, paths = "list", [Path(p) for p in images]
    arrays, used, skipped = [], [], []
    for p in paths:
        try:
            arrays.append(preprocess(p, size))                               # (3, S, S)
            used.append({"name": p.name, "sha256": sha256_file(p)})
        except ImageError as e:
            skipped.append({"name": p.name, "reason": str(e)})
    if not arrays:
        detail = "; ".join(f"{s['name']}: {s['reason']}" for s in skipped[:5]) or "no files"
        raise CalibrationError(f"no usable calibration images in {source} ({len(paths)} candidates; {detail})")
    facts = {"source": source, "count": len(used), "images": used, "skipped": skipped,
             "preprocess": f"emrrg.runtime.preprocess.preprocess(size={size})", "views_per_sample": 1}
    return np.stack(arrays).astype(np.float32), facts


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over (n, 3, S, S) pixels, one study of one view per batch."""

    def __init__(self, pixels: np.ndarray, batch_size: int = 1):
        self._batches = [{"pixel_values": pixels[i:i + batch_size, None]} for i in range(0, len(pixels), batch_size)]
        self._it = iter(self._batches)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self._batches)


# ---------------------------------------------------------------------------------------------------
# Which nodes stay float
# ---------------------------------------------------------------------------------------------------

def scan_projection_nodes(model: onnx.ModelProto) -> list[str]:
    """MatMul/Gemm nodes that compute the scan's delta, B and C (x_proj and dt_proj of every direction).

    Found by walking up from inputs 1 (delta), 3 (B) and 4 (C) of every scan node through layout ops;
    a MatMul reached is recorded and the walk continues through its activation input (dt_proj -> x_proj),
    stopping at Conv, LayerNormalization and anything else that computes.
    """
    producer = {o: nd for nd in model.graph.node for o in nd.output}
    consts = {i.name for i in model.graph.initializer}
    found, seen = [], set()
    scans = [nd for nd in model.graph.node if nd.domain in (onnx_ops.DOMAIN, onnx_ops.PURE_DOMAIN)]
    stack = [nd.input[i] for nd in scans for i in (1, 3, 4) if len(nd.input) > i and nd.input[i]]
    while stack:
        name = stack.pop()
        nd = producer.get(name)
        if nd is None or nd.name in seen:
            continue
        seen.add(nd.name)
        if nd.op_type in ("MatMul", "Gemm"):
            found.append(nd.name)
            stack.extend(i for i in nd.input if i and i not in consts)
        elif nd.op_type in _LAYOUT_OPS:
            stack.extend(i for i in nd.input if i and i not in consts)
    return sorted(found)


def depthwise_conv_nodes(model: onnx.ModelProto) -> list[str]:
    """Conv nodes with group > 1 (the mixer's causal depthwise conv1d). They stay float: a width-4
    depthwise conv is memory-bound (int8 saves nothing; ORT CPU would even dequantize around it), and its
    output, after silu, is the scan's u."""
    out = []
    for n in model.graph.node:
        if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute):
            out.append(n.name)
    return sorted(out)


# ---------------------------------------------------------------------------------------------------
# SmoothQuant: move activation outliers into the (per-channel quantized) weights
# ---------------------------------------------------------------------------------------------------

def _smoothing_targets(model: onnx.ModelProto, exclude: set[str]) -> dict[str, list[onnx.NodeProto]]:
    """Activation tensor -> the MatMuls (constant 2-D weight, not excluded) that read it as input 0."""
    inits = {i.name: i for i in model.graph.initializer}
    targets: dict[str, list] = {}
    for n in model.graph.node:
        if (n.op_type == "MatMul" and n.name not in exclude and n.input[1] in inits
                and len(inits[n.input[1]].dims) == 2 and n.input[0] not in inits):
            targets.setdefault(n.input[0], []).append(n)
    return targets


def _intermediates(model: onnx.ModelProto, names: list[str], pixels: np.ndarray, batch_size: int):
    """Yield (name, value) of the named tensors of an f32 pure_onnx model, batch by batch over the pixels."""
    with probe_session(model, names, threads=None) as sess:          # threads: ORT's default, all cores
        for i in range(0, len(pixels), batch_size):
            yield from zip(names, sess.run(names, {"pixel_values": pixels[i:i + batch_size, None]}))


def smooth_activations(model: onnx.ModelProto, pixels: np.ndarray, alpha: float = 0.5, exclude: Iterable[str] = (),
                       batch_size: int = 1) -> tuple[onnx.ModelProto, dict]:
    """SmoothQuant (Xiao et al. 2022, arXiv 2211.10438) for every quantized MatMul input; f32-exact.

    For each activation X read by MatMuls with constant weights W (K, N): s_j = max|X_j|^alpha /
    max_n|W_jn|^(1 - alpha), max|X_j| measured on the calibration pixels; W[j, :] *= s_j and X_j /= s_j,
    the latter folded where it is free and otherwise one Mul:

        LayerNormalization -> X            gamma /= s, beta /= s          (in_proj, SwiGLU's fused w1|w2)
        Div(Y, c) -> X, c a scalar const   c := c * s  (per channel)      (out_proj after the /4 average)
        anything else                      X' = X * (1/s) before the MatMuls   (w3, the projector)

    Per-tensor INT8 activations lose the channels that sit far below the tensor's max; the scaled tensor
    is flatter, and the weights, quantized per output channel, take the spread. `model` must run in a plain
    ONNX Runtime (the pure_onnx form).
    """
    from onnx import numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    targets = _smoothing_targets(model, set(exclude))
    if not targets:
        return model, {"alpha": alpha, "tensors": 0}
    amax: dict[str, np.ndarray] = {}
    for nm, a in _intermediates(model, list(targets), pixels, batch_size):
        m = np.abs(a.reshape(-1, a.shape[-1])).max(0)                        # (K,) per input channel
        amax[nm] = m if nm not in amax else np.maximum(amax[nm], m)

    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    uses: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
            uses[i] = uses.get(i, 0) + 1
    graph_outputs = {o.name for o in model.graph.output}

    def private(node: onnx.NodeProto, idx: int) -> onnx.TensorProto:
        """The initializer at node.input[idx], copied first when another node reads it too."""
        name = node.input[idx]
        if uses.get(name, 0) > 1:
            copy = onnx.TensorProto.FromString(inits[name].SerializeToString())
            copy.name = f"{name}_smooth_{node.name}"
            model.graph.initializer.append(copy)
            copy = model.graph.initializer[-1]                               # append() stored a copy
            inits[copy.name], uses[name], uses[copy.name] = copy, uses[name] - 1, 1
            node.input[idx] = copy.name
        return inits[node.input[idx]]

    def scale(t: onnx.TensorProto, factor: np.ndarray) -> None:
        t.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(t) * factor).astype(np.float32), t.name))

    folded = {"layernorm": 0, "div": 0, "mul_inserted": 0}
    ratios_before, ratios_after = [], []
    new_nodes: list[tuple[onnx.NodeProto, onnx.NodeProto]] = []               # (insert before, node)
    for x, mms in targets.items():
        a = np.maximum(amax[x], 1e-5)
        w = np.max([np.abs(numpy_helper.to_array(inits[mm.input[1]])).max(1) for mm in mms], axis=0)  # (K,)
        s = np.clip(a ** alpha / np.maximum(w, 1e-5) ** (1 - alpha), 1e-3, 1e3).astype(np.float32)
        ratios_before.append(float(a.max() / np.median(a)))
        ratios_after.append(float((a / s).max() / np.median(a / s)))
        p = producer.get(x)
        only_targets = x not in graph_outputs and all(c in mms for c in consumers.get(x, []))
        if p is not None and only_targets and p.op_type == "LayerNormalization" and p.input[1] in inits:
            for idx in (1, 2):
                if len(p.input) > idx and p.input[idx] in inits:
                    scale(private(p, idx), 1.0 / s)
            folded["layernorm"] += 1
        elif (p is not None and only_targets and p.op_type == "Div" and p.input[1] in inits
              and numpy_helper.to_array(inits[p.input[1]]).size == 1):
            c = float(numpy_helper.to_array(inits[p.input[1]]).reshape(()))
            vec = numpy_helper.from_array((c * s).astype(np.float32), f"{p.name}_smooth_divisor")
            model.graph.initializer.append(vec)
            p.input[1] = vec.name
            folded["div"] += 1
        else:
            inv = numpy_helper.from_array((1.0 / s).astype(np.float32), f"{x}_smooth_inv")
            model.graph.initializer.append(inv)
            mul = onnx.helper.make_node("Mul", [x, inv.name], [f"{x}_smoothed"], name=f"{mms[0].name}_smooth")
            for mm in mms:
                mm.input[0] = mul.output[0]
            new_nodes.append((mms[0], mul))
            folded["mul_inserted"] += 1
        for mm in mms:
            scale(private(mm, 1), s[:, None])
    for before, mul in new_nodes:                                           # keep the node list topological
        nodes = list(model.graph.node)
        idx = next(i for i, n in enumerate(nodes) if n is before or n.name == before.name)
        model.graph.node.insert(idx, mul)
    return model, {"alpha": alpha, "tensors": len(targets), **folded,
                   "max_outlier_ratio_before": round(max(ratios_before), 2),
                   "max_outlier_ratio_after": round(max(ratios_after), 2)}


def _int8_per_channel(w: np.ndarray, slot: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Symmetric int8 of a MatMul weight, one scale per output channel: (q, scale, axis). The weight on the
    right (slot 1, X @ W, W (.., K, N)) has a column per output, on the left (slot 0, W @ X, W (.., M, K)) a row.
    Batched weights (G, M, K) share one scale per output channel across the batch: DequantizeLinear takes one
    axis, and TensorRT wants per-axis (not blocked) scales."""
    axis = w.ndim - 1 if slot == 1 else w.ndim - 2
    others = tuple(i for i in range(w.ndim) if i != axis)
    scale = np.maximum(np.abs(w).max(others), 1e-12) / 127.0
    return np.clip(np.rint(w / np.expand_dims(scale, others)), -127, 127).astype(np.int8), scale, axis


def _weight_slot(node: onnx.NodeProto, inits) -> int | None:
    """Which input of a MatMul is its constant weight: 1 (X @ W), 0 (W @ X) or None."""
    return 1 if node.input[1] in inits else 0 if node.input[0] in inits else None


def weight_only_int8(model: onnx.ModelProto, node_names: Iterable[str]) -> dict:
    """Store the constant weights of these MatMuls as int8 (symmetric, per output channel) + DequantizeLinear.

    Weight-only: the activations stay float (no Q before the MatMul), so the only error is the weight
    rounding, at most half a step (amax / 254 of each output channel). Used for the scan projections
    (x_proj, dt_proj): they feed softplus / exp, where an activation rounding would be amplified, but
    their weights need not take f32 bytes. A standard per-axis DequantizeLinear(int8, scale): ORT runs it,
    and TensorRT reads it as weight-only quantization. Edits `model` in place; returns counts.
    """
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    wanted = set(node_names)
    done: dict[str, str] = {}
    before = {}
    saved = 0
    for n in model.graph.node:
        if n.name not in wanted or n.op_type != "MatMul":
            continue
        slot = _weight_slot(n, inits)
        if slot is None:
            continue
        w_name = n.input[slot]
        if w_name not in done:
            w = numpy_helper.to_array(inits[w_name]).astype(np.float32)
            if w.ndim < 2:
                continue
            q, scale, axis = _int8_per_channel(w, slot)
            model.graph.initializer.extend([numpy_helper.from_array(q, f"{w_name}_woq"),
                                            numpy_helper.from_array(scale.astype(np.float32), f"{w_name}_woq_scale"),
                                            numpy_helper.from_array(np.zeros(len(scale), np.int8), f"{w_name}_woq_zp")])
            dq = helper.make_node("DequantizeLinear", [f"{w_name}_woq", f"{w_name}_woq_scale", f"{w_name}_woq_zp"],
                                  [f"{w_name}_woq_dq"], name=f"{w_name}_woq_DequantizeLinear", axis=axis)
            done[w_name] = dq.output[0]
            before[w_name] = (n.name, dq)
            saved += w.size * 3
        n.input[slot] = done[w_name]
    for w_name, (first, dq) in before.items():                                    # DQ ahead of its first reader
        idx = next(i for i, x in enumerate(model.graph.node) if x.name == first)
        model.graph.node.insert(idx, dq)
    used = {i for x in model.graph.node for i in x.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return {"weights": len(done), "bytes_saved": int(saved)}


def worst_int8_inputs(model: onnx.ModelProto, pixels: np.ndarray, exclude: Iterable[str], fraction: float,
                      batch_size: int = 1) -> list[str]:
    """The MatMuls (not excluded, constant weight) whose input activation per-tensor symmetric INT8 rounds
    worst: relative error ||x - q(x)|| / ||x|| with the minmax scale, measured on the calibration pixels
    through the f32 `model` (pure_onnx form). Returns the readers of the worst `fraction` of those tensors."""
    targets = _smoothing_targets(model, set(exclude))
    names = list(targets)
    if not names or fraction <= 0:
        return []
    acts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for n, a in _intermediates(model, names, pixels, batch_size):
        acts[n].append(a.astype(np.float32).ravel())
    err = {}
    for n, parts in acts.items():
        x = np.concatenate(parts)
        s = max(float(np.abs(x).max()), 1e-12) / 127.0
        err[n] = float(np.linalg.norm(x - np.clip(np.rint(x / s), -127, 127) * s) / max(np.linalg.norm(x), 1e-12))
    k = max(1, int(round(fraction * len(names))))
    worst = sorted(names, key=err.get, reverse=True)[:k]
    return sorted(m.name for n in worst for m in targets[n])


def constant_weight_matmuls(model: onnx.ModelProto) -> list[str]:
    """Every MatMul with a constant weight (the weight-only rungs quantize them)."""
    inits = {i.name for i in model.graph.initializer}
    return sorted(n.name for n in model.graph.node if n.op_type == "MatMul" and _weight_slot(n, inits) is not None)


def weight_sensitivity(model: onnx.ModelProto, pixels: np.ndarray, batch_size: int = 1) -> dict[str, float]:
    """Per constant MatMul weight of an f32 pure_onnx encoder: the visual tokens' NMSE against f32 when that
    weight alone is rounded to int8 (per output channel, as weight_only_int8 stores it), on the calibration
    pixels. Returns {MatMul node name: NMSE} (MatMuls sharing a weight share its figure). The graph is serialized
    once; each rounded weight is swapped in through SessionOptions.add_initializer."""
    import onnxruntime as ort
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    readers: dict[str, list[str]] = {}
    rounded: dict[str, np.ndarray] = {}
    for n in model.graph.node:
        slot = _weight_slot(n, inits) if n.op_type == "MatMul" else None
        if slot is None:
            continue
        w_name = n.input[slot]
        readers.setdefault(w_name, []).append(n.name)
        if w_name not in rounded:
            w = numpy_helper.to_array(inits[w_name]).astype(np.float32)
            q, scale, axis = _int8_per_channel(w, slot)
            shape = [1] * w.ndim
            shape[axis] = -1
            rounded[w_name] = np.ascontiguousarray(q.astype(np.float32) * scale.reshape(shape))

    def tokens(sess) -> np.ndarray:
        return np.concatenate([sess.run(None, {"pixel_values": pixels[i:i + batch_size, None]})[0]
                               for i in range(0, len(pixels), batch_size)])

    graph = model.SerializeToString()       # an encoder is far below protobuf's 2 GiB (the large preset: ~1.2 GB)
    ref = tokens(ort.InferenceSession(graph, providers=["CPUExecutionProvider"]))
    power = max(float((ref.astype(np.float64) ** 2).mean()), 1e-30)
    out: dict[str, float] = {}
    for w_name, nodes in readers.items():
        so = ort.SessionOptions()
        value = ort.OrtValue.ortvalue_from_numpy(rounded[w_name])      # alive as long as the session
        so.add_initializer(w_name, value)
        got = tokens(ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"]))
        out.update({n: float(((got.astype(np.float64) - ref) ** 2).mean()) / power for n in nodes})
    return out


def float_for_budget(sensitivity: dict[str, float], budget: float) -> list[str]:
    """The MatMuls to leave float, most sensitive first, until the others' summed NMSE is within `budget`
    (single-weight NMSEs nearly add: the errors are small and independent)."""
    order = sorted(sensitivity, key=sensitivity.get, reverse=True)
    rest = sum(sensitivity.values())
    keep = []
    for n in order:
        if rest <= budget:
            break
        keep.append(n)
        rest -= sensitivity[n]
    return sorted(keep)


def mlp_down_nodes(model: onnx.ModelProto) -> list[str]:
    """The SwiGLU down projections (w3): MatMuls with a constant weight whose input is the gate product
    (a Mul). Their input is the widest-ranged activation in the block, the first to lose INT8 accuracy."""
    inits = {i.name for i in model.graph.initializer}
    prod = {o: n for n in model.graph.node for o in n.output}
    return sorted(n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits
                  and n.input[0] in prod and prod[n.input[0]].op_type == "Mul")


# Weights of the Q/DQ rungs (activations quantized too) use 7 of their 8 bits (ORT's reduce_range). ONNX Runtime's
# x86 integer GEMM on CPUs without AVX512-VNNI / AVX-VNNI (AVX2 laptops; a 2-core AVX2 EPYC CI machine) multiplies
# u8 x s8 pairs with VPMADDUBSW, which adds two products into a saturating int16: 2 x 255 x 127 overflows it,
# 2 x 255 x 64 does not. With full-range weights the tiny test checkpoint's percentile rung fell to held-out
# cosine 0.988 on such a CPU (a miss) and the ladder dropped every activation rung for weight-only; with 7-bit
# weights both pass there as on VNNI CPUs. A bundle exported on one machine runs on others, so the export does
# not guess the target CPU. The weight-only rungs (float activations) compute no integer GEMM and keep 8 bits.
REDUCE_RANGE = True

# The accuracy-aware order of INT8 encoder configurations (emrrg-export walks it until one passes the
# validation thresholds). The first four give the same file size; the last three leave some MatMuls in
# f32 (the SwiGLU down projections, then the quarter / half of the inputs INT8 rounds worst) for the
# checkpoints whose activations are hardest to quantize. The last rounds no activation: MatMul weights int8,
# except the few whose rounding alone moves the visual tokens most (weight_sensitivity), left float until the
# rest sum to WEIGHT_NMSE_BUDGET. A beam search flips on visual-token perturbations far below the token
# thresholds: on the demo's 168 test studies (its 4-bit decoder alone changed none of them) worst50-float (token
# NMSE 3.1e-5) changed 18 reports, every weight int8 (7.6e-5 with ORT's fused int8 activations) 19, a first cut of
# this rung (1.1e-6) 6, the only one within all three report bands (README, "Fidelity").
ENCODER_INT8_LADDER: tuple[dict, ...] = (
    {"name": "smoothquant-0.75", "smooth_alpha": 0.75},
    {"name": "smoothquant-0.5", "smooth_alpha": 0.5},
    {"name": "minmax-no-smoothquant", "smooth_alpha": None},
    {"name": "smoothquant-0.75-percentile", "smooth_alpha": 0.75, "method": "percentile"},
    {"name": "smoothquant-0.75-w3-float", "smooth_alpha": 0.75, "float_mlp_down": True},
    {"name": "smoothquant-0.75-worst25-float", "smooth_alpha": 0.75, "float_worst_inputs": 0.25},
    {"name": "smoothquant-0.75-worst50-float", "smooth_alpha": 0.75, "float_worst_inputs": 0.5},
    {"name": "weight-only-sensitive-float", "smooth_alpha": None, "weight_only": True,
     "weight_nmse_budget": WEIGHT_NMSE_BUDGET},
)


# ---------------------------------------------------------------------------------------------------
# Checks on the result
# ---------------------------------------------------------------------------------------------------

def check_int8_graph(model: onnx.ModelProto) -> dict:
    """The INT8 artifact's rules; raises QuantizationError. Returns Q/DQ and scan counts."""
    bad = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node
                  if n.domain == "com.microsoft" or n.op_type.startswith(_FORBIDDEN_PREFIX) or n.op_type in _FORBIDDEN_OPS})
    if bad:
        raise QuantizationError(f"ORT-only ops in the INT8 graph (TensorRT cannot take them): {', '.join(bad)}")
    inits = {i.name: i for i in model.graph.initializer}
    nonzero_zp = []
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2] in inits:
            zp = onnx.numpy_helper.to_array(inits[n.input[2]])
            if np.any(zp != 0) or zp.dtype != np.int8:
                nonzero_zp.append(n.name)
    if nonzero_zp:
        raise QuantizationError(f"{len(nonzero_zp)} Q/DQ nodes are not symmetric int8 (TensorRT needs zero point 0), "
                                f"e.g. {nonzero_zp[:3]}")
    dq_out = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    q_in = {i for n in model.graph.node if n.op_type == "QuantizeLinear" for i in n.input[:1]}
    scans = [n for n in model.graph.node if n.domain in (onnx_ops.DOMAIN, onnx_ops.PURE_DOMAIN)]
    for n in scans:
        # A scan input that is a DQ output is float (int8 only lives between Q and DQ); what must not happen
        # is the scan's own output being re-quantized as if the scan were an int8 op.
        if any(o in q_in for o in n.output):
            raise QuantizationError(f"the output of scan node {n.name} is quantized; SelectiveScan must stay float")
    return {"quantize_linear": sum(n.op_type == "QuantizeLinear" for n in model.graph.node),
            "dequantize_linear": sum(n.op_type == "DequantizeLinear" for n in model.graph.node),
            "scan_nodes": len(scans), "scan_inputs_from_dq": sum(i in dq_out for n in scans for i in n.input)}


# ---------------------------------------------------------------------------------------------------
# Quantization
# ---------------------------------------------------------------------------------------------------

def _same_graph_outside_scans(custom: onnx.ModelProto, pure: onnx.ModelProto) -> bool:
    def sig(m):
        return [(n.name, n.op_type if n.domain not in (onnx_ops.DOMAIN, onnx_ops.PURE_DOMAIN) else "scan",
                 tuple(n.input), tuple(n.output)) for n in m.graph.node]
    return sig(custom) == sig(pure)


def quantize_int8(f32_custom_op_onnx: str | os.PathLike, f32_pure_onnx: str | os.PathLike | None = None,
                  calib_images: Iterable | str | os.PathLike | None = None,
                  out_path: str | os.PathLike = "encoder.int8.onnx", *,
                  pure_out_path: str | os.PathLike | None = None, method: str = "minmax",
                  per_channel: bool = True, keep_scan_projections_float: bool = True,
                  nodes_to_exclude: Sequence[str] = (), op_types: Sequence[str] = QUANTIZED_OP_TYPES,
                  smooth_alpha: float | None = 0.75, weight_only_scan_projections: bool = True,
                  float_worst_inputs: float = 0.0, weight_only: bool = False, weight_nmse_budget: float = 0.0,
                  percentile: float = 99.999, batch_size: int = 1) -> dict:
    """Explicit Q/DQ INT8 of an exported f32 encoder (custom-op form), calibrated on X-rays.

    f32_custom_op_onnx: the export_encoder(variant="custom_op") file.
    f32_pure_onnx: its pure_onnx twin; None derives it (expand_scan_nodes). When given, it must be the same
        export (identical nodes and tensor names outside the scans), else QuantizationError.
    calib_images: a folder of DICOM/PNG/JPEG, a list of files, or None for emrrg.assets.real_xrays().
    out_path: the INT8 custom-op model; pure_out_path: also keep the INT8 pure_onnx model (runs without
        the op library).
    keep_scan_projections_float: leave x_proj / dt_proj (they feed softplus / exp in the recurrence) float.
    weight_only_scan_projections: ... but store their weights int8 (weight_only_int8: float activations).
    float_worst_inputs: leave float the MatMuls reading this fraction of activation tensors (after
        SmoothQuant) that per-tensor INT8 rounds worst on the calibration images (worst_int8_inputs).
    weight_only: no activation quantization at all: constant MatMul weights int8 (weight_only_int8), every
        activation float (smooth_alpha, method, float_worst_inputs and the exclusions do not apply).
    weight_nmse_budget: with weight_only, leave float the weights whose rounding alone moves the visual tokens
        most on the calibration images (weight_sensitivity) until the others' summed NMSE is within this;
        0 rounds every weight.
    smooth_alpha: SmoothQuant strength for the quantized MatMul inputs (smooth_activations); None: off.
        0.75 measured best of {0.5, 0.75, 0.9} on the base encoder, random and outlier-heavy inits alike.
    Returns {'path', 'pure_path', 'bytes', 'op_counts', 'checks', 'excluded_nodes', 'calibration': facts}.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"method must be one of {CALIBRATION_METHODS}, got {method!r}")
    t0 = time.perf_counter()
    custom = onnx.load(str(f32_custom_op_onnx))
    if get_metadata(custom).get(METADATA_VARIANT) != "custom_op" or not onnx_ops.count_scan_nodes(custom)["custom_op"]:
        raise QuantizationError(f"{f32_custom_op_onnx} is not a custom_op encoder export "
                                f"({METADATA_VARIANT}={get_metadata(custom).get(METADATA_VARIANT)!r})")
    if f32_pure_onnx is None:
        pure = onnx_ops.expand_scan_nodes(custom)
    else:
        pure = onnx.load(str(f32_pure_onnx))
        if not _same_graph_outside_scans(custom, pure):
            raise QuantizationError(f"{f32_pure_onnx} is not the pure_onnx twin of {f32_custom_op_onnx} "
                                    "(nodes or tensor names differ outside the scans); re-export both, or pass "
                                    "f32_pure_onnx=None to derive it")
    size = json.loads(get_metadata(custom)["emrrg.encoder_config"])["img_size"]
    pixels, facts = load_calibration_set(calib_images, size)

    if weight_only:
        return _weight_only_encoder(pure, pixels, weight_nmse_budget, batch_size, facts, out_path, pure_out_path, t0)
    smooth_info = None
    excluded = list(nodes_to_exclude)
    if keep_scan_projections_float:
        excluded += [n for n in scan_projection_nodes(pure) if n not in excluded]
    excluded += [n for n in depthwise_conv_nodes(pure) if n not in excluded]
    if smooth_alpha:
        pure, smooth_info = smooth_activations(pure, pixels, smooth_alpha, excluded, batch_size)
    worst = []
    if float_worst_inputs:
        worst = [n for n in worst_int8_inputs(pure, pixels, excluded, float_worst_inputs, batch_size) if n not in excluded]
        excluded += worst
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    extra = {
        "ActivationSymmetric": True,   # zero point 0: TensorRT's explicit INT8 takes symmetric activations only
        "WeightSymmetric": True,
        "QuantizeBias": False,         # biases stay float (TensorRT fuses them; no int32 DQ to parse)
        "AddQDQPairToWeight": False,   # int8 weight initializers + DequantizeLinear (a quarter of the bytes)
        # Q/DQ only on the inputs of MatMul/Gemm/Conv: their outputs feed float ops (residual adds, splits, the
        # scan), so re-quantizing them would only add rounding; TensorRT places Q/DQ at layer inputs too.
        "OpTypesToExcludeOutputQuantization": list(op_types),
    }
    if method == "percentile":
        extra["CalibPercentile"] = percentile
    with tempfile.TemporaryDirectory(prefix="emrrg-int8-") as tmp:
        pure_f32 = Path(tmp) / "pure_f32.onnx"
        pure_q = Path(tmp) / "pure_int8.onnx"
        save_onnx(pure, pure_f32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import logging
            root = logging.getLogger()
            level = root.level
            root.setLevel(logging.ERROR)  # ORT logs "consider pre-processing" through the root logger
            try:  # the calibrator print()s its progress ("Collecting tensor data ..."): stderr with -v, else nowhere
                with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sys.stderr if logs.verbose() else sink):
                    quantize_static(str(pure_f32), str(pure_q), _Reader(pixels, batch_size),
                                    quant_format=QuantFormat.QDQ, op_types_to_quantize=list(op_types),
                                    per_channel=per_channel, reduce_range=REDUCE_RANGE,
                                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                                    nodes_to_exclude=excluded, calibrate_method=methods[method],
                                    use_external_data_format=pure.ByteSize() > 2**30, extra_options=extra)
            finally:
                root.setLevel(level)
        q_pure = onnx.load(str(pure_q))
    woq = None
    if keep_scan_projections_float and weight_only_scan_projections:
        woq = weight_only_int8(q_pure, scan_projection_nodes(q_pure))
    q_custom = onnx_ops.collapse_scan_functions(q_pure)

    facts.update({"method": method, "percentile": percentile if method == "percentile" else None,
                  "per_channel_weights": per_channel, "activations": "int8 symmetric, per tensor",
                  "weights": "int8 symmetric" + (", 7-bit range" if REDUCE_RANGE else "")
                             + (", per output channel" if per_channel else ", per tensor"),
                  "op_types": list(op_types), "float_nodes": len(excluded),
                  "keep_scan_projections_float": keep_scan_projections_float, "smoothquant": smooth_info,
                  "scan_projections_weight_only_int8": woq, "float_worst_inputs": worst,
                  "calibrated_graph": "pure_onnx twin (ORT's calibrator cannot load the op library)",
                  "onnxruntime": __import__("onnxruntime").__version__})
    return _save_int8(q_custom, q_pure, facts, excluded, out_path, pure_out_path, t0, "int8-qdq")


def _weight_only_encoder(pure: onnx.ModelProto, pixels: np.ndarray, budget: float, batch_size: int, facts: dict,
                         out_path, pure_out_path, t0: float) -> dict:
    """quantize_int8(weight_only=True): int8 MatMul weights, float activations; with a budget, the most
    sensitive weights stay float."""
    keep: list[str] = []
    sens = None
    if budget > 0:
        sens = weight_sensitivity(pure, pixels, batch_size)
        keep = float_for_budget(sens, budget)
    woq = weight_only_int8(pure, [n for n in constant_weight_matmuls(pure) if n not in keep])
    facts.update({"method": "weight-only", "per_channel_weights": True, "activations": "float (not quantized)",
                  "weights": "int8 symmetric, per output channel", "op_types": ["MatMul"], "float_nodes": len(keep),
                  "weight_only_int8": woq, "smoothquant": None, "weight_nmse_budget": budget,
                  "float_sensitive": keep,
                  "weight_nmse_sum": None if sens is None else sum(v for k, v in sens.items() if k not in keep),
                  "calibrated_graph": "pure_onnx twin (weight sensitivity)" if sens else "none (weight-only)",
                  "onnxruntime": __import__("onnxruntime").__version__})
    return _save_int8(onnx_ops.collapse_scan_functions(pure), pure, facts, keep, out_path, pure_out_path, t0,
                      "int8-weight-only")


def _save_int8(q_custom: onnx.ModelProto, q_pure: onnx.ModelProto, facts: dict, excluded: list, out_path,
               pure_out_path, t0: float, precision: str) -> dict:
    meta = {METADATA_VARIANT: "custom_op", "emrrg.precision": precision,
            "emrrg.calibration": json.dumps({k: v for k, v in facts.items() if k != "images"}, sort_keys=True)}
    info = {"calibration": facts, "excluded_nodes": excluded}
    for model, path, variant in ((q_custom, out_path, "custom_op"), (q_pure, pure_out_path, "pure_onnx")):
        checks = check_int8_graph(model)
        if path is None:
            continue
        set_metadata(model, {**meta, METADATA_VARIANT: variant})
        saved = save_model(model, path)
        key = "" if variant == "custom_op" else "pure_"
        info.update({f"{key}path": str(path), f"{key}bytes": saved["bytes"], f"{key}checks": checks,
                     f"{key}op_counts": op_counts(model)})
    info.setdefault("pure_path", None)
    info["quantize_s"] = round(time.perf_counter() - t0, 2)
    return info


__all__ = [
    "CalibrationError", "QuantizationError", "IMAGE_SUFFIXES", "QUANTIZED_OP_TYPES", "CALIBRATION_METHODS",
    "list_calibration_images", "load_calibration_set", "scan_projection_nodes", "depthwise_conv_nodes",
    "smooth_activations", "weight_only_int8", "constant_weight_matmuls", "weight_sensitivity",
    "float_for_budget", "mlp_down_nodes", "worst_int8_inputs", "ENCODER_INT8_LADDER",
    "check_int8_graph", "quantize_int8",
]
