"""com.emrrg::BlockSumMatMulAdd (libemrrg_ops.so) and its standard-ONNX function body against float64 numpy.

Y = A + BlockSum(X) @ C, the affine 4-bit decoder's block-offset correction (plugins/selective_scan/
blockSumMatMulAddOp.h, export/decoder_builder.blocksum_function). The same one-node model runs twice: with the
library registered (the kernel) and without (ONNX Runtime inlines the model-local function); both must match
the float64 truth and each other.

Tolerance: REL_TOL_F32 x (|A| + sum_b |S_b| |C_b|) per element, i.e. relative to the magnitudes summed. Both
paths accumulate in f32 over at most K + nb terms in a different order (the kernel: vector lanes, fused
multiply-adds; ORT: its GEMM); f32 rounding of such a sum is bounded by ~(K + nb) * 2^-24 ~ 1e-4 for K = 1536,
and the measured worst case is ~4e-7. A wrong block, column or row moves an element by O(1) of that scale.
"""
import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from emrrg.export.decoder_builder import blocksum_function
from emrrg.export.decoder_onnx import OPSET
from emrrg.runtime import oplib

LIB = oplib.find_op_library()
needs_lib = pytest.mark.skipif(LIB is None, reason="libemrrg_ops.so not built (bash scripts/build_plugins.sh)")
REL_TOL_F32 = 1e-5


def one_node_model(N: int, K: int, bs: int, c: np.ndarray, rank: int = 3) -> bytes:
    lead = ["b", "t"][:rank - 1]
    node = helper.make_node(oplib.BLOCKSUM_OP_TYPE, ["a", "x", "C"], ["y"], domain=oplib.OP_DOMAIN, block_size=bs)
    g = helper.make_graph([node], "blocksum", [helper.make_tensor_value_info("a", 1, lead + [N]),
                                               helper.make_tensor_value_info("x", 1, lead + [K])],
                          [helper.make_tensor_value_info("y", 1, lead + [N])], [numpy_helper.from_array(c, "C")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET),
                                            helper.make_opsetid(oplib.OP_DOMAIN, oplib.OP_VERSION)],
                          functions=[blocksum_function()])
    m.ir_version = 10
    return m.SerializeToString()


def run(model: bytes, feeds: dict, with_lib: bool, threads: int = 1) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = threads, 3
    if with_lib:
        oplib.register(so, LIB)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def truth(a, x, c, bs):
    K = x.shape[-1]
    nb = -(-K // bs)
    xp = np.zeros(x.shape[:-1] + (nb * bs,), np.float64)
    xp[..., :K] = x
    s = xp.reshape(x.shape[:-1] + (nb, bs)).sum(-1)
    c64 = c.astype(np.float64)
    return a + s @ c64, np.abs(a) + np.abs(s) @ np.abs(c64)


def check(got, a, x, c, bs, what):
    want, scale = truth(a, x, c, bs)
    err = float((np.abs(got - want) / scale).max())
    print(f"{what}: max error {err:.2e} x magnitude")
    assert got.shape == want.shape and err <= REL_TOL_F32, what


# (rows B x T, K, N): one decode row; a prefill (tiles over threads); N not a multiple of the 64-column tile;
# SmolLM2's down_proj shape (K = 1536: 48 blocks)
CASES = [(1, 1, 576, 960), (1, 37, 576, 3072), (2, 5, 64, 100), (1, 1, 1536, 576), (1, 9, 1536, 576)]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("B,T,K,N", CASES)
@pytest.mark.parametrize("with_lib", [pytest.param(True, marks=needs_lib), False], ids=["op", "function_body"])
def test_matches_float64(with_lib, B, T, K, N, dtype):
    rng = np.random.default_rng(B * 1000 + T * 10 + K + N)
    bs = 32
    a = rng.standard_normal((B, T, N)).astype(np.float32)
    x = rng.standard_normal((B, T, K)).astype(np.float32)
    c = (rng.standard_normal((K // bs, N)) * 0.1).astype(dtype)
    got = run(one_node_model(N, K, bs, c), {"a": a, "x": x}, with_lib, threads=2)
    check(got, a, x, c, bs, f"{'op' if with_lib else 'body'} {B}x{T} K={K} N={N} C {np.dtype(dtype).name}")


@needs_lib
def test_op_takes_any_rank_and_partial_last_block():
    """The kernel (not the function body, which the builder uses only for rank 3 and K % bs == 0) also takes
    rank-2 inputs and a last block shorter than block_size."""
    rng = np.random.default_rng(7)
    K, N, bs = 80, 70, 32                                      # blocks of 32, 32, 16
    a, x = rng.standard_normal((4, N)).astype(np.float32), rng.standard_normal((4, K)).astype(np.float32)
    c = rng.standard_normal((3, N)).astype(np.float32)
    check(run(one_node_model(N, K, bs, c, rank=2), {"a": a, "x": x}, True), a, x, c, bs, "rank 2, partial block")


@needs_lib
def test_op_and_body_agree_inside_a_graph():
    """Two chained nodes (the second reads the first's output as A, as the in-place hint allows): the
    kernel and the inlined body give the same Y."""
    rng = np.random.default_rng(8)
    K, N, bs = 128, 96, 32
    c1, c2 = (rng.standard_normal((K // bs, N)).astype(np.float32) for _ in range(2))
    nodes = [helper.make_node(oplib.BLOCKSUM_OP_TYPE, ["a", "x", "C1"], ["y1"], domain=oplib.OP_DOMAIN, block_size=bs),
             helper.make_node(oplib.BLOCKSUM_OP_TYPE, ["y1", "x", "C2"], ["y"], domain=oplib.OP_DOMAIN, block_size=bs)]
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("a", 1, ["b", "t", N]),
                                           helper.make_tensor_value_info("x", 1, ["b", "t", K])],
                          [helper.make_tensor_value_info("y", 1, ["b", "t", N])],
                          [numpy_helper.from_array(c1, "C1"), numpy_helper.from_array(c2, "C2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET),
                                            helper.make_opsetid(oplib.OP_DOMAIN, oplib.OP_VERSION)],
                          functions=[blocksum_function()])
    m.ir_version = 10
    feeds = {"a": rng.standard_normal((1, 3, N)).astype(np.float32), "x": rng.standard_normal((1, 3, K)).astype(np.float32)}
    op, body = run(m.SerializeToString(), feeds, True), run(m.SerializeToString(), feeds, False)
    check(op, feeds["a"], feeds["x"], c1.astype(np.float64) + c2, bs, "chained op")
    check(body, feeds["a"], feeds["x"], c1.astype(np.float64) + c2, bs, "chained body")


@needs_lib
def test_wrong_offset_shape_is_one_clear_error():
    rng = np.random.default_rng(9)
    model = one_node_model(64, 128, 32, rng.standard_normal((3, 64)).astype(np.float32))   # needs (4, 64)
    feeds = {"a": np.zeros((1, 1, 64), np.float32), "x": np.zeros((1, 1, 128), np.float32)}
    with pytest.raises(Exception, match=r"BlockSumMatMulAdd: C must be \(ceil\(K/block_size\)=4, N=64\), got \(3, 64\)"):
        run(model, feeds, True)
