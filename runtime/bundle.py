"""The bundle that `emrrg-export` writes and the runtime reads: layout, manifest, verification.

    BUNDLE/manifest.json
    BUNDLE/encoder.onnx           pixel_values (B, V, 3, S, S) -> visual_tokens (B, L, H); com.emrrg::SelectiveScan
    BUNDLE/encoder.scan.onnx      the same with a standard ONNX Scan (runs without the op library)
    BUNDLE/encoder.weights        the weights of both encoder files, each tensor once (ONNX external data)
    BUNDLE/decoder.onnx[.data]    inputs_embeds + KV cache -> logits + present (4-bit MatMulNBits or f32)
    BUNDLE/cross_kv.onnx          visual_tokens -> visual K/V of the hybrid layers (hybrid decoders only)
    BUNDLE/embed_tokens.npy       (V, H) token embeddings, so visual tokens splice into inputs_embeds: f32, or
                                  int8 blocks with BUNDLE/embed_scales.npy in 4-bit bundles (runtime/embedding.py)
    BUNDLE/tokenizer/tokenizer.json

manifest.json (format "emrrg-bundle", format_version 1) holds the emrrg version, the source checkpoint's
sha256, the model config, prompt ids and generation settings, one entry per artifact (path, bytes,
sha256, precision, target, ...), calibration facts, validation figures, and `files`: bytes and sha256
of every file. What each section must hold, the names and the limits are the contract
(emrrg.runtime.contract). `open_bundle` checks all of it before anything runs, in this order: the
manifest's schema and limits; every path inside the bundle (before any file is stat-ed or read); each
listed file's presence, size and sha256; the embedding table's header against the token ids. Every
failure is a BundleError whose one-line message says what is wrong and what to do. Torch-free.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from emrrg.runtime.contract import (FORMAT, FORMAT_VERSION, MANIFEST, MAX_MANIFEST_BYTES, BundleError, Manifest, check_embedding,
                       check_paths, parse_manifest, resolve_inside)

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_tree(root: str | Path) -> str:
    """One digest for a directory: sha256 over the sorted (relative path, file sha256) pairs."""
    root = Path(root)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(f"{p.relative_to(root).as_posix()}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


def file_entry(root: Path, rel: str) -> dict[str, Any]:
    p = root / rel
    return {"bytes": p.stat().st_size, "sha256": sha256_file(p)}


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object that names a key twice is refused: readers disagree on which value wins."""
    d: dict = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"the key {k!r} appears twice in one object")
        d[k] = v
    return d


def read_manifest(bundle: str | Path) -> Manifest:
    """manifest.json checked against the contract, its paths bound to the bundle; no other file is read."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: no such bundle directory (make one with emrrg-export)")
    mf = bundle / MANIFEST
    resolve_inside(bundle, MANIFEST, "the manifest", str(mf))
    if not mf.is_file():
        raise BundleError(f"{bundle}: no {MANIFEST}; this is not a complete bundle (re-run emrrg-export)")
    if mf.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{mf}: {mf.stat().st_size} bytes is too large for a manifest (at most "
                          f"{MAX_MANIFEST_BYTES >> 20} MiB); re-run emrrg-export")
    try:
        raw = json.loads(mf.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise BundleError(f"{mf}: unreadable manifest ({e}); re-run emrrg-export") from None
    return check_paths(bundle, parse_manifest(raw, str(mf)), str(mf))


def open_bundle(bundle: str | Path, check_sha: bool = True) -> Manifest:
    """The checked manifest of a bundle: contract, paths, every listed file (present, same size, same
    sha256 unless check_sha is False) and the embedding table against the token ids."""
    m = read_manifest(bundle)
    where = str(Path(bundle) / MANIFEST)
    for rel, want in m.files.items():
        p = m.root / rel
        if not p.is_file():
            raise BundleError(f"{bundle}: missing file {rel!r}; the bundle is incomplete — copy it again or re-export")
        size = p.stat().st_size
        if size != want.bytes:
            raise BundleError(f"{bundle}: {rel!r} has {size} bytes, the manifest says {want.bytes} "
                              "(truncated or changed); copy the bundle again or re-export")
        if check_sha and sha256_file(p) != want.sha256:
            raise BundleError(f"{bundle}: sha256 mismatch for {rel!r} (the file was changed or corrupted); "
                              "copy the bundle again or re-export")
    check_embedding(m, where)
    return m


def verify_bundle(bundle: str | Path, check_sha: bool = True) -> dict[str, Any]:
    """open_bundle's checks; returns the manifest as a JSON object."""
    return open_bundle(bundle, check_sha).raw


def load_manifest(bundle: str | Path) -> dict[str, Any]:
    """The manifest as a JSON object, after every check but the sha256 of the files (fast: sizes only)."""
    return open_bundle(bundle, check_sha=False).raw


def bundle_digest(manifest: dict[str, Any]) -> str:
    """A stable id for a bundle: sha256 over its files' digests (what `emrrg-run --json` reports)."""
    h = hashlib.sha256()
    for rel in sorted(manifest["files"]):
        h.update(f"{rel}\0{manifest['files'][rel]['sha256']}\n".encode())
    return h.hexdigest()


__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "BundleError", "Manifest", "sha256_file", "sha256_tree", "file_entry",
           "read_manifest", "open_bundle", "verify_bundle", "load_manifest", "bundle_digest"]
