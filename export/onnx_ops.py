"""SelectiveScan in ONNX: the `com.emrrg::SelectiveScan` node, its torch custom op, and a standard-ONNX body.

The scan of the MambaXray-VL mixer (the contract: emrrg/ops/scan_contract.py) reaches ONNX in one
of two forms, and both come from one torch export:

1. **custom_op** -- one `com.emrrg::SelectiveScan` v1 node per layer (the four directions fused, G=4).
   ONNX Runtime runs it with the op library (`bash scripts/build_plugins.sh`), TensorRT with the
   `SelectiveScan` plugin; the node carries `plugin_version "1"` and `plugin_namespace "emrrg"`, the
   attributes TensorRT's ONNX parser uses to find a plugin for a node it does not know.

       torch:  ARMMixer.scan_fn = torch.ops.emrrg.selective_scan   (scan_as_custom_op)
       export: custom_translation_table -> onnxscript Opset("com.emrrg", 1).SelectiveScan(...)
       check:  an onnx.defs.OpSchema for com.emrrg::SelectiveScan is registered (register_schema)

2. **pure_onnx** -- the same graph, with every SelectiveScan node turned into a call of a model-local
   ONNX function (`com.emrrg.pure`) whose body is standard ONNX: the element-wise prologue, one ONNX
   `Scan` over L, and the epilogue. The body is exported by the dynamo exporter from
   `selective_scan_onnx_scan`, which uses `torch._higher_order_ops.scan`; that exports an ONNX `Scan`
   whose trip count is the runtime L. (A Python loop exported with dynamo is unrolled and silently fixed
   to the traced L.) Runs in a plain ONNX Runtime with no library; slower.

       custom_op model --expand_scan_nodes-->  pure_onnx model
       pure_onnx model --collapse_scan_functions-->  custom_op model   (exact inverse)

   Every tensor outside the scans keeps its name, by construction, so a graph quantized in its
   pure_onnx form (where ORT's calibrator can run it) collapses back to the custom-op form
   (emrrg.export.quantize_encoder).

Inputs of the node (index: name, shape, dtype); T = float | float16:

    0 u (b, D, L) T    1 delta (b, D, L) T    2 A (D, N) f32    3 B (b, G, N, L) T    4 C (b, G, N, L) T
    5 D (D,) f32 opt   6 z (b, D, L) T opt    7 delta_bias (D,) f32 opt            -> y (b, D, L) T
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator, Optional

import onnx
import onnx.helper as oh
import torch
import torch.nn as nn
from onnx.defs import OpSchema

from emrrg.ops.scan_contract import epilogue, prologue
from emrrg.ops.selective_scan import selective_scan_ref

from emrrg.export.errors import ExportError

DOMAIN = "com.emrrg"
OP_TYPE = "SelectiveScan"
OP_VERSION = 1
PLUGIN_VERSION = "1"        # TensorRT plugin lookup: IPluginCreatorV3One version
PLUGIN_NAMESPACE = "emrrg"  # ... and namespace (plugins/selective_scan/selectiveScanPlugin.h)
PURE_DOMAIN = "com.emrrg.pure"  # domain of the model-local standard-ONNX scan functions
INPUT_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
DEFAULT_OPSET = 18  # the dynamo exporter's well-trodden opset; TensorRT 10.3 (JetPack 6) parses it


class ScanExportError(ExportError):
    """A SelectiveScan node cannot be converted between its custom-op and standard-ONNX forms."""


# ---------------------------------------------------------------------------------------------------
# 1. The ONNX schema
# ---------------------------------------------------------------------------------------------------

def register_schema() -> None:
    """Register com.emrrg::SelectiveScan v1 with onnx (idempotent).

    Without it, `onnxscript.values.Opset("com.emrrg", 1).SelectiveScan` has no signature to bind the
    optional inputs and attributes to, and onnx.checker cannot validate the node's attributes.
    """
    if onnx.defs.has(OP_TYPE, DOMAIN):
        return
    fp, opt = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    schema = OpSchema(
        OP_TYPE, DOMAIN, OP_VERSION,
        doc="Mamba selective scan with real A and grouped B/C (mamba-ssm selective_scan_ref semantics); "
            "channel d uses group d // (D / G). See emrrg/ops/scan_contract.py.",
        inputs=[
            fp("u", "T", "(batch, D, L)"),
            fp("delta", "T", "(batch, D, L)"),
            fp("A", "tensor(float)", "(D, N), real and negative"),
            fp("B", "T", "(batch, G, N, L)"),
            fp("C", "T", "(batch, G, N, L)"),
            fp("D", "tensor(float)", "(D,) skip weight", param_option=opt),
            fp("z", "T", "(batch, D, L) gate: y *= silu(z)", param_option=opt),
            fp("delta_bias", "tensor(float)", "(D,) added to delta before the softplus", param_option=opt),
        ],
        outputs=[fp("y", "T", "(batch, D, L)")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "activations; the state accumulates in f32")],
        attributes=[
            OpSchema.Attribute("delta_softplus", oh.make_attribute("delta_softplus", 1), "1: delta = softplus(delta + delta_bias)"),
            OpSchema.Attribute("plugin_version", OpSchema.AttrType.STRING, "TensorRT plugin version ('1')", required=False),
            OpSchema.Attribute("plugin_namespace", OpSchema.AttrType.STRING, "TensorRT plugin namespace ('emrrg')", required=False),
        ],
    )
    onnx.defs.register_schema(schema)


register_schema()


# ---------------------------------------------------------------------------------------------------
# 2. The torch custom op and its translation
# ---------------------------------------------------------------------------------------------------

@torch.library.custom_op("emrrg::selective_scan", mutates_args=())
def selective_scan_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                      D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                      delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = True) -> torch.Tensor:
    """Opaque to torch.export: eager runs the f32 reference, export sees one call."""
    return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


@selective_scan_op.register_fake
def _selective_scan_fake(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True):
    return torch.empty_like(u)  # y: (b, D, L), like u


def _onnx_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus: bool = True):
    """Translation of torch.ops.emrrg.selective_scan for the dynamo exporter (onnxscript, traced)."""
    import onnxscript

    emrrg = onnxscript.values.Opset(DOMAIN, OP_VERSION)
    return emrrg.SelectiveScan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=int(bool(delta_softplus)),
                               plugin_version=PLUGIN_VERSION, plugin_namespace=PLUGIN_NAMESPACE)


def custom_translation_table() -> dict:
    """`torch.onnx.export(..., custom_translation_table=...)` entry for the SelectiveScan custom op."""
    register_schema()
    return {torch.ops.emrrg.selective_scan.default: _onnx_selective_scan}


def _mixers(module: nn.Module) -> list[nn.Module]:
    from emrrg.mixer import ARMMixer

    mixers = [m for m in module.modules() if isinstance(m, ARMMixer)]
    if not mixers:
        raise ScanExportError(f"{type(module).__name__} holds no ARMMixer; nothing to export as SelectiveScan")
    return mixers


@contextlib.contextmanager
def scan_as_custom_op(module: nn.Module) -> Iterator[nn.Module]:
    """Export-only rewrite: every ARMMixer.scan_fn becomes torch.ops.emrrg.selective_scan.

    Avoids: torch.export tracing `selective_scan_ref`'s Python loop over L, which the dynamo exporter
    unrolls into L steps per layer (197 x 12 for base, minutes to export, a huge graph) and silently fixes
    to the traced L; and `selective_scan`'s mamba-ssm CUDA branch, which torch.export cannot trace at all.
    The custom op is one opaque call that becomes one com.emrrg::SelectiveScan node.
    """
    mixers = _mixers(module)
    saved = [m.scan_fn for m in mixers]
    try:
        for m in mixers:
            m.scan_fn = torch.ops.emrrg.selective_scan
        yield module
    finally:
        for m, fn in zip(mixers, saved):
            m.scan_fn = fn


# ---------------------------------------------------------------------------------------------------
# 3. The standard-ONNX scan (pure_onnx fallback)
# ---------------------------------------------------------------------------------------------------

def selective_scan_onnx_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus: bool = True):
    """selective_scan_ref's arithmetic with torch._higher_order_ops.scan instead of a Python loop.

    Exports to an ONNX `Scan` with a dynamic trip count. Layout: the scanned axis comes first so no large
    tensor is transposed ((L, b, D, N) is built by broadcasting), and the C contraction stays inside the
    step (one (b, D) output per step instead of the (L, b, D, N) states). f32 throughout.
    """
    from torch._higher_order_ops.scan import scan

    b, d, L = u.shape
    g, n = B.shape[1], B.shape[2]
    dpg = d // g
    dtype_in = u.dtype
    u, delta = prologue(u, delta, delta_bias, delta_softplus)
    A = A.float()
    dl = delta.permute(2, 0, 1)                                          # (L, b, D)
    dA = torch.exp(dl.unsqueeze(-1) * A)                                 # (L, b, D, N)
    Bt = B.float().permute(3, 0, 1, 2).unsqueeze(3)                      # (L, b, G, 1, N)
    Ct = C.float().permute(3, 0, 1, 2).unsqueeze(3)                      # (L, b, G, 1, N)
    dBu = ((dl * u.permute(2, 0, 1)).unflatten(2, (g, dpg)).unsqueeze(-1) * Bt).flatten(2, 3)  # (L, b, D, N)

    def step(h, x):                                                      # h: (b, D, N)
        a_t, bu_t, c_t = x                                               # (b, D, N), (b, D, N), (b, G, 1, N)
        h = a_t * h + bu_t
        return h, (h.unflatten(1, (g, dpg)) * c_t).sum(-1).flatten(1)    # (b, D)

    _, ys = scan(step, torch.zeros_like(dBu[0]), (dA, dBu, Ct))          # ys: (L, b, D)
    y = ys.permute(1, 2, 0)                                              # (b, D, L)
    return epilogue(y, u, D, z, dtype_in)


class _ScanBody(nn.Module):
    def __init__(self, delta_softplus: bool):
        super().__init__()
        self.delta_softplus = delta_softplus

    def forward(self, u, delta, A, B, C, D, z, delta_bias):
        return selective_scan_onnx_scan(u, delta, A, B, C, D, z, delta_bias, self.delta_softplus)


def _function_name(d: int, n: int, g: int, delta_softplus: int) -> str:
    return f"{OP_TYPE}_D{d}_N{n}_G{g}_softplus{delta_softplus}"


@functools.lru_cache(maxsize=8)
def scan_function(d: int, n: int, g: int, delta_softplus: int = 1, opset: int = DEFAULT_OPSET) -> onnx.FunctionProto:
    """A model-local ONNX function `com.emrrg.pure::SelectiveScan_D.._N.._G.._softplus.` (8 inputs -> y).

    Exported once per (D, N, G) by the dynamo exporter from `selective_scan_onnx_scan`, with batch and L
    dynamic; its initializers become Constant nodes (a FunctionProto has none).
    """
    import warnings

    bsz, L = 2, 9  # not 0/1: torch.export would specialise those sizes
    gen = torch.Generator().manual_seed(0)
    args = (torch.randn(bsz, d, L, generator=gen), torch.randn(bsz, d, L, generator=gen),
            -torch.rand(d, n, generator=gen) - 0.5, torch.randn(bsz, g, n, L, generator=gen),
            torch.randn(bsz, g, n, L, generator=gen), torch.randn(d, generator=gen),
            torch.randn(bsz, d, L, generator=gen), torch.randn(d, generator=gen))
    batch, length = torch.export.Dim("batch"), torch.export.Dim("L", min=2)
    dyn = {"u": {0: batch, 2: length}, "delta": {0: batch, 2: length}, "A": {}, "B": {0: batch, 3: length},
           "C": {0: batch, 3: length}, "D": {}, "z": {0: batch, 2: length}, "delta_bias": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(_ScanBody(bool(delta_softplus)), args, dynamo=True, dynamic_shapes=dyn,
                                 opset_version=opset, input_names=list(INPUT_NAMES), output_names=["y"], verbose=False)
    model = prog.model_proto
    ops = [nd.op_type for nd in model.graph.node]
    if ops.count("Scan") != 1 or "Loop" in ops:
        raise ScanExportError("the standard-ONNX scan body did not export as exactly one ONNX Scan")
    consts = [oh.make_node("Constant", [], [init.name], name=f"const_{init.name}", value=init)
              for init in model.graph.initializer]
    nodes = []
    for nd in list(consts) + list(model.graph.node):
        nd = onnx.NodeProto.FromString(nd.SerializeToString())
        del nd.metadata_props[:]
        nodes.append(nd)
    return oh.make_function(
        PURE_DOMAIN, _function_name(d, n, g, delta_softplus), list(INPUT_NAMES), ["y"], nodes,
        opset_imports=[oh.make_opsetid(op.domain, op.version) for op in model.opset_import],
        doc_string="com.emrrg::SelectiveScan as standard ONNX (one Scan over L; batch and L dynamic)")


# ---------------------------------------------------------------------------------------------------
# 4. custom_op <-> pure_onnx
# ---------------------------------------------------------------------------------------------------

def _shapes(model: onnx.ModelProto) -> dict[str, list]:
    infos = list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)
    if not model.graph.value_info:
        infos += list(onnx.shape_inference.infer_shapes(model).graph.value_info)
    out = {}
    for vi in infos:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else d.dim_param or None
                            for d in vi.type.tensor_type.shape.dim]
    for init in model.graph.initializer:
        out[init.name] = list(init.dims)
    return out


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return oh.get_attribute_value(a)
    return default


def _set_opset(model: onnx.ModelProto, domain: str, version: int | None) -> None:
    keep = [op for op in model.opset_import if op.domain != domain]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    if version is not None:
        model.opset_import.append(oh.make_opsetid(domain, version))


def expand_scan_nodes(model: onnx.ModelProto, opset: int | None = None) -> onnx.ModelProto:
    """custom_op -> pure_onnx: each com.emrrg::SelectiveScan node becomes a com.emrrg.pure function call.

    The node keeps its name, inputs and outputs (so every other tensor keeps its name); the function
    body (standard ONNX, one Scan) is added to model.functions once per (D, N, G, softplus).
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    if opset is None:
        opset = next((op.version for op in model.opset_import if op.domain in ("", "ai.onnx")), DEFAULT_OPSET)
    shapes = _shapes(model)
    functions: dict[str, onnx.FunctionProto] = {}
    for nd in model.graph.node:
        if not (nd.domain == DOMAIN and nd.op_type == OP_TYPE):
            continue
        if len(nd.input) != 8 or not all(nd.input):
            raise ScanExportError(f"node {nd.name}: the standard-ONNX scan needs all 8 inputs "
                                  f"(u, delta, A, B, C, D, z, delta_bias), got {list(nd.input)}")
        b_shape, a_shape = shapes.get(nd.input[3]), shapes.get(nd.input[2])
        if not b_shape or len(b_shape) != 4 or not a_shape or len(a_shape) != 2 or \
                not all(isinstance(x, int) for x in (a_shape[0], a_shape[1], b_shape[1])):
            raise ScanExportError(f"node {nd.name}: static D, N and G are needed to build the scan body; "
                                  f"A has shape {a_shape}, B has shape {b_shape}")
        d, n, g = a_shape[0], a_shape[1], b_shape[1]
        softplus = int(_attr(nd, "delta_softplus", 1))
        fn = scan_function(d, n, g, softplus, opset)
        functions.setdefault(fn.name, fn)
        nd.domain, nd.op_type = PURE_DOMAIN, fn.name
        del nd.attribute[:]
    if not functions:
        raise ScanExportError(f"the model holds no {DOMAIN}::{OP_TYPE} node to expand")
    model.functions.extend(functions.values())
    _set_opset(model, DOMAIN, None)
    _set_opset(model, PURE_DOMAIN, 1)
    return model


