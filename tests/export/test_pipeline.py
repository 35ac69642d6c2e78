"""emrrg-export end to end on the tiny checkpoint: the bundle, and one clear error with nothing written
for every bad input (not a checkpoint, mismatched keys, unknown preset, empty calibration folder,
full disk, missing TensorRT, Ctrl-C / kill)."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from emrrg.export.cli import export_main
from emrrg.runtime.bundle import verify_bundle


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir())


def expect_export_error(capsys, argv, *needles):
    with pytest.raises(SystemExit) as e:
        export_main(argv + ["--no-progress"])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err and "\nemrrg-export: error:" in "\n" + err, err
    for n in needles:
        assert n in err, err
    return err


def test_bundle_manifest(tiny_bundle, tiny_checkpoint):
    m = verify_bundle(tiny_bundle)
    assert set(m["artifacts"]) >= {"encoder", "encoder_fallback", "decoder", "embed_tokens", "tokenizer", "cross_kv"}
    assert m["source"]["sha256"] and m["merge"]["merged"] == {"encoder_partial_lora": 2, "llm_lora": 4}
    assert m["validation"]["encoder_f32_pure"]["passed"]
    assert m["decoder"]["hybrid_layers"] == [1]
    for name, art in m["artifacts"].items():
        assert len(art["sha256"]) == 64 and art["bytes"] > 0, name
    assert not [p for p in tiny_bundle.parent.iterdir() if p.name.startswith(".")]
    mask = os.umask(0o022)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tiny_bundle.rglob("*") if p.is_file()}
    assert set(modes.values()) == {0o644 & ~mask}, modes                # readable by the service account too


def test_encoder_files_share_one_copy_of_the_weights(tiny_bundle):
    """encoder.onnx and encoder.scan.onnx point into the same encoder.weights, which holds each tensor once,
    and both still compute the same tokens as when they held their weights inline (validated at export)."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from emrrg.runtime.oplib import register

    m = verify_bundle(tiny_bundle)
    info = m["encoder"]["external_data"]
    assert info["data"] == "encoder.weights" and info["shared"] >= info["tensors"] > 0
    refs = {}
    for f in ("encoder.onnx", "encoder.scan.onnx"):
        g = onnx.load(str(tiny_bundle / f), load_external_data=False).graph
        ext = {t.name: {e.key: e.value for e in t.external_data} for t in g.initializer if t.external_data}
        assert ext and all(e["location"] == "encoder.weights" for e in ext.values())
        refs[f] = ext
    common = set(refs["encoder.onnx"]) & set(refs["encoder.scan.onnx"])
    assert common and all(refs["encoder.onnx"][k] == refs["encoder.scan.onnx"][k] for k in common)
    offsets = {(e["offset"], e["length"]) for r in refs.values() for e in r.values()}
    assert sum(int(n) for _, n in offsets) <= info["bytes"] == (tiny_bundle / "encoder.weights").stat().st_size
    assert m["artifacts"]["encoder"]["data"] == ["encoder.weights"]
    px = np.random.default_rng(0).standard_normal((1, 1, 3, 64, 64)).astype(np.float32)
    so = ort.SessionOptions()
    register(so)
    a = ort.InferenceSession(str(tiny_bundle / "encoder.onnx"), so).run(None, {"pixel_values": px})[0]
    b = ort.InferenceSession(str(tiny_bundle / "encoder.scan.onnx")).run(None, {"pixel_values": px})[0]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # the op vs the Scan: f32 reduction order only


def test_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "weights.bin").write_bytes(b"\0" * 100)
    expect_export_error(capsys, [str(tmp_path / "ck"), "-o", str(tmp_path / "b")], "not an emrrg checkpoint")
    assert leftovers(tmp_path) == ["ck"]


def test_mismatched_keys(tiny_checkpoint, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    ck = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, ck)
    state = load_file(str(ck / "model.safetensors"))
    state.pop("visual_encoder.layers.0.mixer.A_c_log")
    state["llama_proj.weight"] = state["llama_proj.weight"][:, :5].contiguous()
    save_file(state, str(ck / "model.safetensors"))
    err = expect_export_error(capsys, [str(ck), "-o", str(tmp_path / "b")], "A_c_log", "missing", "llama_proj.weight")
    print(err)
    assert leftovers(tmp_path) == ["ck"]


