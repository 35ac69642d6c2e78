"""One builder of ONNX Runtime session options for the sessions emrrg makes. Torch-free.

The runtime's sessions (Runtime.from_pretrained), the encoder export's validation sessions
(emrrg.export.encoder_onnx.make_session), the decoder export's (emrrg.export.decoder_onnx.ort_session) and
the TensorRT backend's CPU reference differ only in these arguments.
"""
from __future__ import annotations

import os

# ONNX Runtime severities: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal. The graphs are emrrg's own and
# checked by it, so its warnings (unused initializers, pre-processing hints) are noise: errors only.
LOG_SEVERITY = 3
OPTIMIZATION_LEVELS = ("all", "basic", "none")


def session_options(threads: int | None = None, *, inter_op_threads: int | None = None,
                    oplib: bool | str | os.PathLike | None = None, optimization: str = "all",
                    log_severity: int = LOG_SEVERITY, cpu_mem_arena: bool = True):
    """An onnxruntime.SessionOptions.

    threads / inter_op_threads: ORT's intra- / inter-op thread counts (None or 0: ORT's default).
    oplib: True registers the op library that emrrg.runtime.oplib finds (OpLibraryMissingError, naming the
    build command, when there is none); a path registers that file; None / False registers nothing.
    optimization: the graph optimization level, one of OPTIMIZATION_LEVELS ("all" is ORT's default).
    cpu_mem_arena: ORT's CPU memory arena (its default, on). The arena keeps freed blocks and grows in chunks:
    faster allocation, more resident memory.
    """
    import onnxruntime as ort

    from emrrg.runtime.oplib import register

    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
    if optimization not in levels:
        raise ValueError(f"optimization must be one of {OPTIMIZATION_LEVELS}, got {optimization!r}")
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    if inter_op_threads:
        so.inter_op_num_threads = inter_op_threads
    so.log_severity_level = log_severity
    so.graph_optimization_level = levels[optimization]
    so.enable_cpu_mem_arena = cpu_mem_arena
    # ORT's CPU fuses DequantizeLinear(int8 weight) -> MatMul into MatMulNBits, computing at accuracy level 4
    # (int8 activations) unless told otherwise: a weight-only INT8 encoder's float activations would be rounded
    # after all (token NMSE 1.5e-5 -> 7.6e-5 on the demo encoder). Level 1 keeps the graph's float arithmetic.
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    if oplib is True:
        register(so)
    elif oplib:
        register(so, oplib)
    return so
