"""`Runtime`: bundle -> report, torch-free (numpy, onnxruntime, tokenizers, pillow, pydicom).

    rt = Runtime.from_pretrained("bundle/", backend="auto")
    out = rt.generate(["frontal.dcm", "lateral.dcm"])      # the views of one study
    out["report"], out["timings_ms"]

Backend choice for `auto`, first that can run:
  1. TensorRT (an engine built and cached for this GPU, with the SelectiveScan plugin; emrrg.runtime.tensorrt)
  2. ORT CUDA (CUDAExecutionProvider available)
  3. ORT CPU with the SelectiveScan op library (encoder.onnx)
  4. ORT CPU with the pure-ONNX encoder (encoder.scan.onnx), with a warning: slower, same numbers
An explicitly requested backend that cannot run raises BackendUnavailableError instead of falling back.

Threads: one Runtime may be shared. `generate` is safe to call from several threads at once and every
call returns exactly what it would return alone. Preprocessing, the encoder and the hybrid layers'
visual K/V run in the calling thread without a lock (ONNX Runtime sessions may run concurrently; the
TensorRT session serializes its own calls). The decoder's state (the KV cache buffers, the logits
buffer, the visual K/V of the current image) is per report: a pool of at most `max_concurrency`
decoder states over the one decoder session (`DecoderPool`), and a call waits for a free state when
all are lent. The default, 1, makes the decode stage a lock: one KV cache in memory (a 7B decoder with
3 beams over 250 positions holds about 1.5 GB, a real share of a Jetson's 8-16 GB) and no CPU
oversubscription (ORT already uses every core for one report). More states overlap reports on a GPU or
a many-core CPU, at one more KV cache each: rows x kv_heads x positions x head_dim x layers x 2 (K, V)
x 2 buffers x 4 bytes.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from emrrg.runtime.bundle import BundleError, bundle_digest, open_bundle
from emrrg.runtime.contract import (CACHE_SHARED, CROSS_KV, CROSS_KV_INPUT, DECODER, EMBED_TOKENS, ENCODER, ENCODER_FALLBACK,
                       ENCODER_INPUT, ENCODER_OUTPUT, TOKENIZER, Manifest, check_io)
from emrrg.runtime.decoder import DecoderPool, OrtDecoder
from emrrg.runtime.decoder_shared import SharedCacheDecoder
from emrrg.runtime.embedding import load_embedding
from emrrg.runtime.generation import DecodeSettings, generate
from emrrg.config import DECODE_KEYS
from emrrg.runtime.oplib import OpLibraryMissingError, find_op_library, register
from emrrg.runtime.gate import InputPolicy, load_study
from emrrg.runtime.logs import ort_severity, quiet_onnxruntime
from emrrg.runtime.preprocess import DEFAULT_MAX_MEGAPIXELS
from emrrg.runtime.sessions import session_options

log = logging.getLogger("emrrg.runtime")
BACKENDS = ("auto", "tensorrt", "cuda", "cpu", "cpu-pure")


class BackendUnavailableError(RuntimeError):
    pass


def peak_rss_mb() -> float:
    """Peak resident memory of this process, MB; 0.0 where the platform gives no figure.

    Linux: VmHWM of the current address space, because getrusage's ru_maxrss survives execve and so also
    counts a large parent this process was forked from. Other POSIX systems: ru_maxrss (`resource` is
    imported here, not at module level: Windows has no such module). Windows: psutil's peak working set
    when psutil is installed."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0                        # kB
    except OSError:
        pass
    try:
        import resource
    except ImportError:
        resource = None
    if resource is not None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (2.0**20 if sys.platform == "darwin" else 1024.0)        # macOS: bytes; Linux, BSD: KiB
    try:
        import psutil
    except ImportError:
        return 0.0
    info = psutil.Process().memory_info()
    return getattr(info, "peak_wset", info.rss) / 2.0**20                     # Windows: peak working set