def test_unknown_preset(tiny_checkpoint, tmp_path, capsys):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, ck)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["decoder"]["preset"] = "gpt-99"
    (ck / "config.json").write_text(json.dumps(cfg))
    expect_export_error(capsys, [str(ck), "-o", str(tmp_path / "b")], "unknown decoder preset 'gpt-99'")
    assert leftovers(tmp_path) == ["ck"]


def test_calibration_folder_without_images(tiny_checkpoint, tmp_path, capsys):
    calib = tmp_path / "calib"
    calib.mkdir()
    (calib / "notes.txt").write_text("no images here")
    (calib / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    expect_export_error(capsys, [str(tiny_checkpoint), "-o", str(tmp_path / "b"), "--int8", "--calib", str(calib)],
                        "calib")
    assert leftovers(tmp_path) == ["calib"]


def test_full_disk(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """ENOSPC while writing (simulated at the manifest, the last write): clear error, nothing left."""
    import emrrg.export.pipeline as pipeline

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(pipeline, "write_manifest", full)
    expect_export_error(capsys, [str(tiny_checkpoint), "-o", str(tmp_path / "b"), "--llm-bits", "32"],
                        "no space left")
    assert leftovers(tmp_path) == []


def test_tensorrt_target_without_tensorrt(tiny_checkpoint, tmp_path, capsys):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    expect_export_error(capsys, [str(tiny_checkpoint), "-o", str(tmp_path / "b"), "--target", "tensorrt"],
                        "needs TensorRT")
    assert leftovers(tmp_path) == []


def test_existing_output_kept(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "mine.txt").write_text("keep")
    expect_export_error(capsys, [str(tiny_checkpoint), "-o", str(tmp_path / "b")], "exists")
    assert (tmp_path / "b" / "mine.txt").read_text() == "keep"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_export_leaves_nothing(tiny_checkpoint, tmp_path, sig):
    out = tmp_path / "out" / "bundle"
    out.parent.mkdir()
    cmd = [sys.executable, "-m", "emrrg.export.cli", str(tiny_checkpoint), "-o", str(out), "--llm-bits", "32",
           "--no-progress"]
    # SIGINT at its default disposition in the child, as from a terminal: a test run started in the background
    # (`cmd &` without job control) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    # Wait until the export has started writing (its hidden staging directory holds files).
    while time.time() < deadline and proc.poll() is None:
        staged = [p for p in out.parent.iterdir() if p.name.startswith(".bundle.tmp-")]
        if staged and any(staged[0].rglob("*.onnx")):
            break
        time.sleep(0.1)
    assert proc.poll() is None, "export finished before it could be interrupted"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert leftovers(out.parent) == []


def test_stale_staging_dir_from_a_killed_export_is_removed(tiny_checkpoint, tmp_path):
    from emrrg.export.bundle import staged_bundle
    dead = tmp_path / ".b.tmp-999999"   # a PID that does not exist: what SIGKILL leaves behind
    dead.mkdir()
    (dead / "encoder.onnx").write_bytes(b"partial")
    with staged_bundle(tmp_path / "b") as tmp:
        (tmp / "x").write_text("ok")
    assert leftovers(tmp_path) == ["b"]
    assert os.path.exists(tmp_path / "b" / "x")


def test_int8_and_4bit_bundle_runs(tiny_checkpoint, tiny_bundle, tmp_path, capsys):
    """--int8 --llm-bits 4 on the tiny checkpoint: Q/DQ encoder, MatMulNBits decoder, the chooser's attempts in the
    manifest, the hybrid layer's cross_kv, and the runtime writes a report from it."""
    import onnx

    from emrrg.assets import chest_dicom
    from emrrg.runtime.cli import run_main

    out = tmp_path / "b"
    export_main([str(tiny_checkpoint), "-o", str(out), "--int8", "--llm-bits", "4", "--no-progress"])
    m = verify_bundle(out)
    assert m["artifacts"]["encoder"]["precision"] == "int8" and m["artifacts"]["decoder"]["precision"] == "int4"
    assert "cross_kv" in m["artifacts"]
    ops = {n.op_type for n in onnx.load(str(out / "decoder.onnx"), load_external_data=False).graph.node}
    assert "MatMulNBits" in ops
    enc_ops = {n.op_type for n in onnx.load(str(out / "encoder.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "SelectiveScan"} <= enc_ops
    attempts = m["validation"]["decoder_4bit"]["attempts"]
    assert attempts and all({"name", "top1", "kl_mean", "bytes", "passed"} <= set(a) for a in attempts)
    assert m["validation"]["encoder_int8_pure"]["passed"]
    emb = m["artifacts"]["embed_tokens"]
    assert emb["precision"] == "int8-block" and emb["block_size"] == 32 and emb["data"] == ["embed_scales.npy"]
    from emrrg.runtime.embedding import Q8_REL_ERROR_BOUND, load_embedding

    f32_rows = np.load(tiny_bundle / "embed_tokens.npy")                 # the same checkpoint, f32 bundle
    table = load_embedding(out, emb)
    assert np.load(out / "embed_tokens.npy").dtype == np.int8 and table.shape == f32_rows.shape
    err = np.abs(table[np.arange(len(table))] - f32_rows).max()
    assert err == pytest.approx(emb["max_abs_error_vs_fp32"]) and err <= np.abs(f32_rows).max() * Q8_REL_ERROR_BOUND
    capsys.readouterr()
    run_main([str(out), str(chest_dicom()), "--beams", "2", "--max-new-tokens", "6", "--json"])
    assert json.loads(capsys.readouterr().out)["tokens"] == 6


def test_4bit_decoder_with_separate_llm_adapters(tiny_checkpoint, tmp_path, capsys):
    """--extra-options separate_adapters=true: the checkpoint's q/v LoRA factors, taken before the merge, become a
    low-rank branch beside each 4-bit packed qkv projection; the manifest names the choice and the runtime runs it."""
    import onnx

    from emrrg.assets import chest_dicom
    from emrrg.runtime.cli import run_main

    out = tmp_path / "b"
    export_main([str(tiny_checkpoint), "-o", str(out), "--llm-bits", "4", "--no-progress",
                 "--extra-options", "separate_adapters=true"])
    m = verify_bundle(out)
    (attempt,) = m["validation"]["decoder_4bit"]["attempts"]
    assert attempt["config"]["separate_adapters"] is True
    nodes = [n.name for n in onnx.load(str(out / "decoder.onnx"), load_external_data=False).graph.node]
    assert sum(n.endswith("self_attn.qkv_proj/lora_add") for n in nodes) == 2            # both layers of tiny-llama
    capsys.readouterr()
    run_main([str(out), str(chest_dicom()), "--max-new-tokens", "4", "--json"])
    assert json.loads(capsys.readouterr().out)["tokens"] == 4


def test_calib_reports_checks_rungs_on_reports(tiny_checkpoint, tiny_phantom, tmp_path):
    """--calib-reports: the rung that meets the teacher-forced thresholds also writes reports for the first
    validation studies, and passes only when its BLEU-4 / CIDEr / CE-F1 stay within the bands of the f32
    decoder's; the manifest keeps what was measured."""
    out = tmp_path / "b"
    export_main([str(tiny_checkpoint), "-o", str(out), "--llm-bits", "4", "--no-progress",
                 "--calib-reports", str(tiny_phantom), "--calib-reports-limit", "2"])
    attempts = verify_bundle(out)["validation"]["decoder_4bit"]["attempts"]
    checked = [a for a in attempts if "reports" in a]
    assert checked, attempts
    for a in checked:
        r = a["reports"]
        assert r["studies"] == 2 and set(r["metrics"]) == {"CE_F1", "BLEU_4", "CIDEr"}
        assert r["identical"]["of"] == 2 and 0 <= r["identical"]["same"] <= 2
        assert r["identical"]["ok"] == (r["identical"]["same"] >= r["identical"]["min_fraction"] * 2)
        assert a["passed"] == r["passed"] == (all(m["ok"] for m in r["metrics"].values()) and r["identical"]["ok"])
    assert all(a.get("skipped") or "reports" in a or not (a["top1"] >= 0.95 and a["kl_mean"] <= 0.05)
               for a in attempts)                              # every rung within the thresholds was checked


def test_calib_reports_checks_int8_encoder_rungs(tiny_checkpoint, tiny_phantom, tmp_path):
    """--calib-reports with --int8: the INT8 encoder rung that meets its token thresholds also writes the
    validation reports through the f32 decoder, and the 4-bit decoder's rungs then decode the kept encoder's
    tokens against the f32 model (f32 encoder + f32 decoder): the whole bundle."""
    out = tmp_path / "b"
    export_main([str(tiny_checkpoint), "-o", str(out), "--int8", "--llm-bits", "4", "--no-progress",
                 "--calib-reports", str(tiny_phantom), "--calib-reports-limit", "2"])
    m = verify_bundle(out)
    enc = m["calibration"]["attempts"]
    checked = [a for a in enc if "reports" in a]
    assert checked, enc
    for a in checked:
        r = a["reports"]
        assert r["decoder"] == "f32" and r["studies"] == 2 and r["identical"]["of"] == 2
        assert a["passed"] == r["passed"] == (all(b["ok"] for b in r["metrics"].values()) and r["identical"]["ok"])
    dec = [a for a in m["validation"]["decoder_4bit"]["attempts"] if "reports" in a]
    assert dec and all(a["reports"]["encoder"] == m["calibration"]["chosen"] for a in dec)
    kept = next(a for a in enc if a["name"] == m["calibration"]["chosen"])
    want = "f32 encoder + f32 decoder" if kept["passed"] else f"{kept['name']} encoder + f32 decoder"
    assert all(a["reports"]["baseline"] == want for a in dec)


def test_calib_reports_encoder_miss_compares_decoder_on_its_tokens(tiny_checkpoint, tiny_phantom, tmp_path,
                                                                   monkeypatch):
    """When no INT8 encoder rung keeps the reports within the bands (bands of -1: nothing can), every rung is
    tried and recorded, the best is kept with passed=False, and the decoder's rungs are compared with the f32
    decoder on that encoder's tokens (its error alone would refuse every decoder rung)."""
    import emrrg.export.report_check as rc
    from emrrg.export.pipeline import ExportOptions, export_bundle
    from emrrg.export.quantize_encoder import ENCODER_INT8_LADDER

    monkeypatch.setattr(rc, "REPORT_BANDS", {k: -1.0 for k in rc.REPORT_BANDS})
    m = export_bundle(tiny_checkpoint, tmp_path / "b", ExportOptions(int8=True, llm_bits=4, max_calib=4,
                                                                        calib_reports=str(tiny_phantom),
                                                                        calib_reports_limit=1),
                      progress=False, log=lambda s: None)
    enc = m["calibration"]["attempts"]
    assert [a["name"] for a in enc] == [c["name"] for c in ENCODER_INT8_LADDER]
    assert not any(a["passed"] for a in enc) and any("reports" in a for a in enc)
    kept = m["calibration"]["chosen"]
    dec = [a for a in m["validation"]["decoder_4bit"]["attempts"] if "reports" in a]
    assert dec and all(a["reports"]["baseline"] == f"{kept} encoder + f32 decoder" for a in dec)


@pytest.mark.parametrize("extra, msg", [(["--calib-reports", "NOPE.json"], "--calib-reports: NOPE.json: no such annotation"),
                                        (["--calib-reports", "ANN", "--llm-bits", "32"], "with --llm-bits 32 and no --int8 it has nothing"),
                                        (["--calib-reports", "ANN", "--calib-reports-limit", "0"], "give 1 or more"),
                                        ([], "missing")])
def test_calib_reports_errors(tiny_checkpoint, tiny_phantom, tmp_path, capsys, extra, msg):
    argv = [a.replace("ANN", str(tiny_phantom)) for a in extra]
    if msg == "missing":                                  # an annotation whose val images are not there
        ann = json.loads(tiny_phantom.read_text())
        ann["val"][0]["image_path"] = ["images/gone.png"]
        (tmp_path / "ann.json").write_text(json.dumps(ann))
        argv = ["--calib-reports", str(tmp_path / "ann.json")]
    with pytest.raises(SystemExit) as e:
        export_main([str(tiny_checkpoint), "-o", str(tmp_path / "b"), "--no-progress", *argv])
    assert e.value.code == 2 and msg in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_int8_encoder_ladder_keeps_the_best_or_fails_strict(tiny_checkpoint, tmp_path, monkeypatch):
    """With thresholds no INT8 graph can meet, every rung of the encoder ladder is tried and recorded; the
    export keeps the best (passed=False, a warning) -- or, with --strict, stops and leaves nothing."""
    import emrrg.export.encoder_onnx as eo
    from emrrg.export.bundle import ExportError
    from emrrg.export.pipeline import ExportOptions, export_bundle
    from emrrg.export.quantize_encoder import ENCODER_INT8_LADDER

    monkeypatch.setattr(eo, "INT8_THRESHOLDS", eo.Thresholds(max_nmse=0.0, min_mean_cosine=1.0 + 1e-9))
    logs = []
    out = tmp_path / "b"
    m = export_bundle(tiny_checkpoint, out, ExportOptions(int8=True, llm_bits=32, max_calib=4), progress=False,
                      log=logs.append)
    attempts = m["calibration"]["attempts"]
    assert [a["name"] for a in attempts] == [c["name"] for c in ENCODER_INT8_LADDER]
    assert not any(a["passed"] for a in attempts)
    best = max(attempts, key=lambda a: a["held_out_mean_cosine"])
    assert m["calibration"]["chosen"] == best["name"] and any("warning" in line for line in logs)
    assert 0.9 < best["held_out_mean_cosine"] < 1.0
    with pytest.raises(ExportError, match="--strict"):
        export_bundle(tiny_checkpoint, tmp_path / "s", ExportOptions(int8=True, llm_bits=32, max_calib=4, strict=True,
                                                                     extra={"encoder_smooth_alpha": "0.5"}),
                      progress=False, log=logs.append)
    assert leftovers(tmp_path) == ["b"]


# Weight-only INT8: every weight rounded by at most half a step of its output channel (amax / 254), activations
# exact: the random tiny encoder's tokens move by NMSE ~1.5e-5 on two real X-rays (float arithmetic, as the
# runtime's session options keep it); 10x headroom for other ORT builds.
WEIGHT_ONLY_NMSE_MAX = 2e-4
# Budgeted: single-weight NMSEs add up to the whole's when the errors are small and independent; the measured
# NMSE of the rounded rest may exceed its summed budget by cross terms, allowed up to this factor.
BUDGET_ADDITIVITY = 3.0
# The runtime's session options against ORT with every graph optimization off, on the same weight-only graph:
# the same float arithmetic, only kernels and fusions differ (f32 rounding).
WEIGHT_ONLY_SESSION_RTOL = 1e-4


@pytest.fixture(scope="module")
def tiny_encoder_pair(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint's encoder, custom-op and pure_onnx, plus two real X-rays at its size."""
    from emrrg.assets import real_xrays
    from emrrg.checkpoint import load_checkpoint
    from emrrg.export.encoder_onnx import export_encoder, pure_onnx_twin
    from emrrg.export.quantize_encoder import load_calibration_set

    d = tmp_path_factory.mktemp("enc")
    model = load_checkpoint(tiny_checkpoint)
    model.merge_adapters()
    export_encoder(model, d / "e.onnx", "custom_op")
    pure_onnx_twin(d / "e.onnx", d / "p.onnx")
    return d, load_calibration_set(real_xrays()[:2], 64)[0]


def _tokens(path, px, **session):
    import onnxruntime as ort

    from emrrg.runtime.sessions import session_options

    so = session_options(**session)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"pixel_values": px[:, None]})[0]


def _nmse(got, ref) -> float:
    return float(((got.astype(np.float64) - ref) ** 2).mean() / (ref.astype(np.float64) ** 2).mean())


def test_weight_only_encoder_rounds_weights_only(tiny_encoder_pair, tmp_path):
    """weight_only with no budget: no QuantizeLinear anywhere, every constant MatMul weight an int8
    DequantizeLinear, tokens within WEIGHT_ONLY_NMSE_MAX of f32, a smaller file; the runtime's session options
    run it with float activations (ORT would otherwise fuse it into MatMulNBits with int8 activations)."""
    import onnx

    from emrrg.assets import real_xrays
    from emrrg.export.quantize_encoder import constant_weight_matmuls, quantize_int8

    d, px = tiny_encoder_pair
    n_matmuls = len(constant_weight_matmuls(onnx.load(str(d / "p.onnx"))))
    q = quantize_int8(d / "e.onnx", d / "p.onnx", real_xrays()[:3], tmp_path / "q.onnx",
                      pure_out_path=tmp_path / "q.scan.onnx", weight_only=True)
    g = onnx.load(q["pure_path"]).graph
    assert not any(n.op_type == "QuantizeLinear" for n in g.node)
    dq = {o for n in g.node if n.op_type == "DequantizeLinear" for o in n.output}
    matmuls = [n for n in g.node if n.op_type == "MatMul" and (n.input[0] in dq or n.input[1] in dq)]
    assert n_matmuls >= 8 and len(matmuls) == n_matmuls and q["calibration"]["float_sensitive"] == []
    assert q["pure_bytes"] < (d / "p.onnx").stat().st_size
    ref, got = _tokens(d / "p.onnx", px), _tokens(q["pure_path"], px)
    print(f"weight-only INT8 tokens: NMSE {_nmse(got, ref):.2e}")
    assert 0 < _nmse(got, ref) < WEIGHT_ONLY_NMSE_MAX
    np.testing.assert_allclose(got, _tokens(q["pure_path"], px, optimization="none"), rtol=WEIGHT_ONLY_SESSION_RTOL,
                               atol=WEIGHT_ONLY_SESSION_RTOL)


def test_weight_only_budget_leaves_the_most_sensitive_weights_float(tiny_encoder_pair, tmp_path):
    """weight_sensitivity ranks every constant MatMul; float_for_budget keeps the most sensitive float until the
    rest fit the budget; the quantized encoder's measured NMSE stays within BUDGET_ADDITIVITY x the budget."""
    import onnx

    from emrrg.assets import real_xrays
    from emrrg.export.quantize_encoder import constant_weight_matmuls, float_for_budget, quantize_int8, weight_sensitivity

    d, px = tiny_encoder_pair
    pure = onnx.load(str(d / "p.onnx"))
    sens = weight_sensitivity(pure, px)
    assert set(sens) == set(constant_weight_matmuls(pure)) and min(sens.values()) >= 0 < max(sens.values())
    total = sum(sens.values())
    assert float_for_budget(sens, total) == [] and len(float_for_budget(sens, 0.0)) == sum(v > 0 for v in sens.values())
    budget = total / 4
    keep = float_for_budget(sens, budget)
    top = sorted(sens, key=sens.get, reverse=True)[:len(keep)]
    assert sorted(top) == keep and sum(v for k, v in sens.items() if k not in keep) <= budget
    q = quantize_int8(d / "e.onnx", d / "p.onnx", real_xrays()[:2], tmp_path / "q.onnx",
                      pure_out_path=tmp_path / "q.scan.onnx", weight_only=True, weight_nmse_budget=budget)
    assert q["calibration"]["float_sensitive"] == keep
    got = _nmse(_tokens(q["pure_path"], px), _tokens(d / "p.onnx", px))
    print(f"budget {budget:.2e}: {len(keep)} of {len(sens)} weights float, NMSE {got:.2e}")
    assert got <= BUDGET_ADDITIVITY * budget


def test_worst_int8_inputs_are_left_float(tiny_checkpoint, tmp_path):
    """float_worst_inputs leaves the readers of the worst-rounded activations float, and only those."""
    import onnx

    from emrrg.checkpoint import load_checkpoint
    from emrrg.export.encoder_onnx import export_encoder, pure_onnx_twin
    from emrrg.export.quantize_encoder import _smoothing_targets, load_calibration_set, quantize_int8, worst_int8_inputs
    from emrrg.assets import real_xrays

    model = load_checkpoint(tiny_checkpoint)
    model.merge_adapters()
    export_encoder(model, tmp_path / "e.onnx", "custom_op")
    pure_onnx_twin(tmp_path / "e.onnx", tmp_path / "p.onnx")
    pure = onnx.load(str(tmp_path / "p.onnx"))
    px = load_calibration_set(real_xrays()[:3], 64)[0]
    n_inputs = len(_smoothing_targets(pure, set()))
    half = worst_int8_inputs(pure, px, (), 0.5)
    quarter = worst_int8_inputs(pure, px, (), 0.25)
    assert quarter and set(quarter) < set(half) and len(half) < sum(len(v) for v in _smoothing_targets(pure, set()).values())
    assert n_inputs >= 4
    q = quantize_int8(tmp_path / "e.onnx", tmp_path / "p.onnx", real_xrays()[:3], tmp_path / "q.onnx",
                      float_worst_inputs=0.25)
    g = onnx.load(q["path"]).graph
    producer = {o: n for n in g.node for o in n.output}
    for n in g.node:
        if n.name in q["calibration"]["float_worst_inputs"]:
            assert not (n.input[0] in producer and producer[n.input[0]].op_type == "DequantizeLinear")
