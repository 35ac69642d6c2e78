"""The bundle contract (emrrg.runtime.contract) on a real tiny bundle: every manifest defect is one BundleError
naming its key path, `emrrg-run` / `emrrg-serve` exit 2 with exactly one line, no path leads out of the
bundle, the writer's output passes the reader's checks, and the contract's I/O names are the exported graphs'."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from emrrg.assets import chest_dicom
from emrrg.runtime import contract as C
from emrrg.runtime.bundle import BundleError, open_bundle, verify_bundle
from emrrg.runtime.cli import run_main
from emrrg.runtime.report_runtime import Runtime

BIN = Path(sys.executable).parent
CLI_TIMEOUT_S = 300  # a cold interpreter importing onnxruntime on a loaded 2-core machine; normally ~2 s


@pytest.fixture
def bundle(tiny_bundle, tmp_path):
    """A private copy of the session's tiny bundle (tests/conftest.py), to damage."""
    dst = tmp_path / "b"
    shutil.copytree(tiny_bundle, dst)
    return dst


def edit_manifest(bundle: Path, edit) -> None:
    """Apply edit(manifest dict, bundle) and write the manifest back (it does not list itself: no re-hash)."""
    p = bundle / C.MANIFEST
    m = json.loads(p.read_text())
    edit(m, bundle)
    p.write_text(json.dumps(m))


