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
of every file. `verify_bundle` checks all of it before anything runs; every failure is a BundleError
whose message says what is wrong and what to do. Torch-free.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

FORMAT = "emrrg-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_CHUNK = 1 << 20


class BundleError(RuntimeError):
    """A bundle that cannot be used as it is (missing file, sha mismatch, unknown format, ...)."""


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


def load_manifest(bundle: str | Path) -> dict[str, Any]:
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: no such bundle directory (make one with emrrg-export)")
    mf = bundle / MANIFEST
    if not mf.is_file():
        raise BundleError(f"{bundle}: no {MANIFEST}; this is not a complete bundle (re-run emrrg-export)")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mf}: unreadable manifest ({e}); re-run emrrg-export") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{mf}: not an emrrg bundle manifest (format {manifest.get('format')!r})"
                          if isinstance(manifest, dict) else f"{mf}: not an emrrg bundle manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{mf}: bundle format version {version!r} is not supported by this runtime "
                          f"(it reads version {FORMAT_VERSION}); re-export with a matching emrrg-export "
                          f"or install a matching emrrg runtime")
    return manifest


def verify_bundle(bundle: str | Path, check_sha: bool = True) -> dict[str, Any]:
    """Load the manifest and check every listed file: present, same size, same sha256."""
    bundle = Path(bundle)
    manifest = load_manifest(bundle)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{bundle / MANIFEST}: lists no files; re-run emrrg-export")
    for rel, want in files.items():
        p = bundle / rel
        if not p.is_file():
            raise BundleError(f"{bundle}: missing file {rel!r}; the bundle is incomplete — copy it again or re-export")
        size = p.stat().st_size
        if size != want.get("bytes"):
            raise BundleError(f"{bundle}: {rel!r} has {size} bytes, the manifest says {want.get('bytes')} "
                              "(truncated or changed); copy the bundle again or re-export")
        if check_sha and sha256_file(p) != want.get("sha256"):
            raise BundleError(f"{bundle}: sha256 mismatch for {rel!r} (the file was changed or corrupted); "
                              "copy the bundle again or re-export")
    for name, art in manifest.get("artifacts", {}).items():
        for rel in [art.get("path"), *art.get("data", [])]:
            if rel and rel not in files:
                raise BundleError(f"{bundle}: artifact {name!r} file {rel!r} is not covered by the manifest's file list")
    return manifest


def bundle_digest(manifest: dict[str, Any]) -> str:
    """A stable id for a bundle: sha256 over its files' digests (what `emrrg-run --json` reports)."""
    h = hashlib.sha256()
    for rel in sorted(manifest["files"]):
        h.update(f"{rel}\0{manifest['files'][rel]['sha256']}\n".encode())
    return h.hexdigest()