def collapse_scan_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """pure_onnx -> custom_op: each com.emrrg.pure scan-function call becomes a com.emrrg::SelectiveScan node.

    The inverse of expand_scan_nodes; the call's current inputs are kept (a quantizer may have renamed them).
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    fns = {f.name: f for f in model.functions if f.domain == PURE_DOMAIN}
    count = 0
    for nd in model.graph.node:
        if nd.domain != PURE_DOMAIN:
            continue
        if nd.op_type not in fns:
            raise ScanExportError(f"node {nd.name} calls {PURE_DOMAIN}::{nd.op_type}, which the model does not define")
        softplus = int(nd.op_type.rsplit("softplus", 1)[-1])
        nd.domain, nd.op_type = DOMAIN, OP_TYPE
        del nd.attribute[:]
        nd.attribute.extend([oh.make_attribute("delta_softplus", softplus),
                             oh.make_attribute("plugin_version", PLUGIN_VERSION),
                             oh.make_attribute("plugin_namespace", PLUGIN_NAMESPACE)])
        count += 1
    if not count:
        raise ScanExportError(f"the model holds no {PURE_DOMAIN} scan-function call to collapse")
    keep = [f for f in model.functions if f.domain != PURE_DOMAIN]
    del model.functions[:]
    model.functions.extend(keep)
    _set_opset(model, PURE_DOMAIN, None)
    _set_opset(model, DOMAIN, OP_VERSION)
    return model


def count_scan_nodes(model: onnx.ModelProto) -> dict[str, int]:
    """{'custom_op': #SelectiveScan nodes, 'pure_onnx': #scan-function calls}."""
    nodes = model.graph.node
    return {"custom_op": sum(nd.domain == DOMAIN and nd.op_type == OP_TYPE for nd in nodes),
            "pure_onnx": sum(nd.domain == PURE_DOMAIN for nd in nodes)}


__all__ = [
    "DOMAIN", "OP_TYPE", "OP_VERSION", "PLUGIN_VERSION", "PLUGIN_NAMESPACE", "PURE_DOMAIN", "DEFAULT_OPSET",
    "ScanExportError", "register_schema", "selective_scan_op", "custom_translation_table", "scan_as_custom_op",
    "selective_scan_onnx_scan", "scan_function", "expand_scan_nodes", "collapse_scan_functions", "count_scan_nodes",
]