def cli_error(capsys, bundle: Path) -> str:
    """emrrg-run in this process: exit 2 and exactly one line on stderr, no traceback."""
    with pytest.raises(SystemExit) as e:
        run_main([str(bundle), str(chest_dicom()), "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.count("\n") == 1 and err.startswith("emrrg-run: error: ") and "Traceback" not in err, err
    return err


def _set(path: str, value):
    """An edit that sets manifest[a][b]... = value (path 'a.b.c'; integers index lists)."""
    def edit(m, _bundle):
        *head, last = path.split(".")
        for k in head:
            m = m[int(k)] if isinstance(m, list) else m[k]
        m[int(last) if isinstance(m, list) else last] = value
    return edit


def _delete(path: str):
    def edit(m, _bundle):
        *head, last = path.split(".")
        for k in head:
            m = m[k]
        del m[last]
    return edit


def _symlink_listed(name: str, target: str):
    """Place a symbolic link in the bundle and list it in `files` (any size / sha: the path check comes first)."""
    def edit(m, bundle):
        (bundle / name).symlink_to(target)
        m["files"][name] = {"bytes": 1, "sha256": "0" * 64}
    return edit


def _replace_with_symlink(rel: str, target: str):
    """Swap a listed bundle file for a symbolic link to `target`."""
    def edit(m, bundle):
        (bundle / rel).unlink()
        (bundle / rel).symlink_to(target)
    return edit


def _files_entry(rel: str):
    def edit(m, _bundle):
        m["files"][rel] = {"bytes": 1, "sha256": "0" * 64}
    return edit


def _data_climbing_out(m, _bundle):
    m["artifacts"]["encoder"]["data"] = ["encoder.weights", "../../etc/shadow"]


def _no_cross_kv(m, _bundle):
    del m["artifacts"]["cross_kv"]


def _no_names(m, _bundle=None):
    """Drop the decoder's optional name lists, which would otherwise be refused first once num_layers changes."""
    for k in ("input_names", "output_names"):
        m["decoder"].pop(k)


# (id, edit, the expected part of the one-line message). The tiny bundle: vocab 512, hidden 64, 2 layers,
# 4 heads / 2 KV heads, head_dim 16, hybrid layer 1, image 64 px, 17 visual tokens.
DEFECTS = [
    # missing keys, top level and nested
    ("missing-decoder", _delete("decoder"), "manifest.json: decoder is missing"),
    ("missing-files", _delete("files"), "manifest.json: files is missing"),
    ("missing-image-size", _delete("encoder.image_size"), "manifest.json: encoder.image_size is missing"),
    ("missing-eos", _delete("tokens.eos_token_id"), "manifest.json: tokens.eos_token_id is missing"),
    ("missing-artifact-path", _delete("artifacts.decoder.path"), "manifest.json: artifacts.decoder.path is missing"),
    ("missing-tokenizer-artifact", _delete("artifacts.tokenizer"), "manifest.json: artifacts.tokenizer is missing"),
    ("missing-cross-kv", _no_cross_kv, "artifacts.cross_kv is missing (the decoder has hybrid layers [1])"),
    # wrong types
    ("generation-is-a-list", _set("generation", [5, 2.0]), "manifest.json: generation must be an object, got an array"),
    ("artifact-is-a-string", _set("artifacts.decoder", "decoder.onnx"),
     "manifest.json: artifacts.decoder must be an object, got a string"),
    ("ids-are-a-string", _set("prompt.before_ids", "1 43 88"), "manifest.json: prompt.before_ids must be an array"),
    ("beams-is-a-bool", _set("generation.num_beams", True), "generation.num_beams must be an int in [1, 16], got True"),
    ("layers-is-a-float", _set("decoder.num_layers", 2.0), "decoder.num_layers must be an int in [1, 256], got 2.0"),
    ("penalty-is-nan", _set("generation.repetition_penalty", float("nan")),
     "generation.repetition_penalty must be a number in (0.0, 100.0], got nan"),
    ("sha-not-hex", lambda m, b: m["files"]["decoder.onnx"].update(sha256="z" * 64),
     'files["decoder.onnx"].sha256 must be 64 lowercase hex digits'),
    # ids out of range (the table has 512 rows)
    ("prompt-id-past-the-table", _set("prompt.after_ids.3", 512),
     "manifest.json: prompt.after_ids[3] must be an int in [0, 511] (a token id: decoder.vocab is 512), got 512"),
    ("prompt-id-negative", _set("prompt.before_ids.0", -1), "prompt.before_ids[0] must be an int in [0, 511]"),
    ("eos-out-of-range", _set("tokens.eos_token_id", 1_000_000),
     "tokens.eos_token_id must be an int in [0, 511] (a token id: decoder.vocab is 512), got 1000000"),
    ("pad-out-of-range", _set("tokens.pad_token_id", 512), "tokens.pad_token_id must be an int in [0, 511]"),
    ("vocab-not-the-table", _set("decoder.vocab", 100_000),
     "embed_tokens.npy has 512 rows x 64, the manifest says decoder.vocab 100000 x decoder.hidden 64"),
    # size limits
    ("image-size-100000", _set("encoder.image_size", 100_000),
     "manifest.json: encoder.image_size must be an int in [16, 1024], got 100000"),
    ("num-tokens", _set("encoder.num_tokens", 10**7), "encoder.num_tokens must be an int in [1, 4097]"),
    ("max-new-tokens", _set("generation.max_new_tokens", 10**9), "generation.max_new_tokens must be an int in [1, 4096]"),
    ("num-beams", _set("generation.num_beams", 1000), "generation.num_beams must be an int in [1, 16], got 1000"),
    ("positions-below-new-tokens", _set("generation.max_positions_new", 50),
     "generation.max_positions_new must be an int in [100, 4096] (at least generation.max_new_tokens), got 50"),
    ("num-layers", _set("decoder.num_layers", 10**6), "decoder.num_layers must be an int in [1, 256], got 1000000"),
    ("head-dim", _set("decoder.head_dim", 0), "decoder.head_dim must be an int in [1, 512], got 0"),
    ("heads-not-grouped", _set("decoder.kv_heads", 3), "decoder.num_heads (4) must be a multiple of decoder.kv_heads (3)"),
    ("hybrid-layer-out-of-range", _set("decoder.hybrid_layers", [7]), "decoder.hybrid_layers[0] must be an int in [0, 1]"),
    ("kv-cache-too-large", lambda m, b: _no_names(m) or m["decoder"].update(kv_heads=256, num_heads=256, head_dim=512,
                                                                           num_layers=256),
     "GiB KV cache for one default report (limit 16 GiB)"),
    ("names-not-the-contract", _set("decoder.input_names", ["inputs_embeds"]), "decoder.input_names must be the contract's"),
    ("unknown-cache", _set("decoder.cache", "paged"), "decoder.cache must be one of 'concat', 'shared', got a string \"paged\""),
    ("unknown-format-version", _set("format_version", 2), "bundle format version 2 is not supported"),
    # paths
    ("absolute-artifact-path", _set("artifacts.decoder.path", "/etc/passwd"),
     'artifacts.decoder.path "/etc/passwd" is an absolute path'),
    ("dotdot-artifact-path", _set("artifacts.tokenizer.path", "../outside/tokenizer.json"),
     'artifacts.tokenizer.path "../outside/tokenizer.json" climbs out of the bundle'),
    ("data-entry-climbing-out", _data_climbing_out, 'artifacts.encoder.data[1] "../../etc/shadow" climbs out of the bundle'),
    ("absolute-files-entry", _files_entry("/etc/passwd"), '"/etc/passwd" is an absolute path'),
    ("symlink-to-etc-passwd-listed", _symlink_listed("notes.txt", "/etc/passwd"),
     'files["notes.txt"] "notes.txt" leads outside the bundle'),
    ("artifact-swapped-for-symlink-out", _replace_with_symlink("tokenizer/tokenizer.json", "/etc/passwd"),
     'files["tokenizer/tokenizer.json"] "tokenizer/tokenizer.json" leads outside the bundle'),
    ("symlink-dir-out", _symlink_listed("outside", "/etc"), "leads outside the bundle"),
    ("symlink-loop", _symlink_listed("loop", "loop"), '"loop" cannot be resolved (a symbolic link loop)'),
]


@pytest.mark.parametrize("edit,expected", [pytest.param(e, x, id=i) for i, e, x in DEFECTS])
def test_manifest_defect_is_one_clear_error(bundle, capsys, edit, expected):
    edit_manifest(bundle, edit)
    with pytest.raises(BundleError) as e:
        verify_bundle(bundle)
    msg = str(e.value)
    assert expected in msg and "\n" not in msg, msg
    assert "re-export" in msg, msg               # and what to do
    err = cli_error(capsys, bundle)               # Runtime.from_pretrained behind emrrg-run: the same line
    assert expected in err, err


def test_nothing_about_an_outside_file_leaks(bundle, capsys):
    """A listed symlink to /etc/passwd with the right size: refused before any stat, so the message holds
    neither the target's name nor its size, and neither does a damaged copy of the same error."""
    real = os.stat("/etc/passwd").st_size
    edit_manifest(bundle, lambda m, b: ((b / "x.txt").symlink_to("/etc/passwd"),
                                        m["files"].update({"x.txt": {"bytes": real, "sha256": "0" * 64}})))
    err = cli_error(capsys, bundle)
    assert "leads outside the bundle" in err and "/etc/passwd" not in err and f" {real} " not in err, err


def test_a_symlink_inside_the_bundle_to_a_file_inside_it_is_allowed(bundle):
    real = bundle / "store" / "table.npy"
    real.parent.mkdir()
    shutil.move(bundle / C.EMBED_TOKENS_FILE, real)
    (bundle / C.EMBED_TOKENS_FILE).symlink_to(Path("store") / "table.npy")
    m = open_bundle(bundle)
    assert m.path(C.EMBED_TOKENS).resolve() == real.resolve()


def test_manifest_itself_linked_out_of_the_bundle(bundle, tmp_path):
    outside = tmp_path / "elsewhere.json"
    shutil.move(bundle / C.MANIFEST, outside)
    (bundle / C.MANIFEST).symlink_to(outside)
    with pytest.raises(BundleError, match="the manifest .* leads outside the bundle"):
        verify_bundle(bundle)


def test_duplicate_key_and_huge_manifest(bundle):
    p = bundle / C.MANIFEST
    text = json.dumps(json.loads(p.read_text()))
    assert text.count('"tokens": {') == 1
    p.write_text(text.replace('"tokens": {', '"tokens": {"eos_token_id": 7, ', 1))
    with pytest.raises(BundleError, match="'eos_token_id' appears twice in one object"):
        verify_bundle(bundle)
    p.write_text(text[:-1] + ', "pad": "' + "x" * (C.MAX_MANIFEST_BYTES + 1) + '"}')
    with pytest.raises(BundleError, match="too large for a manifest"):
        verify_bundle(bundle)


@pytest.mark.parametrize("edit,expected", [
    pytest.param(_set("encoder.image_size", 128), "pixel_values has shape ['batch', 'views', 3, 64, 64], the manifest "
                                                   "says ['?', '?', 3, 128, 128]", id="image-size-not-the-encoder's"),
    pytest.param(lambda m, b: _no_names(m) or m["decoder"].update(num_layers=3),
                 "the inputs of decoder.onnx do not match the manifest (decoder 3 layers, hybrid layers [1]): missing "
                 "['past_key_values.2.key', 'past_key_values.2.value']", id="layers-not-the-graph's"),
    pytest.param(lambda m, b: m["decoder"].update(kv_heads=4), "past_key_values.0.key has shape ['batch', 2, 'past', 16]",
                 id="kv-heads-not-the-graph's"),
])
def test_manifest_that_disagrees_with_its_graphs(bundle, capsys, edit, expected):
    """Within the limits but not what the ONNX files hold: refused when the sessions are made, not mid-report."""
    edit_manifest(bundle, edit)
    verify_bundle(bundle)                          # the manifest alone is well-formed
    with pytest.raises(BundleError) as e:
        Runtime.from_pretrained(bundle, backend="cpu-pure")
    assert expected in str(e.value), e.value
    assert expected in cli_error(capsys, bundle)


def test_unloadable_graph_is_a_bundle_error(bundle):
    """--no-verify skips the sha256; a same-size garbage decoder.onnx is then ONNX Runtime's to refuse."""
    p = bundle / C.DECODER_FILE
    p.write_bytes(b"\x07" * p.stat().st_size)
    with pytest.raises(BundleError, match="decoder.onnx: ONNX Runtime cannot load it"):
        Runtime.from_pretrained(bundle, backend="cpu-pure", verify=False)


def _run_cli(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / name), *args], capture_output=True, text=True, timeout=CLI_TIMEOUT_S)


