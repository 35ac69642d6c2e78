"""The built decoder (export/decoder_builder.py, manifest decoder.cache == "shared") as a StepModel.

Its graph runs GroupQueryAttention with the rotary inside and takes no position_ids: positions come from
the attention mask (seqlens_k = sum(mask) - 1). Each layer's K and V live in ONE buffer of
(rows, kv_heads, C, head_dim) that is bound through IOBinding as both ``past_key_values.{i}.*`` and
``present.{i}.*``: the op reads the P cached positions and writes the T new ones in place, so a token
copies nothing (the traced graph's Concat copies the whole cache every step, and its runtime keeps two
buffers per tensor). C, the capacity, is sized by `reserve` before a report (rows = beams, positions =
prompt + new tokens) and only grows between reports (or, without reserve, doubles when full).

    rows r < R:   buf[r, :, :P]  the cached positions of row r;  buf[r, :, P:P+T]  written by this call

A beam step whose rows are not 0..n-1 moves only the rows that change (buf[i] <- buf[rows[i]] for i with
rows[i] != i, first P positions), through one gather into a temporary. The logits output (rows, 1, V) is
bound to a preallocated buffer per call; the cache bindings are made once per (rows, C) and reused.

Threads: as OrtDecoder (emrrg.runtime.decoder): one state per report, `fork()` for another thread.
"""
from __future__ import annotations

import numpy as np

from emrrg.runtime.contract import ATTENTION_MASK, INPUTS_EMBEDS, LOGITS, past_name, present_name
from emrrg.runtime.decoder import OrtDecoder