class _TimedStep:
    """Wraps a StepModel to split decoder time into prefill and per-token decode."""

    def __init__(self, inner):
        self.inner, self.prefill_s, self.decode_s = inner, 0.0, 0.0

    def prefill(self, embeds, num_rows):
        t = time.perf_counter()
        out = self.inner.prefill(embeds, num_rows)
        self.prefill_s += time.perf_counter() - t
        return out

    def step(self, tokens, rows):
        t = time.perf_counter()
        out = self.inner.step(tokens, rows)
        self.decode_s += time.perf_counter() - t
        return out


class Runtime:
    def __init__(self, bundle: Path, manifest: Manifest, backend: str, encoder_sess, decoder: OrtDecoder,
                 cross_kv_sess, tokenizer, threads: int | None, max_concurrency: int = 1):
        self.bundle, self.backend = bundle, backend
        self.contract, self.manifest = manifest, manifest.raw     # checked (emrrg.runtime.contract), and as JSON
        self.encoder, self.decoder, self.cross_kv = encoder_sess, decoder, cross_kv_sess
        self.decoders = DecoderPool(decoder, max_concurrency)   # `decoder` is its first state
        self.max_concurrency = self.decoders.size
        self.tokenizer = tokenizer
        self.threads = threads
        self.sha256 = bundle_digest(manifest.raw)
        self.image_size = manifest.encoder.image_size
        self.prompt_before = list(manifest.prompt.before_ids)
        self.prompt_after = list(manifest.prompt.after_ids)
        self.special = dataclasses.asdict(manifest.tokens)
        self.gen = manifest.generation_settings()

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, bundle: str | os.PathLike, backend: str = "auto", threads: int | None = None,
                        verify: bool = True, max_concurrency: int = 1) -> "Runtime":
        import onnxruntime as ort
        from tokenizers import Tokenizer

        quiet_onnxruntime()   # ORT's own log at the command's verbosity (runtime/logs.py)
        if backend not in BACKENDS:
            raise BackendUnavailableError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        DecoderPool.check_size(max_concurrency)    # before loading anything
        bundle = Path(bundle)
        manifest = open_bundle(bundle, check_sha=verify)   # contract, paths, files, token ids: BundleError
        arts = manifest.artifacts
        available = ort.get_available_providers()

        def options(with_ops: bool):   # graph warnings only with --verbose (runtime/logs.py)
            # No CPU arena: on base + SmolLM2 INT8+4-bit a 60-token report's peak RSS falls from 415 to 384 MB
            # (an edge device's memory is the scarce thing); the encoder stage costs ~20 ms more (81 -> 100 ms),
            # decode is unchanged (benchmarks/results/e2e.md).
            return session_options(threads, oplib=with_ops, log_severity=ort_severity(), cpu_mem_arena=False)

        def session(key: str, with_ops: bool = False):
            """An ORT session of artifact `key`, its inputs and outputs checked against the contract."""
            path = manifest.path(key)
            try:
                sess = ort.InferenceSession(str(path), options(with_ops), providers=providers)
            except Exception as e:  # noqa: BLE001 - onnxruntime raises its own classes, all Exception
                if not type(e).__module__.startswith("onnxruntime"):
                    raise
                raise BundleError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:200]}); "
                                  "re-export the bundle with emrrg-export or copy an intact one") from None
            check_io(manifest, key, {i.name: i.shape for i in sess.get_inputs()},
                     {o.name: o.shape for o in sess.get_outputs()}, str(path))
            return sess

        chosen, providers, trt_encoder = None, ["CPUExecutionProvider"], None
        if backend in ("auto", "tensorrt"):
            from emrrg.runtime import tensorrt as trt_backend

            ok, reason = trt_backend.available()
            if ok:
                try:
                    digest = trt_backend.model_digest([manifest.files[r].sha256 for r in arts[ENCODER].files])
                    trt_encoder = trt_backend.TensorRTEncoder(bundle, manifest.path(ENCODER), precision="auto",
                                                              onnx_sha256=digest)
                    chosen = "tensorrt"
                except trt_backend.TensorRTBackendError as e:
                    reason = str(e)
            if trt_encoder is None:
                if backend == "tensorrt":
                    raise BackendUnavailableError(f"TensorRT backend unavailable: {reason}")
                log.debug("skipping TensorRT: %s", reason)   # auto: the normal case off a GPU; shown with -v
        if backend in ("auto", "cuda", "tensorrt") and "CUDAExecutionProvider" in available:
            chosen, providers = chosen or "ort-cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"]
        elif backend == "cuda":
            raise BackendUnavailableError("ORT CUDA backend unavailable: this onnxruntime has no CUDAExecutionProvider "
                                          "(install onnxruntime-gpu instead of onnxruntime, never both)")
        enc_key, fallback = ENCODER, ENCODER_FALLBACK in arts
        needs_ops = arts[ENCODER].requires_op_library
        if backend == "cpu-pure":
            if not fallback:
                raise BackendUnavailableError("this bundle has no pure-ONNX encoder (encoder_fallback); re-export it")
            enc_key, needs_ops, chosen = ENCODER_FALLBACK, False, "ort-cpu-pure"
        elif trt_encoder is not None:
            needs_ops = False
        elif needs_ops and find_op_library() is None:
            if fallback and backend == "auto":
                warnings.warn("SelectiveScan op library not found: using the pure-ONNX encoder (slower, same "
                              "numbers). Build the library with: bash scripts/build_plugins.sh", RuntimeWarning,
                              stacklevel=2)
                enc_key, needs_ops, chosen = ENCODER_FALLBACK, False, chosen or "ort-cpu-pure"
            else:
                register(ort.SessionOptions())  # raises OpLibraryMissingError naming the build command
        chosen = chosen or "ort-cpu"
        encoder = trt_encoder or session(enc_key, needs_ops)
        dec = manifest.decoder
        step_model = SharedCacheDecoder if dec.cache == CACHE_SHARED else OrtDecoder   # built vs traced graph
        # the built decoder's com.emrrg::BlockSumMatMulAdd runs the op library's kernel when it is built, else the
        # node's own standard-ONNX function body (same numbers, slower): no error either way
        dec_ops = find_op_library() is not None
        decoder = step_model(session(DECODER, dec_ops), load_embedding(bundle, arts[EMBED_TOKENS]), dec.num_layers,
                             dec.kv_heads, dec.head_dim, max_len=manifest.max_len,
                             max_rows=max(8, manifest.generation.num_beams), hybrid_layers=tuple(dec.hybrid_layers))
        cross = session(CROSS_KV) if CROSS_KV in arts else None   # the contract requires it for hybrid layers
        try:
            tok = Tokenizer.from_file(str(manifest.path(TOKENIZER)))
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception
            raise BundleError(f"{manifest.path(TOKENIZER)}: not a readable tokenizer ({str(e)[:200]}); re-export the "
                              "bundle with emrrg-export or copy an intact one") from None
        log.debug("emrrg runtime: backend %s, bundle %s", chosen, bundle)   # commands print the backend themselves
        return cls(bundle, manifest, chosen, encoder, decoder, cross, tok, threads, max_concurrency)

    # ---- pieces ----------------------------------------------------------------------------------
    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        """(B, V, 3, S, S) -> (B, L, H) projected visual tokens."""
        return self.encoder.run([ENCODER_OUTPUT], {ENCODER_INPUT: np.ascontiguousarray(pixel_values, np.float32)})[0]

    def prompt_embeds(self, visual: np.ndarray) -> np.ndarray:
        """(1, L, H) visual tokens -> (1, T, H): BOS + 'Human: <Img>' + visual + '</Img> ... Assistant:'."""
        emb = self.decoder.embed
        return np.concatenate([emb[self.prompt_before][None], visual.astype(np.float32),
                               emb[self.prompt_after][None]], axis=1)

    def settings(self, **over) -> DecodeSettings:
        g = {k: self.gen[k] for k in DECODE_KEYS if k in self.gen}   # older bundles lack newer keys: defaults
        return DecodeSettings.resolve(g, over, eos_token_id=int(self.special["eos_token_id"]))

    def decode_text(self, ids: Sequence[int]) -> str:
        """Upstream clean-up: drop a leading BOS/UNK/PAD, cut at EOS, remove <unk>, strip."""
        sp = self.special
        ids = list(ids)
        while ids and ids[0] in (sp.get("bos_token_id"), sp.get("unk_token_id"), sp.get("pad_token_id")):
            ids = ids[1:]
        if sp["eos_token_id"] in ids:
            ids = ids[: ids.index(sp["eos_token_id"])]
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        if sp.get("unk_token"):
            text = text.replace(sp["unk_token"], "")
        return text.strip()

    # ---- the job -----------------------------------------------------------------------------------
    def generate(self, images: Sequence, num_beams: int | None = None, max_new_tokens: int | None = None,
                 min_new_tokens: int | None = None, on_token: Callable[[int], None] | None = None,
                 no_repeat_ngram_size: int | None = None, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
                 allow_modality: Sequence[str] = (), strict_inputs: bool = False) -> dict:
        """Report for one study (one or more views: paths, or arrays already loaded).

        The input gate (emrrg.runtime.gate) reads every view's header first and raises RefusedInputError
        (an ImageError) for a study it refuses: not a projection radiograph (unless `allow_modality` names the
        Modality), multi-frame, mixed patients or studies, above `max_megapixels`, or, with `strict_inputs`, a
        BodyPartExamined that is not the chest. The result's "inputs" lists what it saw per view."""
        t0 = time.perf_counter()
        policy = InputPolicy(max_megapixels, tuple(allow_modality), strict_inputs)
        px, views = load_study(list(images), self.image_size, policy)
        px = px[None]                                                            # (1, V, 3, S, S)
        t1 = time.perf_counter()
        visual = self.encode(px)                                                 # (1, L, H)
        visual_kv = None
        if self.cross_kv is not None:
            names = [o.name for o in self.cross_kv.get_outputs()]
            visual_kv = dict(zip(names, self.cross_kv.run(None, {CROSS_KV_INPUT: visual})))
        t2 = time.perf_counter()
        s = self.settings(num_beams=num_beams, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                          no_repeat_ngram_size=no_repeat_ngram_size)
        prompt = self.prompt_embeds(visual)
        with self.decoders.take() as dec:              # this call's own decoder state (see "Threads" above)
            dec.set_visual_kv(visual_kv)
            step = _TimedStep(dec)
            dec.reserve(s.num_beams, prompt.shape[1] + s.max_new_tokens)    # the whole report's KV cache, once
            ids = generate(step, prompt, s, on_token=on_token)
        t3 = time.perf_counter()
        return {
            "report": self.decode_text(ids),
            "tokens": len(ids),
            "token_ids": ids,
            "backend": self.backend,
            "bundle_sha256": self.sha256,
            "decoding": {k: v for k, v in dataclasses.asdict(s).items() if k != "eos_token_id"},  # what was used
            "stop_reason": "eos" if ids and ids[-1] == s.eos_token_id else "max_new_tokens",
            "timings_ms": {
                "preprocess": 1e3 * (t1 - t0), "encoder": 1e3 * (t2 - t1), "prefill": 1e3 * step.prefill_s,
                "decode": 1e3 * step.decode_s, "total": 1e3 * (t3 - t0),
            },
            "peak_rss_mb": peak_rss_mb(),
            "inputs": [v.to_json() for v in views],
        }

    def summary(self) -> dict:
        m = self.manifest
        return {"bundle_sha256": self.sha256, "backend": self.backend, "emrrg_version": m.get("emrrg_version"),
                "format_version": m.get("format_version"), "source_sha256": m.get("source", {}).get("sha256"),
                "artifacts": {k: {kk: v.get(kk) for kk in ("path", "precision", "target", "bytes")}
                              for k, v in m["artifacts"].items()},
                "generation": m["generation"], "validation": m.get("validation", {})}


__all__ = ["Runtime", "BackendUnavailableError", "BundleError", "OpLibraryMissingError", "BACKENDS"]