@pytest.mark.parametrize("edit", [_set("encoder.image_size", 100_000), _set("generation", [1]),
                                  _symlink_listed("p.txt", "/etc/passwd")], ids=["image-size", "list", "symlink"])
def test_installed_commands_exit_2_with_one_line(bundle, edit):
    """The real entry points, in fresh processes: emrrg-run and emrrg-serve (which checks before it binds)."""
    edit_manifest(bundle, edit)
    for cmd, args in (("emrrg-run", (str(chest_dicom()),)), ("emrrg-serve", ("--port", "1"))):
        r = _run_cli(cmd, str(bundle), *args)
        assert r.returncode == 2, (cmd, r.stderr)
        assert r.stderr.count("\n") == 1 and f"{cmd}: error: " in r.stderr and "Traceback" not in r.stderr, r.stderr


# ---- the writer and the graphs against the contract ---------------------------------------------------------

def test_writer_output_passes_the_contract(tiny_bundle):
    m = open_bundle(tiny_bundle)
    raw = json.loads((tiny_bundle / C.MANIFEST).read_text())
    again = C.parse_manifest(raw)                   # the JSON round trip reads back the same contract
    assert (again.prompt, again.generation, again.tokens, again.encoder, again.decoder, again.artifacts, again.files) == \
           (m.prompt, m.generation, m.tokens, m.encoder, m.decoder, m.artifacts, m.files)
    assert set(m.artifacts) == {C.ENCODER, C.ENCODER_FALLBACK, C.DECODER, C.CROSS_KV, C.EMBED_TOKENS, C.TOKENIZER}
    for name, art in m.artifacts.items():          # each artifact's own fields survive parse -> to_dict
        assert art.to_dict().items() <= raw["artifacts"][name].items()
    assert m.files[m.artifacts[C.ENCODER].path].sha256 == m.artifacts[C.ENCODER].sha256


