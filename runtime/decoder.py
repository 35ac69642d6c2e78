"""The ONNX decoder as a StepModel (see generation.py), with a preallocated, IO-bound KV cache.

decoder.onnx contract (emrrg.runtime.contract names every input and output; emrrg.export.decoder_onnx writes it):
    inputs   inputs_embeds (B, T, H) f32, attention_mask (B, P+T) i64, position_ids (B, T) i64,
             past_key_values.{i}.key / .value (B, kv_heads, P, head_dim) f32,
             [visual_kv.{j}.key / .value (B, heads, Lv, head_dim) f32 for hybrid layer j]
    outputs  logits (B, T, V) f32, present.{i}.key / .value (B, kv_heads, P+T, head_dim) f32

KV cache without a reallocation per token: two flat f32 buffers per cache tensor, sized before a
report for (rows, kv_heads, prompt + new tokens, head_dim) by `reserve` (the engine calls it with the
beam count and max_new_tokens; a buffer only ever grows, and only between reports unless a caller
skips `reserve`). A (B, kv, P, hd) tensor is the contiguous prefix of
a buffer, so ORT reads `past` from one buffer and writes `present` straight into the other
through IOBinding; the next step swaps them. A beam reorder is one np.take into the idle buffer.

    step t:   past = A[:B*kv*P*hd]  --decoder-->  present = B[:B*kv*(P+1)*hd]
    step t+1: past = B[...]        --decoder-->  present = A[...]

Threads: an OrtDecoder is one report's state (the KV buffers, the logits buffer, the live length and
beam rows, the hybrid layers' visual K/V) over a session and an embedding table that it only reads.
The state is not safe to share between threads; the session is (ONNX Runtime's `run` may be called
concurrently, each call with its own IOBinding). `fork()` makes a second state over the same session
and table, and `DecoderPool` lends up to `size` of them, one per concurrent report, made on first
need: N states cost N KV caches (each sized by the largest report it has served) but one session.
"""
from __future__ import annotations

import copy
import threading
from contextlib import contextmanager
from typing import Iterator

import numpy as np

from emrrg.runtime.contract import ATTENTION_MASK, INPUTS_EMBEDS, KV, LOGITS, POSITION_IDS, past_name, present_name


