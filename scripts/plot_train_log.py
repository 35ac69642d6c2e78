"""The training curve of an emrrg-train run as a PNG (matplotlib).

    .venv/bin/python scripts/plot_train_log.py demo/train_log.jsonl --log demo/train.log -o demo/train_curve.png

Panels: the encoder label pre-training BCE (read from the text log's "encoder pre-training k/N: BCE x"
lines, when --log is given), the language-model loss per step with its moving average and the
learning rate, and the validation CE-F1 and selection score at each validation. A resumed run logs the
steps after its last save twice; the last record of each step is kept.

A run continued from another one's checkpoint (``emrrg-train --init``) restarts its step count: a line
``{"stage": "NAME"}`` between the two logs starts a stage whose steps are drawn after the previous
ones (a dotted line marks it), and a pre-training whose step count restarts in the text log likewise.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

EMA = 0.9  # smoothing of the loss line; the same factor as emrrg-train's progress line
PRETRAIN_LINE = re.compile(r"encoder pre-training (\d+)/(\d+): BCE ([0-9.]+)")


def read_log(path: Path) -> tuple[dict[int, dict], dict[int, dict], list[tuple[int, str]]]:
    """(step -> loss record, step -> validation record, [(first step, name)] of the stages after the
    first); the last record of each step, steps of a later stage offset past the earlier ones."""
    steps: dict[int, dict] = {}
    vals: dict[int, dict] = {}
    stages: list[tuple[int, str]] = []
    offset = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if "stage" in rec:
            offset = max(steps, default=0)
            stages.append((offset, str(rec["stage"])))
        elif "loss" in rec:
            steps[offset + rec["step"]] = rec
        elif "val" in rec:
            vals[offset + rec["step"]] = rec["val"]
    return steps, vals, stages


def read_pretrain(path: Path) -> list[tuple[int, float]]:
    """(step, mean BCE over the last tenth of steps) from the text log's pre-training lines; a phase
    whose count restarts is drawn after the previous one."""
    out: list[tuple[int, float]] = []
    offset, last, last_total = 0, 0, 0
    for m in PRETRAIN_LINE.finditer(path.read_text(encoding="utf-8")):
        k, total = int(m.group(1)), int(m.group(2))
        if k <= last:
            offset += last_total
        last, last_total = k, total
        out.append((offset + k, float(m.group(3))))
    return out


def plot(jsonl: Path, out: Path, log: Path | None = None, title: str | None = None) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, vals, stages = read_log(jsonl)
    if not steps:
        raise ValueError(f"{jsonl}: no training steps (lines with 'loss'); give emrrg-train's log.jsonl")
    pre = read_pretrain(log) if log else []
    panels = 3 if pre else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.8))
    ax_pre, ax_loss, ax_val = (axes if pre else (None, *axes))
    if ax_pre is not None:
        ax_pre.plot([s for s, _ in pre], [b for _, b in pre], "o-", color="tab:purple")
        ax_pre.set(title="encoder label pre-training", xlabel="pre-training step", ylabel="BCE (mean of the last tenth)")
        ax_pre.grid(alpha=0.3)
    xs = sorted(steps)
    loss = [steps[s]["loss"] for s in xs]
    ema, smooth = None, []
    for v in loss:
        ema = v if ema is None else EMA * ema + (1 - EMA) * v
        smooth.append(ema)
    ax_loss.plot(xs, loss, color="tab:blue", alpha=0.3, lw=0.8, label="loss")
    ax_loss.plot(xs, smooth, color="tab:blue", lw=1.8, label=f"moving average ({EMA})")
    ax_loss.set(title="language-model loss (teacher forced)", xlabel="step", ylabel="cross-entropy")
    for ax, top in ((ax_loss, True), (ax_val, False)):       # the validation panel names stages at its foot
        for k, (x, name) in enumerate(stages):
            ax.axvline(x, color="k", ls=":", lw=1)
            dy = 10 * (k % 2)                                   # close stages (2 and 3) on two rows
            ax.annotate(name, (x, 1 if top else 0), xycoords=("data", "axes fraction"),
                        xytext=(3, -12 - dy if top else 4 + dy), textcoords="offset points", fontsize=7)
    ax_loss.grid(alpha=0.3)
    lr = ax_loss.twinx()
    lr.plot(xs, [steps[s]["lr"] for s in xs], color="tab:gray", ls="--", lw=1, label="learning rate")
    lr.set_ylabel("learning rate")
    h1, l1 = ax_loss.get_legend_handles_labels()
    h2, l2 = lr.get_legend_handles_labels()
    ax_loss.legend(h1 + h2, l1 + l2, fontsize=8, loc="center right")
    vs = sorted(vals)
    if vs:
        n = vals[vs[-1]].get("n")
        ax_val.plot(vs, [vals[s]["ce_f1"] for s in vs], "o-", color="tab:green", label="CE-F1 (micro)")
        ax_val.plot(vs, [vals[s]["score"] for s in vs], "s-", color="tab:orange", label="0.8 BLEU-4 + 0.2 CIDEr")
        ax_val.legend(fontsize=8, loc="upper left")
        ax_val.set(title=f"validation (first {n} val studies, greedy)", xlabel="step")
    else:
        ax_val.set(title="validation (none logged)", xlabel="step")
    ax_val.set_xlim(ax_loss.get_xlim())  # the same step axis as the loss
    ax_val.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("jsonl", type=Path, help="emrrg-train's log.jsonl (demo/train_log.jsonl)")
    p.add_argument("--log", type=Path, default=None, help="the run's text log, for the pre-training BCE panel")
    p.add_argument("-o", "--output", type=Path, required=True, help="PNG to write")
    p.add_argument("--title", default=None)
    a = p.parse_args(argv)
    for f in (a.jsonl, a.log):
        if f is not None and not f.is_file():
            print(f"plot_train_log: error: {f}: no such file; give the run's log.jsonl (and --log its text log)",
                  file=sys.stderr)
            return 2
    try:
        print(f"wrote {plot(a.jsonl, a.output, a.log, a.title)}")
    except ValueError as e:
        print(f"plot_train_log: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