def test_writer_refuses_a_manifest_that_breaks_the_contract(tiny_bundle, tmp_path):
    from emrrg.export.bundle import ExportError, write_manifest

    root = tmp_path / "b"
    shutil.copytree(tiny_bundle, root)
    raw = json.loads((root / C.MANIFEST).read_text())
    (root / C.MANIFEST).unlink()
    body = json.loads(json.dumps({k: v for k, v in raw.items() if k not in ("format", "format_version", "files")}))
    body["encoder"]["image_size"] = 100_000
    with pytest.raises(ExportError, match="breaks the bundle contract.*encoder.image_size must be an int"):
        write_manifest(root, body)
    assert not (root / C.MANIFEST).exists()
    body["encoder"]["image_size"] = raw["encoder"]["image_size"]
    write_manifest(root, body)
    assert open_bundle(root).encoder.image_size == raw["encoder"]["image_size"]


def test_contract_names_are_the_exported_graphs_names(tiny_bundle):
    """The runtime feeds and binds by the contract's names: they must be exactly the graphs' own, in order."""
    import onnxruntime as ort

    m = open_bundle(tiny_bundle)
    d = m.decoder

    def io(artifact):
        s = ort.InferenceSession(str(m.path(artifact)), providers=["CPUExecutionProvider"])
        return [i.name for i in s.get_inputs()], [o.name for o in s.get_outputs()]

    assert io(C.DECODER) == (C.decoder_input_names(d.num_layers, d.hybrid_layers, d.cache),
                             C.decoder_output_names(d.num_layers))
    pos = ["position_ids"] if d.cache == C.CACHE_CONCAT else []   # the built graph derives positions itself
    assert io(C.DECODER)[0][:4 + len(pos)] == ["inputs_embeds", "attention_mask", *pos, "past_key_values.0.key",
                                               "past_key_values.0.value"]
    assert io(C.DECODER)[1][:3] == ["logits", "present.0.key", "present.0.value"]
    assert io(C.CROSS_KV) == ([C.CROSS_KV_INPUT], C.visual_kv_names(d.hybrid_layers)) == (["visual_tokens"],
                                                                                        ["visual_kv.1.key", "visual_kv.1.value"])
    assert io(C.ENCODER_FALLBACK) == ([C.ENCODER_INPUT], [C.ENCODER_OUTPUT])
    rt = Runtime.from_pretrained(tiny_bundle, backend="cpu-pure")   # binds past/present by the contract's names
    assert rt.generate([str(chest_dicom())], num_beams=2, max_new_tokens=3, min_new_tokens=3)["tokens"] == 3