class OrtDecoder:
    def __init__(self, session, embed_tokens: np.ndarray, num_layers: int, kv_heads: int, head_dim: int,
                 max_len: int, max_rows: int, hybrid_layers: tuple[int, ...] = ()):
        self.sess = session
        self.embed = embed_tokens
        self.nl, self.kvh, self.hd = num_layers, kv_heads, head_dim
        self.max_len, self.max_rows = max_len, max_rows
        self.hybrid = tuple(hybrid_layers)
        self.vocab = embed_tokens.shape[0]
        names = [(i, kv) for i in range(num_layers) for kv in KV]     # buffer keys; ONNX names from the contract
        self._present = {present_name(i, kv): (i, kv) for i, kv in names}
        self._buf = {n: [] for n in names}
        self._clear_state()
        self._cpu = "CPUExecutionProvider" == session.get_providers()[0]

    def _clear_state(self) -> None:
        """Fresh per-report state (empty caches); the session, table and dimensions are untouched."""
        self._cap = 0        # floats per buffer
        self._buf = {n: [np.empty(0, np.float32), np.empty(0, np.float32)] for n in self._buf}
        self._cur = 0        # which of the two buffers holds the live cache
        self._rows = 0
        self._len = 0
        self._logits = np.empty(self.max_rows * self.vocab, np.float32)
        self._visual: dict[str, np.ndarray] = {}

    def fork(self) -> "OrtDecoder":
        """A second state over the same session and embedding table (shared, read-only), for another thread."""
        twin = copy.copy(self)
        twin._clear_state()
        return twin

    # ---- hybrid layers -------------------------------------------------------------------------
    def set_visual_kv(self, kv: dict[str, np.ndarray] | None) -> None:
        """visual_kv.{j}.key/value arrays for one image (batch 1); tiled to the live rows on use."""
        self._visual = dict(kv or {})

    def _visual_inputs(self, rows: int) -> dict[str, np.ndarray]:
        return {k: np.ascontiguousarray(np.repeat(v, rows, axis=0)) if v.shape[0] != rows else v
                for k, v in self._visual.items()}

    # ---- cache views ---------------------------------------------------------------------------
    def reserve(self, rows: int, length: int) -> None:
        """Make room for `rows` sequences of `length` positions (capped at max_len); keeps the live cache."""
        n = rows * self.kvh * min(length, self.max_len) * self.hd
        if n <= self._cap:
            return
        for pair in self._buf.values():
            for k in (0, 1):
                grown = np.empty(n, np.float32)
                grown[:self._cap] = pair[k][:self._cap]
                pair[k] = grown
        self._cap = n

    def cache_bytes(self) -> int:
        return 2 * len(self._buf) * self._cap * 4

    def _view(self, name: tuple[int, str], which: int, rows: int, length: int) -> np.ndarray:
        n = rows * self.kvh * length * self.hd
        return self._buf[name][which][:n].reshape(rows, self.kvh, length, self.hd)

    def _run(self, embeds: np.ndarray, rows: int, past_len: int, past_buf: int, out_buf: int) -> np.ndarray:
        t = embeds.shape[1]
        if past_len + t > self.max_len:
            raise ValueError(f"sequence of {past_len + t} tokens exceeds the cache of {self.max_len}")
        if rows * self.kvh * (past_len + t) * self.hd > self._cap:   # no reserve() for this length: grow 2x
            self.reserve(rows, max(past_len + t, 2 * self._cap // max(1, rows * self.kvh * self.hd)))
        feeds = {
            INPUTS_EMBEDS: np.ascontiguousarray(embeds, dtype=np.float32),
            ATTENTION_MASK: np.ones((rows, past_len + t), dtype=np.int64),
            POSITION_IDS: np.broadcast_to(np.arange(past_len, past_len + t, dtype=np.int64), (rows, t)).copy(),
            **self._visual_inputs(rows),
        }
        if not self._cpu:  # device providers: let ORT place the tensors
            for i, kv in self._buf:
                feeds[past_name(i, kv)] = np.ascontiguousarray(self._view((i, kv), past_buf, rows, past_len))
            outs = self.sess.run(None, feeds)
            names = [o.name for o in self.sess.get_outputs()]
            for name, val in zip(names, outs):
                if name in self._present:
                    self._view(self._present[name], out_buf, rows, past_len + t)[...] = val
            return outs[names.index(LOGITS)][:, -1]
        io = self.sess.io_binding()
        for k, v in feeds.items():
            io.bind_cpu_input(k, v)
        for i, kv in self._buf:
            past = self._view((i, kv), past_buf, rows, past_len)
            io.bind_input(past_name(i, kv), "cpu", 0, np.float32, list(past.shape), past.ctypes.data)
            pres = self._view((i, kv), out_buf, rows, past_len + t)
            io.bind_output(present_name(i, kv), "cpu", 0, np.float32, list(pres.shape), pres.ctypes.data)
        logits = self._logits_view(rows, t)
        io.bind_output(LOGITS, "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self.sess.run_with_iobinding(io)
        return logits[:, -1]

    def _logits_view(self, rows: int, t: int) -> np.ndarray:
        n = rows * t * self.vocab
        if n > self._logits.size:
            self._logits = np.empty(n, np.float32)  # prefill: T positions once; steps reuse it
        return self._logits[:n].reshape(rows, t, self.vocab)

    # ---- StepModel -----------------------------------------------------------------------------
    def prefill(self, embeds: np.ndarray, num_rows: int) -> np.ndarray:
        """Run the prompt once (batch 1) and tile its cache to `num_rows` beams."""
        if num_rows > self.max_rows:
            raise ValueError(f"{num_rows} rows exceed the preallocated {self.max_rows}")
        t = embeds.shape[1]
        self.reserve(num_rows, t + 1)
        a, b = self._cur, 1 - self._cur
        logits = self._run(embeds, 1, 0, a, b).copy()                 # present (1, kv, T, hd) in buffer b
        for name in self._buf:
            one = self._view(name, b, 1, t)
            self._view(name, a, num_rows, t)[...] = one               # tile into buffer a
        self._cur, self._rows, self._len = a, num_rows, t
        return np.repeat(logits, num_rows, axis=0)

    def step(self, tokens: np.ndarray, rows: np.ndarray) -> np.ndarray:
        n = len(tokens)
        live, idle = self._cur, 1 - self._cur
        self.reserve(n, self._len + 1)
        if n != self._rows or not np.array_equal(rows, np.arange(n)):
            for name in self._buf:                                     # beam reorder into the idle buffer
                np.take(self._view(name, live, self._rows, self._len), rows, axis=0,
                        out=self._view(name, idle, n, self._len))
            live, idle = idle, live
        embeds = self.embed[tokens][:, None, :]                        # (n, 1, H)
        logits = self._run(embeds, n, self._len, live, idle)
        self._cur, self._rows, self._len = idle, n, self._len + 1
        return logits.copy()


class DecoderPool:
    """Lends OrtDecoder states, at most `size` at once, so that concurrent reports never share one.

    `take()` hands out a free state, makes one with `fork()` while fewer than `size` exist, and otherwise
    blocks until one is given back. The most recently returned state is lent first, so a single caller
    always gets the same one (and its already-grown buffers) and no more states are made than the peak
    concurrency needed. A returned state drops its visual K/V; its KV buffers stay for the next report.
    """

    def __init__(self, first: OrtDecoder, size: int = 1):
        self.size = self.check_size(size)
        self._made = [first]
        self._free = [first]
        self._cond = threading.Condition()

    @staticmethod
    def check_size(size) -> int:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"max_concurrency must be an integer >= 1, got {size!r}")
        return size

    @contextmanager
    def take(self) -> Iterator[OrtDecoder]:
        with self._cond:
            while not self._free and len(self._made) >= self.size:
                self._cond.wait()
            if self._free:
                dec = self._free.pop()
            else:
                dec = self._made[0].fork()
                self._made.append(dec)
        try:
            yield dec
        finally:
            dec.set_visual_kv(None)
            with self._cond:
                self._free.append(dec)
                self._cond.notify()

    @property
    def states(self) -> tuple[OrtDecoder, ...]:
        """Every state made so far (at most `size`)."""
        with self._cond:
            return tuple(self._made)

    def cache_bytes(self) -> int:
        """KV cache memory held by all states."""
        return sum(d.cache_bytes() for d in self.states)
