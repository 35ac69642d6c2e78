"""The bundle contract: what `emrrg-export` writes and the runtime reads, defined once. Torch-free.

    names    the artifact keys of manifest["artifacts"] (ENCODER, DECODER, ...), the file names the writer
             uses (ENCODER_FILE, ...), and the ONNX input/output names of the encoder, decoder and cross_kv
             (ENCODER_INPUT, decoder_input_names(num_layers, hybrid_layers), ...)
    limits   the range every number of the manifest must lie in, each with why (MAX_IMAGE_SIZE, ...)
    schema   parse_manifest(dict) -> Manifest: frozen dataclasses, every field checked explicitly; a defect
             is one BundleError naming the key path, e.g.
             "manifest.json: encoder.image_size must be an int in [16, 1024], got 100000; re-export ..."
    paths    resolve_inside(root, rel): every file the runtime opens from the manifest (the `files` list,
             each artifact's path / data / scales) must be a relative path without '..' that resolves,
             symbolic links followed, inside the bundle. It is checked before the file is stat-ed, hashed
             or opened, so no message says anything about a file outside the bundle.
    tables   check_embedding(manifest, where): the embedding table's (rows, hidden), read from the .npy
             header only, must match decoder.vocab / decoder.hidden, so every token id the manifest holds
             indexes a real row.
    io       expected_io(manifest, artifact) / check_io(...): the names and fixed dims an ONNX session must
             show (the runtime checks each session it makes).

Format: "emrrg-bundle", format_version 1. The writer (emrrg.export.bundle.write_manifest) validates
its output with parse_manifest before it publishes a bundle; the reader is emrrg.runtime.bundle.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

FORMAT = "emrrg-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class BundleError(RuntimeError):
    """A bundle that cannot be used as it is (missing file, sha mismatch, unknown format, a manifest defect, ...)."""


# ---- artifact keys (manifest["artifacts"]) and the file names the writer gives them ------------------------
ENCODER = "encoder"                    # encoder.onnx: com.emrrg::SelectiveScan, needs the op library
ENCODER_FALLBACK = "encoder_fallback"  # encoder.scan.onnx: the same with a standard ONNX Scan
DECODER = "decoder"
CROSS_KV = "cross_kv"                  # hybrid decoders only
EMBED_TOKENS = "embed_tokens"
TOKENIZER = "tokenizer"
REQUIRED_ARTIFACTS = (ENCODER, DECODER, EMBED_TOKENS, TOKENIZER)

ENCODER_FILE = "encoder.onnx"
ENCODER_SCAN_FILE = "encoder.scan.onnx"
ENCODER_DATA_FILE = "encoder.weights"  # the weights both encoder files share (ONNX external data)
DECODER_FILE = "decoder.onnx"
DECODER_DATA_FILE = DECODER_FILE + ".data"
CROSS_KV_FILE = "cross_kv.onnx"
EMBED_TOKENS_FILE = "embed_tokens.npy"
EMBED_SCALES_FILE = "embed_scales.npy"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILE = f"{TOKENIZER_DIR}/tokenizer.json"

EMBED_FP32, EMBED_Q8 = "fp32", "int8-block"   # embed_tokens precisions (runtime/embedding.py)

# ---- ONNX input / output names -------------------------------------------------------------------------
ENCODER_INPUT = "pixel_values"     # (B, V, 3, S, S) f32
ENCODER_OUTPUT = "visual_tokens"   # (B, L, H) f32
CROSS_KV_INPUT = ENCODER_OUTPUT
INPUTS_EMBEDS = "inputs_embeds"    # (B, T, H) f32
ATTENTION_MASK = "attention_mask"  # (B, P+T) i64
POSITION_IDS = "position_ids"      # (B, T) i64
LOGITS = "logits"                  # (B, T, V) f32
KV = ("key", "value")
# How decoder.onnx keeps its KV cache (the manifest's decoder.cache):
CACHE_CONCAT = "concat"   # the traced graph: position_ids input, present = past ++ new positions
CACHE_SHARED = "shared"   # the built graph (export/decoder_builder.py): no position_ids; one buffer per layer
                          # may be bound as both past and present, written in place
CACHE_MODES = (CACHE_CONCAT, CACHE_SHARED)


def past_name(layer: int, kv: str) -> str:
    """Decoder input: the cache of `layer` before this call, (B, kv_heads, P, head_dim)."""
    return f"past_key_values.{layer}.{kv}"


def present_name(layer: int, kv: str) -> str:
    """Decoder output: the cache of `layer` after this call, (B, kv_heads, P+T, head_dim)."""
    return f"present.{layer}.{kv}"


def visual_kv_name(layer: int, kv: str) -> str:
    """cross_kv output and decoder input of hybrid layer `layer`: (B, heads_j, Lv, head_dim_j)."""
    return f"visual_kv.{layer}.{kv}"


def past_names(num_layers: int) -> list[str]:
    return [past_name(i, kv) for i in range(num_layers) for kv in KV]


def present_names(num_layers: int) -> list[str]:
    return [present_name(i, kv) for i in range(num_layers) for kv in KV]


def visual_kv_names(hybrid_layers: Iterable[int]) -> list[str]:
    return [visual_kv_name(j, kv) for j in hybrid_layers for kv in KV]


def decoder_input_names(num_layers: int, hybrid_layers: Iterable[int] = (), cache: str = CACHE_CONCAT) -> list[str]:
    pos = [POSITION_IDS] if cache == CACHE_CONCAT else []
    return [INPUTS_EMBEDS, ATTENTION_MASK, *pos, *past_names(num_layers), *visual_kv_names(hybrid_layers)]


def decoder_output_names(num_layers: int) -> list[str]:
    return [LOGITS, *present_names(num_layers)]


# ---- limits ---------------------------------------------------------------------------------------------
# Image side in pixels. The encoders cut 16-px patches, so below 16 there is no token; the presets use
# 64-224 px (upstream 224). At 1024 px a view is 12 MiB of f32 pixels and 4096 patches; an edited 100000
# made preprocessing ask for 120 GB before anything else could notice.
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 1024
MAX_VISUAL_TOKENS = (MAX_IMAGE_SIZE // MIN_IMAGE_SIZE) ** 2 + 1   # every patch of the largest image + cls
# The EMRRG prompt is ~30 ids with SmolLM2's tokenizer and ~115 with the byte-level tiny one.
MAX_PROMPT_IDS = 4096
# Reports are 40-120 new tokens upstream; max_positions_new (the cache's room for new tokens) defaults to 512.
MAX_NEW_TOKENS = 4096
MAX_BEAMS = 16                 # upstream decodes with 3-5 beams; each beam is one more KV-cache row
MAX_LAYERS = 256               # Llama-2-7B has 32 decoder layers, Llama-3.1-405B 126
MAX_HEADS = 256                # Llama-3.1-405B has 128 query heads
MAX_HEAD_DIM = 512             # Llama 128, Gemma 256
MAX_HIDDEN = 65536             # Llama-3.1-405B 16384
MAX_VOCAB = 1 << 20            # Llama-3 128256, Gemma 256000
# K and V, double-buffered, for the bundle's own default report (beams x (prompt + visual + new tokens)):
# a Llama-2-7B bundle with the iu preset (5 beams, 100 new tokens) needs 3.4 GB; 16 GiB is a quarter of
# the largest Jetson's memory and stops an edit that multiplies layers, heads and beams together.
MAX_KV_CACHE_BYTES = 16 << 30
# Upstream uses penalties of 1.0-2.0; a value beyond 100 is an edit, not a setting.
MAX_PENALTY = 100.0
MAX_FILES = 4096               # a bundle lists about 10 files
MAX_ARTIFACT_DATA = 64         # external-data files per artifact (the writer uses at most one)
MAX_FILE_BYTES = 1 << 44       # 16 TiB: more than any disk a bundle is copied to
MAX_MANIFEST_BYTES = 64 << 20  # real manifests are 10-100 KB, validation figures included
_SHORT = 60                    # characters of an offending value shown in a message

ADVICE = "re-export the bundle with emrrg-export or copy an intact one"


# ---- the schema -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileEntry:
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Artifact:
    path: str
    precision: str
    target: str | None = None
    data: tuple[str, ...] = ()              # external-data files of an ONNX artifact; embed_tokens' scales
    requires_op_library: bool = False
    scan_variant: str | None = None
    scales: str | None = None               # embed_tokens, precision int8-block
    block_size: int | None = None
    bytes: int | None = None                # filled in by the writer: path + data
    sha256: str | None = None               # of `path`

    @property
    def files(self) -> tuple[str, ...]:
        """Every bundle file this artifact opens."""
        return tuple(dict.fromkeys((self.path, *self.data, *([self.scales] if self.scales else []))))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path, "precision": self.precision, "target": self.target,
                             "data": list(self.data)}
        if self.scan_variant is not None:
            d.update(scan_variant=self.scan_variant, requires_op_library=self.requires_op_library)
        for k in ("scales", "block_size", "bytes", "sha256"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        return d


@dataclass(frozen=True)
class Prompt:
    """Token ids around the visual tokens: before_ids + visual + after_ids (BOS included in before_ids)."""
    before_ids: tuple[int, ...]
    after_ids: tuple[int, ...]
    before: str | None = None
    after: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"before": self.before, "after": self.after, "before_ids": list(self.before_ids),
                "after_ids": list(self.after_ids)}


@dataclass(frozen=True)
class Generation:
    """The decoding defaults; the section may hold further settings (kept in Manifest.raw)."""
    num_beams: int
    repetition_penalty: float
    length_penalty: float
    min_new_tokens: int
    max_new_tokens: int
    max_positions_new: int = 512            # the cache's room for new tokens (older bundles lack it)
    no_repeat_ngram_size: int = 0


@dataclass(frozen=True)
class Tokens:
    eos_token_id: int
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    unk_token_id: int | None = None
    unk_token: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
                "pad_token_id": self.pad_token_id, "unk_token_id": self.unk_token_id, "unk_token": self.unk_token}


@dataclass(frozen=True)
class EncoderInfo:
    image_size: int
    num_tokens: int
    hidden: int

    def to_dict(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "num_tokens": self.num_tokens, "hidden": self.hidden,
                "input": f"{ENCODER_INPUT} (B, V, 3, S, S)", "output": ENCODER_OUTPUT}


@dataclass
class DecoderIO:
    """The numbers that fix decoder.onnx's inputs and outputs (the manifest's `decoder` section).
    emrrg.export.decoder_onnx.DecoderSpec extends it with what only the exporter needs."""
    num_layers: int
    num_heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    vocab: int
    hybrid_layers: list[int] = field(default_factory=list)
    hybrid_heads: list[int] = field(default_factory=list)     # per hybrid layer, same order
    hybrid_head_dim: list[int] = field(default_factory=list)
    cache: str = CACHE_CONCAT

    @property
    def past_names(self) -> list[str]:
        return past_names(self.num_layers)

    @property
    def present_names(self) -> list[str]:
        return present_names(self.num_layers)

    @property
    def visual_kv_names(self) -> list[str]:
        return visual_kv_names(self.hybrid_layers)

    @property
    def input_names(self) -> list[str]:
        return decoder_input_names(self.num_layers, self.hybrid_layers, self.cache)

    @property
    def output_names(self) -> list[str]:
        return decoder_output_names(self.num_layers)


@dataclass(frozen=True)
class Manifest:
    """A manifest that passed parse_manifest; `raw` is the JSON object as read (every section, for reports)."""
    raw: dict
    prompt: Prompt
    generation: Generation
    tokens: Tokens
    encoder: EncoderInfo
    decoder: DecoderIO
    artifacts: dict[str, Artifact]
    files: dict[str, FileEntry]
    emrrg_version: str | None = None
    root: Path | None = None                # the bundle directory, once the paths were checked against it

    def path(self, artifact: str) -> Path:
        """The checked location of an artifact's main file."""
        if self.root is None:
            raise BundleError("this manifest was not checked against a bundle directory (use emrrg.runtime.bundle)")
        return self.root / self.artifacts[artifact].path

    def generation_settings(self) -> dict[str, Any]:
        """The generation section as a fresh dict: its checked fields, and any further settings it holds."""
        return {**self.raw["generation"], **dataclasses.asdict(self.generation)}

    @property
    def max_len(self) -> int:
        """Positions the decoder's cache must hold: the prompt with its visual tokens, and the new tokens."""
        p = self.prompt
        return len(p.before_ids) + self.encoder.num_tokens + len(p.after_ids) + self.generation.max_positions_new