def test_external_data_outside_the_model_folder_is_refused(tmp_path):
    """TensorRT's engine key hashes the encoder's external-data files: a location climbing out is refused
    before anything is read."""
    from onnx import TensorProto, external_data_helper, helper, numpy_helper

    from emrrg.runtime import tensorrt as trtb

    (tmp_path / "model").mkdir()
    for loc in ("../secret.bin", "/etc/passwd"):
        w = numpy_helper.from_array(np.zeros(256, np.float32), "w")
        external_data_helper.set_external_data(w, location=loc, offset=0, length=1024)
        w.ClearField("raw_data")
        w.data_location = TensorProto.EXTERNAL
        g = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [256])], [w])
        path = tmp_path / "model" / "m.onnx"
        path.write_bytes(helper.make_model(g).SerializeToString())
        with pytest.raises(BundleError, match="external data location"):
            trtb.external_data_files(path)


def test_int8_block_table_and_its_scales(tiny_bundle, tmp_path):
    """4-bit bundles ship the table as int8 blocks + f16 scales: the writer's artifact passes, the runtime runs
    it, and scales of the wrong shape are refused from their .npy header."""
    from emrrg.export.bundle import write_manifest
    from emrrg.export.pipeline import _write_embedding
    from emrrg.runtime.bundle import file_entry

    root = tmp_path / "b"
    shutil.copytree(tiny_bundle, root)
    raw = json.loads((root / C.MANIFEST).read_text())
    (root / C.MANIFEST).unlink()
    src = tmp_path / "f32.npy"
    shutil.move(root / C.EMBED_TOKENS_FILE, src)
    body = {k: v for k, v in raw.items() if k not in ("format", "format_version", "files")}
    body["artifacts"][C.EMBED_TOKENS] = _write_embedding(src, root, quantized=True)
    write_manifest(root, body)
    art = open_bundle(root).artifacts[C.EMBED_TOKENS]
    assert (art.precision, art.scales, art.data) == (C.EMBED_Q8, C.EMBED_SCALES_FILE, (C.EMBED_SCALES_FILE,))
    rt = Runtime.from_pretrained(root, backend="cpu-pure")
    assert rt.generate([str(chest_dicom())], num_beams=1, max_new_tokens=2, min_new_tokens=2)["tokens"] == 2

    np.save(root / C.EMBED_SCALES_FILE, np.zeros((512, 3), np.float16))      # 64 / 32 = 2 blocks per row
    edit_manifest(root, lambda m, b: m["files"].update({C.EMBED_SCALES_FILE: file_entry(b, C.EMBED_SCALES_FILE)}))
    with pytest.raises(BundleError, match=r"embed_scales.npy must be <f2 \[512, 64 / 32\] .* it holds <f2 \[512, 3\]"):
        verify_bundle(root)
