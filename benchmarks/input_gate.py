"""Peak memory of loading an image through the input gate: a real 2k x 2k film against three decompression bombs.

Each load runs in a fresh interpreter (tests/runtime/image_inputs.measure_load_rss): the figure is the growth of
VmHWM over a baseline taken after the imports and a warm-up load of small seed files. Every bomb is loaded twice:
with the default pixel budget (64 megapixels) and with the budget off (max_megapixels=inf) under a 4 GiB
address-space cap, which shows what the budget saves (and what the other checks still catch without it).

    python benchmarks/input_gate.py

Writes benchmarks/results/input_gate.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import cpu_name  # noqa: E402  (benchmarks/machine.py)
from tests.runtime.image_inputs import jpeg_bomb, measure_load_rss, png_bomb, rle_dicom_bomb  # noqa: E402

ADDRESS_CAP_MB = 4096  # the budget-off runs: a bomb fails with MemoryError here instead of taking the machine


def inputs(work: Path) -> list[tuple[str, str, Path]]:
    from emrrg.assets import chest_dicom

    files = [("RG1_UNCR.dcm: real PA chest film, 1841 x 1955, 16-bit", "film", chest_dicom("RG1_UNCR.dcm"))]
    for name, label, data in (
            ("jpeg_bomb.jpg", "JPEG declaring 13000 x 13000", jpeg_bomb()),
            ("png_bomb.png", "PNG declaring 13000 x 13000, full deflated data", png_bomb(full_data=True)),
            ("rle_bomb.dcm", "RLE DICOM declaring 30000 x 65535", rle_dicom_bomb())):
        (work / name).write_bytes(data)
        files.append((f"{name}: {label}, {len(data) / 1024:.1f} KiB", "bomb", work / name))
    return files


def main(argv: list[str] | None = None) -> dict:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as td:
        for label, kind, path in inputs(Path(td)):
            runs = [("64 (default)", 64.0, 0.0)]
            if kind == "bomb":
                runs.append(("off (inf), 4 GiB address cap", math.inf, float(ADDRESS_CAP_MB)))
            for budget, mp, cap in runs:
                r = measure_load_rss(path, mp, cap)
                rows.append({"input": label, "bytes": path.stat().st_size, "budget_megapixels": budget, **r})
                print(f"{label} | budget {budget}: +{r['delta_mb']:.1f} MB ({r['outcome'][:90]})", flush=True)
    film = rows[0]["delta_mb"]
    for r in rows:
        r["delta_vs_film"] = r["delta_mb"] / film if film > 0 else None
    res = {"machine": {"cpu": cpu_name(), "python": platform.python_version()}, "rows": rows,
           "method": "VmHWM growth over a baseline after imports + warm-up loads, one fresh interpreter per row"}
    write_results(res)
    return res


def write_results(res: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "input_gate.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = ["# Input gate: peak memory of one load", "",
             f"CPU: {res['machine']['cpu']}; Python {res['machine']['python']}. {res['method']}; "
             f"baseline ~{res['rows'][0]['baseline_mb']:.0f} MB. Command: `python benchmarks/input_gate.py`.", "",
             "| input | pixel budget (MP) | peak RSS growth (MB) | vs the real film | outcome |",
             "|---|---|---:|---:|---|"]
    for r in res["rows"]:
        outcome = r["outcome"].split(" (raise it with")[0].replace("|", "/")
        ratio = f"{r['delta_vs_film']:.2f}x" if r["delta_vs_film"] is not None else "-"
        lines.append(f"| {r['input']} | {r['budget_megapixels']} | {r['delta_mb']:.1f} | {ratio} | {outcome} |")
    (RESULTS / "input_gate.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
