"""emrrg.runtime.sessions.session_options: the one builder of ONNX Runtime session options."""
import onnxruntime as ort
import pytest

from emrrg.runtime import oplib
from emrrg.runtime.sessions import LOG_SEVERITY, session_options


def test_options_carry_the_arguments():
    so = session_options(3, inter_op_threads=1, optimization="basic", log_severity=1)
    assert (so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level) == (3, 1, 1)
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    default = session_options()
    assert default.intra_op_num_threads == ort.SessionOptions().intra_op_num_threads  # ORT's own default
    assert default.log_severity_level == LOG_SEVERITY
    assert default.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_op_library_arguments(tmp_path):
    with pytest.raises(oplib.OpLibraryMissingError, match="does not exist"):
        session_options(oplib=tmp_path / "libnothing.so")
    with pytest.raises(ValueError, match="optimization must be one of"):
        session_options(optimization="max")
    lib = oplib.find_op_library()
    if lib is None:
        pytest.skip("libemrrg_ops.so not built (bash scripts/build_plugins.sh)")
    session_options(oplib=True)          # registers the library that oplib finds, without raising
    session_options(oplib=lib)
