"""What the benchmarks record about the machine they ran on (Linux /proc/cpuinfo, with fallbacks)."""
from __future__ import annotations

import platform
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
