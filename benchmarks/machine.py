"""What the benchmarks record about the machine they ran on (Linux /proc/cpuinfo, with fallbacks) and the code."""
from __future__ import annotations

import platform
import subprocess
from pathlib import Path


def _cpuinfo_field(key: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU model ("AMD EPYC ..."), else what platform reports."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The CPU's feature flags (avx2, avx512_vnni, amx_tile, ...); empty where unknown."""
    return set((_cpuinfo_field("flags") or "").split())


def code_version() -> dict:
    """HEAD and the last commit of the decoder's builder / 4-bit quantizer, and whether they had local edits."""
    def git(*args: str) -> str:
        r = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""

    files = ["export/decoder_builder.py", "export/quantize_decoder.py"]
    return {"head": git("rev-parse", "--short", "HEAD"), "decoder_code_commit": git("log", "-1", "--format=%h %s", "--", *files)[:120],
            "decoder_code_local_edits": bool(git("status", "--porcelain", "--", *files))}