def _type(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a bool", int: "an int",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _show(v: Any) -> str:
    text = json.dumps(v, default=str) if isinstance(v, (dict, list, str)) else repr(v)
    text = text if len(text) <= _SHORT else text[:_SHORT - 3] + "..."
    return f"{_type(v)} {text}" if isinstance(v, (dict, list, str)) else text


def _key(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key)}]"


_MISSING = object()


class _Checker:
    """Reads one manifest; every refusal is a BundleError "<where>: <key path> <what>, got <value>; <advice>"."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, path: str, what: str, got: Any = _MISSING) -> BundleError:
        shown = "" if got is _MISSING else f", got {_show(got)}"
        return BundleError(f"{self.where}: {path} {what}{shown}; {ADVICE}")

    def get(self, d: dict, path: str, key: str, default: Any = _MISSING) -> Any:
        if key in d:
            return d[key]
        if default is _MISSING:
            raise self.fail(_key(path, key), "is missing")
        return default

    def obj(self, v: Any, path: str) -> dict:
        if not isinstance(v, dict):
            raise self.fail(path, "must be an object", v)
        return v

    def section(self, d: dict, path: str, key: str, default: Any = _MISSING) -> dict:
        return self.obj(self.get(d, path, key, default), _key(path, key))

    def integer(self, d: dict, path: str, key: str, lo: int, hi: int, default: Any = _MISSING, why: str = "") -> Any:
        v = self.get(d, path, key, default)
        if v is None and default is None:
            return None
        return self.int_value(v, _key(path, key), lo, hi, why)

    def int_value(self, v: Any, path: str, lo: int, hi: int, why: str = "") -> int:
        if type(v) is not int or not lo <= v <= hi:
            raise self.fail(path, f"must be an int in [{lo}, {hi}]{why}", v)
        return v

    def number(self, d: dict, path: str, key: str, lo: float, hi: float, *, open_lo: bool = False) -> float:
        v = self.get(d, path, key)
        ok = type(v) in (int, float) and math.isfinite(v) and (lo < v if open_lo else lo <= v) and v <= hi
        if not ok:
            raise self.fail(_key(path, key), f"must be a number in {'(' if open_lo else '['}{lo}, {hi}]", v)
        return float(v)

    def string(self, d: dict, path: str, key: str, default: Any = _MISSING, empty: bool = False) -> Any:
        v = self.get(d, path, key, default)
        if v is None and default is None:
            return None
        if not isinstance(v, str) or not (v or empty):
            raise self.fail(_key(path, key), "must be a string" if empty else "must be a non-empty string", v)
        return v

    def flag(self, d: dict, path: str, key: str, default: bool) -> bool:
        v = self.get(d, path, key, default)
        if not isinstance(v, bool):
            raise self.fail(_key(path, key), "must be true or false", v)
        return v

    def array(self, d: dict, path: str, key: str, max_len: int, default: Any = _MISSING) -> list:
        v = self.get(d, path, key, default)
        if not isinstance(v, list):
            raise self.fail(_key(path, key), "must be an array", v)
        if len(v) > max_len:
            raise self.fail(_key(path, key), f"must have at most {max_len} entries, has {len(v)}")
        return v

    def ints(self, d: dict, path: str, key: str, lo: int, hi: int, max_len: int, why: str = "",
             default: Any = _MISSING) -> list[int]:
        p = _key(path, key)
        return [self.int_value(x, _key(p, i), lo, hi, why) for i, x in enumerate(self.array(d, path, key, max_len, default))]

    def relpath(self, v: Any, path: str) -> str:
        """A bundle-relative POSIX path: not absolute, no '..', no empty or NUL, no backslash."""
        if not isinstance(v, str) or not v:
            raise self.fail(path, "must be a non-empty path string", v)
        bad = ("is an absolute path; bundle paths are relative to the bundle directory" if v.startswith("/") else
               "climbs out of the bundle with '..'" if ".." in v.split("/") else
               "holds a NUL or backslash; bundle paths are POSIX relative paths" if "\0" in v or "\\" in v else
               "names the bundle directory itself, not a file" if all(part in ("", ".") for part in v.split("/")) else
               None)
        if bad:
            raise self.fail(path, f"{json.dumps(v)} {bad}")
        return v


def parse_manifest(raw: Any, where: str = MANIFEST) -> Manifest:
    """Check a manifest's JSON object against the contract (no file access); every defect is a BundleError."""
    c = _Checker(where)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        got = f" (format {_show(raw.get('format'))})" if isinstance(raw, dict) else ""
        raise BundleError(f"{where}: not an emrrg bundle manifest{got}; {ADVICE}")
    version = raw.get("format_version")
    if version != FORMAT_VERSION or type(version) is not int:
        raise BundleError(f"{where}: bundle format version {version!r} is not supported by this runtime "
                          f"(it reads version {FORMAT_VERSION}); re-export with a matching emrrg-export "
                          f"or install a matching emrrg runtime")
    for key in ("source", "config", "merge", "calibration", "validation", "export_options"):
        if key in raw:
            c.section(raw, "", key)                   # informational, but read as objects by reports
    emrrg_version = c.string(raw, "", "emrrg_version", None)

    # decoder first: its vocabulary bounds every token id below
    d = c.section(raw, "", "decoder")
    num_layers = c.integer(d, "decoder", "num_layers", 1, MAX_LAYERS)
    num_heads = c.integer(d, "decoder", "num_heads", 1, MAX_HEADS)
    kv_heads = c.integer(d, "decoder", "kv_heads", 1, MAX_HEADS)
    if num_heads % kv_heads:
        raise c.fail("decoder.num_heads", f"({num_heads}) must be a multiple of decoder.kv_heads ({kv_heads})")
    head_dim = c.integer(d, "decoder", "head_dim", 1, MAX_HEAD_DIM)
    hidden = c.integer(d, "decoder", "hidden", 1, MAX_HIDDEN)
    vocab = c.integer(d, "decoder", "vocab", 1, MAX_VOCAB)
    hybrid = c.ints(d, "decoder", "hybrid_layers", 0, num_layers - 1, MAX_LAYERS, " (a decoder layer)", default=[])
    if hybrid != sorted(set(hybrid)):
        raise c.fail("decoder.hybrid_layers", "must be ascending without repeats", hybrid)
    hyb_heads = c.ints(d, "decoder", "hybrid_heads", 1, MAX_HEADS, MAX_LAYERS, default=[])
    hyb_dim = c.ints(d, "decoder", "hybrid_head_dim", 1, MAX_HEAD_DIM, MAX_LAYERS, default=[])
    for key, v in (("hybrid_heads", hyb_heads), ("hybrid_head_dim", hyb_dim)):
        if v and len(v) != len(hybrid):
            raise c.fail(f"decoder.{key}", f"must have one entry per hybrid layer ({len(hybrid)})", v)
    cache = c.get(d, "decoder", "cache", CACHE_CONCAT)
    if cache not in CACHE_MODES:
        raise c.fail("decoder.cache", f"must be one of {', '.join(map(repr, CACHE_MODES))}", cache)
    dec = DecoderIO(num_layers, num_heads, kv_heads, head_dim, hidden, vocab, hybrid, hyb_heads, hyb_dim, cache)
    for key, want in (("input_names", dec.input_names), ("output_names", dec.output_names)):
        if key in d and d[key] != want:
            raise c.fail(f"decoder.{key}", f"must be the contract's names for {num_layers} layers and hybrid layers "
                                           f"{hybrid} ({', '.join(want[:4])}, ...)", d[key])
    token = f" (a token id: decoder.vocab is {vocab})"

    e = c.section(raw, "", "encoder")
    enc = EncoderInfo(image_size=c.integer(e, "encoder", "image_size", MIN_IMAGE_SIZE, MAX_IMAGE_SIZE),
                      num_tokens=c.integer(e, "encoder", "num_tokens", 1, MAX_VISUAL_TOKENS),
                      hidden=c.integer(e, "encoder", "hidden", 1, MAX_HIDDEN))
    if enc.hidden != hidden:
        raise c.fail("encoder.hidden", f"({enc.hidden}) must equal decoder.hidden ({hidden}): the visual tokens "
                                       "are spliced into the decoder's inputs_embeds")

    p = c.section(raw, "", "prompt")
    prompt = Prompt(before_ids=tuple(c.ints(p, "prompt", "before_ids", 0, vocab - 1, MAX_PROMPT_IDS, token)),
                    after_ids=tuple(c.ints(p, "prompt", "after_ids", 0, vocab - 1, MAX_PROMPT_IDS, token)),
                    before=c.string(p, "prompt", "before", None, empty=True),
                    after=c.string(p, "prompt", "after", None, empty=True))

    t = c.section(raw, "", "tokens")
    tokens = Tokens(eos_token_id=c.integer(t, "tokens", "eos_token_id", 0, vocab - 1, why=token),
                    **{k: c.integer(t, "tokens", k, 0, vocab - 1, None, token)
                       for k in ("bos_token_id", "pad_token_id", "unk_token_id")},
                    unk_token=c.string(t, "tokens", "unk_token", None))

    g = c.section(raw, "", "generation")
    max_new = c.integer(g, "generation", "max_new_tokens", 1, MAX_NEW_TOKENS)
    gen = Generation(num_beams=c.integer(g, "generation", "num_beams", 1, MAX_BEAMS),
                     repetition_penalty=c.number(g, "generation", "repetition_penalty", 0.0, MAX_PENALTY, open_lo=True),
                     length_penalty=c.number(g, "generation", "length_penalty", -MAX_PENALTY, MAX_PENALTY),
                     min_new_tokens=c.integer(g, "generation", "min_new_tokens", 0, MAX_NEW_TOKENS),
                     max_new_tokens=max_new,
                     max_positions_new=c.integer(g, "generation", "max_positions_new", max_new, MAX_NEW_TOKENS, 512,
                                             " (at least generation.max_new_tokens)"),
                     no_repeat_ngram_size=c.integer(g, "generation", "no_repeat_ngram_size", 0, MAX_NEW_TOKENS, 0))
    rows = gen.num_beams * (len(prompt.before_ids) + enc.num_tokens + len(prompt.after_ids) + gen.max_new_tokens)
    cache = rows * num_layers * kv_heads * head_dim * 2 * 2 * 4   # K and V, two buffers, f32
    if cache > MAX_KV_CACHE_BYTES:
        raise c.fail("generation", f"with decoder {num_layers} layers x {kv_heads} KV heads x {head_dim} needs a "
                                   f"{cache / 2**30:.0f} GiB KV cache for one default report (limit "
                                   f"{MAX_KV_CACHE_BYTES >> 30} GiB): num_beams {gen.num_beams}, max_new_tokens {max_new}")

    f = c.section(raw, "", "files")
    if not f:
        raise c.fail("files", "lists no files")
    if len(f) > MAX_FILES:
        raise c.fail("files", f"must list at most {MAX_FILES} files, lists {len(f)}")
    files = {}
    for rel, entry in f.items():
        at = _key("files", rel)
        c.relpath(rel, f"{at} (the file name)")
        entry = c.obj(entry, at)
        sha = c.string(entry, at, "sha256")
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise c.fail(_key(at, "sha256"), "must be 64 lowercase hex digits", sha)
        files[rel] = FileEntry(bytes=c.integer(entry, at, "bytes", 0, MAX_FILE_BYTES), sha256=sha)

    a = c.section(raw, "", "artifacts")
    arts = {}
    for name, art in a.items():
        at = _key("artifacts", name)
        art = c.obj(art, at)
        kw: dict[str, Any] = dict(
            path=c.relpath(c.get(art, at, "path"), _key(at, "path")),
            precision=c.string(art, at, "precision"), target=c.string(art, at, "target", None),
            data=tuple(c.relpath(x, _key(_key(at, "data"), i))
                       for i, x in enumerate(c.array(art, at, "data", MAX_ARTIFACT_DATA, []))),
            requires_op_library=c.flag(art, at, "requires_op_library", False),
            scan_variant=c.string(art, at, "scan_variant", None),
            bytes=c.integer(art, at, "bytes", 0, MAX_FILE_BYTES, None), sha256=c.string(art, at, "sha256", None))
        if name == EMBED_TOKENS:
            if kw["precision"] not in (EMBED_FP32, EMBED_Q8):
                raise c.fail(_key(at, "precision"), f"must be {EMBED_FP32!r} or {EMBED_Q8!r} (this runtime knows no "
                                                    "other embedding table; update emrrg)", kw["precision"])
            if kw["precision"] == EMBED_Q8:
                kw["scales"] = c.relpath(c.get(art, at, "scales"), _key(at, "scales"))
                kw["block_size"] = c.integer(art, at, "block_size", 1, MAX_HIDDEN)
        arts[name] = Artifact(**kw)
        for rel in arts[name].files:
            if rel not in files:
                raise c.fail(at, f"file {json.dumps(rel)} is not covered by the manifest's file list")
    for name in REQUIRED_ARTIFACTS + ((CROSS_KV,) if hybrid else ()):
        if name not in arts:
            why = f" (the decoder has hybrid layers {hybrid})" if name == CROSS_KV else ""
            raise c.fail(_key("artifacts", name), f"is missing{why}")
    return Manifest(raw=raw, prompt=prompt, generation=gen, tokens=tokens, encoder=enc, decoder=dec,
                    artifacts=arts, files=files, emrrg_version=emrrg_version)