class SharedCacheDecoder(OrtDecoder):
    """OrtDecoder's constructor, fork() and visual K/V handling; its own cache (one buffer per layer and K/V)."""

    def _clear_state(self) -> None:
        """Fresh per-report state (no cache); the session, table and dimensions are untouched."""
        self._names = list(self._buf)                      # (layer, "key" | "value")
        self._rows_cap = self._len_cap = 0
        self._buf = {n: np.empty(0, np.float32) for n in self._names}
        self._rows = self._len = 0
        self._logits = np.empty(self.max_rows * self.vocab, np.float32)
        self._visual: dict[str, np.ndarray] = {}
        self._io, self._bound, self._keep, self._vis_keep = None, None, (), {}

    def set_visual_kv(self, kv: dict[str, np.ndarray] | None) -> None:
        super().set_visual_kv(kv)
        self._bound = None                                 # the binding holds the previous image's K/V

    # ---- the cache -------------------------------------------------------------------------------
    def reserve(self, rows: int, length: int) -> None:
        """Room for `rows` sequences of `length` positions (capped at max_len); keeps the live cache."""
        length = min(length, self.max_len)
        if rows <= self._rows_cap and length <= self._len_cap:
            return
        R, C = max(rows, self._rows_cap), max(length, self._len_cap)
        for n, old in self._buf.items():
            grown = np.empty(R * self.kvh * C * self.hd, np.float32)
            if self._rows and self._len:
                new4 = grown.reshape(R, self.kvh, C, self.hd)
                new4[:self._rows, :, :self._len] = self._full(old)[:self._rows, :, :self._len]
            self._buf[n] = grown
        self._rows_cap, self._len_cap = R, C
        self._bound = None

    def cache_bytes(self) -> int:
        return sum(b.nbytes for b in self._buf.values())

    def _full(self, flat: np.ndarray) -> np.ndarray:
        return flat.reshape(self._rows_cap, self.kvh, self._len_cap, self.hd)

    def _view(self, name: tuple[int, str], rows: int) -> np.ndarray:
        """The first `rows` rows of a layer's buffer, (rows, kv_heads, C, head_dim), contiguous."""
        return self._buf[name][:rows * self.kvh * self._len_cap * self.hd].reshape(rows, self.kvh, self._len_cap, self.hd)

    def _reorder(self, rows: np.ndarray) -> None:
        """Row i continues row rows[i]: copy only the rows that change, first `_len` positions."""
        moved = np.nonzero(rows != np.arange(len(rows)))[0]
        if not moved.size:
            return
        src = rows[moved]
        for flat in self._buf.values():
            full = self._full(flat)
            full[moved, :, :self._len] = full[src, :, :self._len]      # fancy read = a copy first: no aliasing

    # ---- one call ----------------------------------------------------------------------------------
    def _binding(self, rows: int):
        """An IOBinding with every layer's buffer bound as past and present (and the visual K/V), per (rows, C)."""
        if self._bound == (rows, self._len_cap):
            return self._io
        io = self.sess.io_binding()
        shape = [rows, self.kvh, self._len_cap, self.hd]
        for i, kv in self._names:
            buf = self._view((i, kv), rows)
            io.bind_input(past_name(i, kv), "cpu", 0, np.float32, shape, buf.ctypes.data)
            io.bind_output(present_name(i, kv), "cpu", 0, np.float32, shape, buf.ctypes.data)
        vis = self._visual_inputs(rows)
        for k, v in vis.items():
            io.bind_cpu_input(k, v)
        self._io, self._bound, self._vis_keep = io, (rows, self._len_cap), vis
        return io

    def _run(self, embeds: np.ndarray, rows: int, past_len: int) -> np.ndarray:
        t = embeds.shape[1]
        if past_len + t > self.max_len:
            raise ValueError(f"sequence of {past_len + t} tokens exceeds the cache of {self.max_len}")
        if rows > self._rows_cap or past_len + t > self._len_cap:    # no reserve() for this length: grow 2x
            self.reserve(rows, max(past_len + t, 2 * self._len_cap))
        embeds = np.ascontiguousarray(embeds, dtype=np.float32)
        mask = np.ones((rows, past_len + t), dtype=np.int64)
        if not self._cpu:  # device providers: ORT places the tensors; the present comes back whole
            feeds = {INPUTS_EMBEDS: embeds, ATTENTION_MASK: mask, **self._visual_inputs(rows),
                     **{past_name(*n): self._view(n, rows) for n in self._names}}
            outs = dict(zip([o.name for o in self.sess.get_outputs()], self.sess.run(None, feeds)))
            for n in self._names:
                self._view(n, rows)[:, :, :past_len + t] = outs[present_name(*n)][:, :, :past_len + t]
            return outs[LOGITS][:, -1]
        io = self._binding(rows)
        io.bind_cpu_input(INPUTS_EMBEDS, embeds)
        io.bind_cpu_input(ATTENTION_MASK, mask)
        logits = self._logits[:rows * self.vocab].reshape(rows, 1, self.vocab)
        io.bind_output(LOGITS, "cpu", 0, np.float32, [rows, 1, self.vocab], logits.ctypes.data)
        self._keep = (embeds, mask)                                  # alive until the call returns
        self.sess.run_with_iobinding(io)
        return logits[:, -1]

    # ---- StepModel -----------------------------------------------------------------------------
    def prefill(self, embeds: np.ndarray, num_rows: int) -> np.ndarray:
        """Run the prompt once (batch 1) and copy its cache into the other `num_rows - 1` beam rows."""
        if num_rows > self.max_rows:
            raise ValueError(f"{num_rows} rows exceed the preallocated {self.max_rows}")
        t = embeds.shape[1]
        self._rows = self._len = 0
        self.reserve(num_rows, t + 1)
        logits = self._run(embeds, 1, 0).copy()
        for flat in self._buf.values():
            full = self._full(flat)
            full[1:num_rows, :, :t] = full[0:1, :, :t]
        self._rows, self._len = num_rows, t
        return np.repeat(logits, num_rows, axis=0)

    def step(self, tokens: np.ndarray, rows: np.ndarray) -> np.ndarray:
        n = len(tokens)
        self.reserve(max(n, self._rows), self._len + 1)
        self._reorder(np.asarray(rows, dtype=np.int64))
        embeds = self.embed[tokens][:, None, :]                        # (n, 1, H)
        logits = self._run(embeds, n, self._len)
        self._rows, self._len = n, self._len + 1
        return logits.copy()
