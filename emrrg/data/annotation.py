"""R2Gen-style ``annotation.json``: read, write and check.

The layout R2Gen (Chen et al., 2020) uses for IU X-Ray and MIMIC-CXR, and that EMRRG's training
code reads::

    {"train": [{"id": "...", "report": "...", "image_path": ["rel/path.png", ...], ...}, ...],
     "val":   [...],
     "test":  [...]}

``image_path`` entries are relative to the annotation file's folder. Extra keys per example
(``labels``, ``source_id``, ...) are allowed and ignored by R2Gen-style loaders.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["SPLITS", "REQUIRED_KEYS", "validate_annotation", "load_annotation", "write_annotation", "missing_images"]

SPLITS: tuple[str, ...] = ("train", "val", "test")
REQUIRED_KEYS: tuple[str, ...] = ("id", "report", "image_path")


def validate_annotation(ann: Mapping[str, Any], root: Path | None = None) -> None:
    """Raise ``ValueError`` unless ``ann`` has the three splits, the required keys, unique ids and,
    when ``root`` is given, existing image files."""
    missing = [s for s in SPLITS if s not in ann]
    if missing:
        raise ValueError(f"annotation lacks splits {missing}")
    seen: set[str] = set()
    for split in SPLITS:
        examples = ann[split]
        if not isinstance(examples, list):
            raise ValueError(f"split {split!r} must be a list")
        for ex in examples:
            lack = [k for k in REQUIRED_KEYS if k not in ex]
            if lack:
                raise ValueError(f"example {ex.get('id')!r} in {split!r} lacks {lack}")
            if not isinstance(ex["image_path"], list) or not ex["image_path"]:
                raise ValueError(f"example {ex['id']!r}: image_path must be a non-empty list")
            if ex["id"] in seen:
                raise ValueError(f"duplicate id {ex['id']!r}")
            seen.add(ex["id"])
            if root is not None:
                gone = missing_images([ex], root)
                if gone:
                    raise ValueError(f"example {ex['id']!r}: {gone[0]} does not exist")


def missing_images(examples: Sequence[Mapping[str, Any]], root: Path) -> list[Path]:
    """The image files of `examples` (``image_path`` entries, relative to ``root``) that do not exist."""
    return [root / p for ex in examples for p in ex["image_path"] if not (root / p).is_file()]


def load_annotation(path: str | Path, check_images: bool = False) -> dict[str, list[dict[str, Any]]]:
    """Read and validate an ``annotation.json``."""
    path = Path(path)
    ann = json.loads(path.read_text(encoding="utf-8"))
    validate_annotation(ann, path.parent if check_images else None)
    return ann


def write_annotation(path: str | Path, splits: Mapping[str, Sequence[Mapping[str, Any]]]) -> Path:
    """Validate and write ``{"train", "val", "test"}`` to ``path`` (stable key order, UTF-8)."""
    path = Path(path)
    ann = {s: [dict(ex) for ex in splits[s]] for s in SPLITS}
    validate_annotation(ann)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ann, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
