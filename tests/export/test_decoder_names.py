"""decoder_onnx names each weight MatMul after its torch Linear from the exporter's per-node name scopes
(NAME_SCOPES_KEY), which survive torch.onnx's optimize=True; the rest of the node metadata is dropped."""
from __future__ import annotations

import onnx
import pytest
import torch

from emrrg.export.decoder_onnx import (NAME_SCOPES_KEY, DecoderExportError, _finish_onnx, _linear_names,
                                       _name_weight_matmuls, _onnx_export)


class _Inner(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(8, 16, bias=False)
        self.down = torch.nn.Linear(16, 8, bias=False)
        with torch.no_grad():  # equal weights: a name taken from the values could not tell these two apart
            self.twin = torch.nn.Linear(8, 8, bias=False)
            self.twin2 = torch.nn.Linear(8, 8, bias=False)
            self.twin2.weight.copy_(self.twin.weight)

    def forward(self, x):
        return self.down(torch.relu(self.up(x))) + self.twin(x) * self.twin2(torch.tanh(x))


class _Wrapper(torch.nn.Module):  # like DecoderWithCache: the module under an attribute of the wrapper
    def __init__(self, inner):
        super().__init__()
        self.llm = inner

    def forward(self, x):
        return self.llm(x)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("names")
    inner = _Inner().eval()
    wrapper = _Wrapper(inner)
    with torch.no_grad():
        src = _onnx_export(wrapper, (torch.randn(2, 3, 8),), ["x"], ["y"], None, tmp / "raw.onnx")
    return src, _linear_names(wrapper, inner), tmp


def test_linear_names_map_wrapper_paths_to_module_names(exported):
    _, names, _ = exported
    assert names == {f"llm.{n}": n for n in ("up", "down", "twin", "twin2")}


def test_weight_matmuls_are_named_from_the_exporter_metadata(exported):
    src, names, tmp = exported
    raw = onnx.load(str(src))
    weight_mm = [n for n in raw.graph.node if n.op_type == "MatMul"
                 and n.input[1] in {t.name for t in raw.graph.initializer}]
    assert len(weight_mm) == 4 and all(any(p.key == NAME_SCOPES_KEY for p in n.metadata_props) for n in weight_mm)
    _finish_onnx(src, tmp / "named.onnx", names, None)
    m = onnx.load(str(tmp / "named.onnx"))
    mm = {n.name: n.input[1] for n in m.graph.node if n.op_type == "MatMul"}
    # the optimizer merged twin2's equal weight into twin's initializer; the node still has its own name
    assert mm == {"up": "up.weight_t", "down": "down.weight_t", "twin": "twin.weight_t", "twin2": "twin.weight_t"}
    assert {t.name for t in m.graph.initializer} >= set(mm.values())
    assert not any(n.metadata_props for n in m.graph.node)       # stack traces and scopes dropped after naming


def test_missing_name_scopes_is_refused(exported):
    src, names, _ = exported
    m = onnx.load(str(src))
    for n in m.graph.node:
        del n.metadata_props[:]
    with pytest.raises(DecoderExportError, match=NAME_SCOPES_KEY):
        _name_weight_matmuls(m, names)
