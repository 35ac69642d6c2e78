"""decoder_onnx.probe_session: intermediate tensors as extra outputs of a real ORT session, model left unchanged."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from emrrg.export import decoder_onnx
from emrrg.export.decoder_onnx import probe_session

WIDTH = 512   # 2 KiB of f32 weights: above save_onnx's 1 KiB per-tensor threshold, so external data really is used


def _model() -> onnx.ModelProto:
    """y = relu(x + c) * 2, with the intermediates a = x + c and b = relu(a)."""
    c = numpy_helper.from_array(np.linspace(-1, 1, WIDTH, dtype=np.float32), "c")
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    nodes = [helper.make_node("Add", ["x", "c"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Mul", ["b", "two"], ["y"])]
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, WIDTH])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, WIDTH])], [c, two])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("external", [False, True])
def test_probe_reads_intermediates_and_leaves_the_model(external, monkeypatch):
    if external:
        monkeypatch.setattr(decoder_onnx, "EXTERNAL_DATA_ABOVE_BYTES", 0)
    model = _model()
    before = model.SerializeToString()
    x = np.random.default_rng(0).standard_normal((3, WIDTH)).astype(np.float32)
    with probe_session(model, ["a", "b", "y", "a"], threads=1) as sess:   # y is an output already; a twice
        assert model.SerializeToString() == before                      # restored before the session opens
        assert [o.name for o in sess.get_outputs()] == ["y", "a", "b"]
        a, b, y = sess.run(["a", "b", "y"], {"x": x})
    c = np.linspace(-1, 1, WIDTH, dtype=np.float32)
    np.testing.assert_array_equal(a, x + c)
    np.testing.assert_array_equal(b, np.maximum(x + c, 0))
    np.testing.assert_array_equal(y, np.maximum(x + c, 0) * 2)
    assert model.SerializeToString() == before


def test_probe_without_keeping_the_model_leaves_its_weights_out(monkeypatch):
    from onnx.external_data_helper import uses_external_data

    monkeypatch.setattr(decoder_onnx, "EXTERNAL_DATA_ABOVE_BYTES", 0)
    model = _model()
    x = np.ones((1, WIDTH), np.float32)
    with probe_session(model, ["a"], threads=1, keep_model=False) as sess:
        a, = sess.run(["a"], {"x": x})
    np.testing.assert_array_equal(a, x + np.linspace(-1, 1, WIDTH, dtype=np.float32))
    assert [o.name for o in model.graph.output] == ["y"]
    assert uses_external_data(model.graph.initializer[0]) and not model.graph.initializer[0].raw_data


def test_probe_of_a_missing_tensor_fails_and_restores(monkeypatch):
    model = _model()
    before = model.SerializeToString()
    with pytest.raises(Exception, match="nope"):
        with probe_session(model, ["nope"], threads=1):
            pass
    assert model.SerializeToString() == before