# ---- paths ------------------------------------------------------------------------------------------------
def resolve_inside(root: str | Path, rel: str, what: str, where: str) -> Path:
    """`root / rel` with every symbolic link followed, refused unless it stays inside `root` (resolved too).
    Nothing is opened or stat-ed beyond what resolving links needs, so a refusal tells nothing about the target."""
    _Checker(where).relpath(rel, what)
    base = Path(root).resolve()
    try:
        p = (base / rel).resolve()
    except (OSError, RuntimeError):  # a symbolic link loop
        raise BundleError(f"{where}: {what} {json.dumps(rel)} cannot be resolved (a symbolic link loop); {ADVICE}") from None
    if p != base and base not in p.parents:
        raise BundleError(f"{where}: {what} {json.dumps(rel)} leads outside the bundle (a symbolic link); "
                          f"refusing to read it — {ADVICE}")
    return p


def check_paths(root: str | Path, m: Manifest, where: str) -> Manifest:
    """Every path of the manifest resolves inside the bundle; returns the manifest bound to `root`."""
    for rel in m.files:   # every artifact's files are among them (parse_manifest checks that)
        resolve_inside(root, rel, _key("files", rel), where)
    return dataclasses.replace(m, root=Path(root))


# ---- the embedding table, from its .npy header ----------------------------------------------------------------
def npy_header(path: Path, where: str, what: str) -> tuple[tuple[int, ...], str]:
    """(shape, dtype string) of a .npy file, reading only its header."""
    import numpy as np

    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(fh)
    except (OSError, ValueError) as e:
        raise BundleError(f"{where}: {what} is not a readable .npy table ({str(e)[:_SHORT]}); {ADVICE}") from None
    if fortran:
        raise BundleError(f"{where}: {what} is stored in Fortran order; {ADVICE}")
    return tuple(int(x) for x in shape), dtype.str


