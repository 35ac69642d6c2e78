"""scripts/plot_train_log.py on the demo run's own logs (real files, real matplotlib)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "plot_train_log.py"
pytest.importorskip("matplotlib")


def test_plots_the_demo_run(tmp_path):
    out = tmp_path / "curve.png"
    r = subprocess.run([sys.executable, str(SCRIPT), str(ROOT / "demo" / "train_log.jsonl"),
                        "--log", str(ROOT / "demo" / "train.log"), "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image
    w, h = Image.open(out).size
    assert w > 2 * h                       # three panels side by side (pre-training, loss, validation)


def test_resumed_steps_keep_the_last_record(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import plot_train_log
    finally:
        sys.path.remove(str(SCRIPT.parent))
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 5.0, "lr": 1e-4}\n{"step": 2, "loss": 4.0, "lr": 1e-4}\n'
                   '{"step": 2, "loss": 3.5, "lr": 1e-4}\n{"step": 2, "val": {"score": 0.1, "ce_f1": 0.2, "n": 4}}\n')
    steps, vals, stages = plot_train_log.read_log(log)
    assert sorted(steps) == [1, 2] and steps[2]["loss"] == 3.5 and vals[2]["ce_f1"] == 0.2 and stages == []
    # a run continued with --init: its steps are drawn after the first run's
    with log.open("a") as f:
        f.write('{"stage": "continued"}\n{"step": 1, "loss": 3.0, "lr": 1e-4}\n')
    steps, _, stages = plot_train_log.read_log(log)
    assert sorted(steps) == [1, 2, 3] and steps[3]["loss"] == 3.0 and stages == [(2, "continued")]
    text = tmp_path / "train.log"
    text.write_text("encoder pre-training 5/10: BCE 0.5\nencoder pre-training 10/10: BCE 0.4\n"
                    "encoder pre-training 4/8: BCE 0.3\n")
    assert plot_train_log.read_pretrain(text) == [(5, 0.5), (10, 0.4), (14, 0.3)]


def test_missing_or_empty_log_is_one_line_and_exit_2(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "none.jsonl"), "-o", str(tmp_path / "x.png")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no such file" in r.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"encoder_pretrain": {"steps": 1}}\n')
    r = subprocess.run([sys.executable, str(SCRIPT), str(empty), "-o", str(tmp_path / "x.png")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no training steps" in r.stderr