def check_embedding(m: Manifest, where: str) -> tuple[int, int]:
    """The table's (rows, hidden) against decoder.vocab / decoder.hidden, and the scales' shape; returns (rows, hidden)."""
    art = m.artifacts[EMBED_TOKENS]
    at = _key("artifacts", EMBED_TOKENS)
    shape, dtype = npy_header(m.path(EMBED_TOKENS), where, art.path)
    want = "<f4" if art.precision == EMBED_FP32 else "|i1"
    if len(shape) != 2 or dtype != want:
        raise BundleError(f"{where}: {art.path} must be a 2-D {want} table for precision {art.precision!r} "
                          f"({at}), it holds {dtype} {list(shape)}; {ADVICE}")
    rows, cols = shape
    dec = m.decoder
    if (rows, cols) != (dec.vocab, dec.hidden):
        raise BundleError(f"{where}: {art.path} has {rows} rows x {cols}, the manifest says decoder.vocab "
                          f"{dec.vocab} x decoder.hidden {dec.hidden}; token ids must index the table — {ADVICE}")
    if art.scales:
        block = art.block_size or 1
        sshape, sdtype = npy_header(m.root / art.scales, where, art.scales)
        if cols % block or sshape != (rows, cols // block) or sdtype != "<f2":
            raise BundleError(f"{where}: {art.scales} must be <f2 [{rows}, {cols} / {block}] for {art.path} in blocks "
                              f"of {block}, it holds {sdtype} {list(sshape)}; {ADVICE}")
    return rows, cols


# ---- ONNX inputs and outputs --------------------------------------------------------------------------------
Dims = tuple  # of int (a fixed size) or None (any size)


def expected_io(m: Manifest, artifact: str) -> tuple[dict[str, Dims], dict[str, Dims]]:
    """(inputs, outputs): name -> dims an artifact's ONNX graph must show (None = dynamic or any)."""
    e, d = m.encoder, m.decoder
    vis = {visual_kv_name(j, kv): (None, h, None, hd)
           for j, h, hd in zip(d.hybrid_layers, d.hybrid_heads or [None] * len(d.hybrid_layers),
                               d.hybrid_head_dim or [None] * len(d.hybrid_layers)) for kv in KV}
    if artifact in (ENCODER, ENCODER_FALLBACK):
        return ({ENCODER_INPUT: (None, None, 3, e.image_size, e.image_size)},
                {ENCODER_OUTPUT: (None, e.num_tokens, e.hidden)})
    if artifact == CROSS_KV:
        return {CROSS_KV_INPUT: (None, None, e.hidden)}, vis
    if artifact == DECODER:
        cache = (None, d.kv_heads, None, d.head_dim)
        pos = {POSITION_IDS: (None, None)} if d.cache == CACHE_CONCAT else {}
        ins = {INPUTS_EMBEDS: (None, None, d.hidden), ATTENTION_MASK: (None, None), **pos,
               **{n: cache for n in d.past_names}, **vis}
        return ins, {LOGITS: (None, None, d.vocab), **{n: cache for n in d.present_names}}
    raise KeyError(artifact)


def check_io(m: Manifest, artifact: str, inputs: Mapping[str, Sequence], outputs: Mapping[str, Sequence],
             where: str) -> None:
    """An ONNX session's input/output names and fixed dims (ints; symbolic dims pass) against expected_io."""
    for kind, got, want in zip(("inputs", "outputs"), (inputs, outputs), expected_io(m, artifact)):
        missing, extra = [n for n in want if n not in got], [n for n in got if n not in want]
        if missing or extra:
            raise BundleError(f"{where}: the {kind} of {m.artifacts[artifact].path} do not match the manifest "
                              f"(decoder {m.decoder.num_layers} layers, hybrid layers {m.decoder.hybrid_layers}): "
                              f"missing {missing[:4] or 'none'}, unexpected {extra[:4] or 'none'}; {ADVICE}")
        for name, dims in want.items():
            shape = list(got[name])
            bad = len(shape) != len(dims) or any(isinstance(s, int) and w is not None and s != w
                                                 for s, w in zip(shape, dims))
            if bad:
                show = [("?" if w is None else w) for w in dims]
                raise BundleError(f"{where}: {m.artifacts[artifact].path} {name} has shape {shape}, the manifest "
                                  f"says {show}; {ADVICE}")


__all__ = [n for n in dir() if n.isupper() and not n.startswith("_")] + [
    "BundleError", "FileEntry", "Artifact", "Prompt", "Generation", "Tokens", "EncoderInfo", "DecoderIO", "Manifest",
    "past_name", "present_name", "visual_kv_name", "past_names", "present_names", "visual_kv_names",
    "decoder_input_names", "decoder_output_names", "parse_manifest", "resolve_inside", "check_paths", "npy_header",
    "check_embedding", "expected_io", "check_io"]
