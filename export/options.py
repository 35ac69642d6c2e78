"""`emrrg-export --extra-options KEY=VALUE`: the one table of known keys, their values and defaults.

EXTRA_OPTIONS is the single source: `check_extra_options` validates against it (before any work: the CLI
calls it right after parsing its arguments, export_bundle before it loads the checkpoint), the CLI's help
text is generated from it (`extra_help`), and export/pipeline.py reads the typed values it returns.

* An unknown key is an error that names the closest known key and lists them all.
* A bad value is an error that names the key, the value and what it takes.
* A key for a part the export does not quantize (decoder keys with --llm-bits 32, encoder keys without
  --int8) is an error too, not a warning: it would change nothing, and a warning scrolls away during a
  minutes-long export while the bundle silently differs from what was asked for.
* Keys marked `pins` replace the accuracy-aware ladder of their part by one configuration (the table's
  defaults for the keys not given); the decoder's eval_* keys only change how its candidates are scored.

Imports only numpy-level modules (no torch, no onnx), so the CLI can check options in a fraction of a second.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, fields
from typing import Iterable, Mapping

from emrrg.export.errors import OptionError
from emrrg.export.quantize_decoder import QuantConfig
from emrrg.export.streamed_reference import F32_REFERENCE_MAX_BYTES, REFERENCES

# MatMulNBits' contract (ORT's operator schema): block_size is a power of two >= 16. All of these run
# (and re-encode weights correctly) on ORT 1.32 CPU at every accuracy_level; a block beyond 1024 would
# only pad the rows of every weight with zeros.
BLOCK_SIZES = (16, 32, 64, 128, 256, 512, 1024)
DECODER_METHODS = ("affine", "asym", "sym")          # quantize_decoder.quantize_weight
LM_HEAD_BITS = (4, 8, 32)                             # 32: keep the lm_head f32
ACCURACY_LEVELS = (0, 1, 2, 3, 4)                     # MatMulNBits: unset, fp32, fp16, bf16, int8 activations
ENCODER_METHODS = ("minmax", "percentile", "entropy")  # ORT's calibration methods (quantize_encoder)
ENCODER_SMOOTH_ALPHA = 0.75                           # quantize_int8's default: the first rung of the ladder
WEIGHT_NMSE_BUDGET = 1e-6       # the weight-only rung's budget (quantize_encoder.ENCODER_INT8_LADDER, last rung)
MAX_REFINE = 64      # candidate grids per block; cost grows linearly, the ladder uses 9
# Scoring the 4-bit candidates: teacher-forced over radlabels' 1,000 reports (~100k tokens in all), so
# EVAL_PROMPTS x PROMPT_TOKENS stays well inside them.
MAX_EVAL_PROMPTS, MAX_EVAL_TOKENS, PROMPT_TOKEN_RANGE = 16, 256, (64, 1024)

PARTS = {"decoder": ("4-bit decoder", "--llm-bits 4"), "encoder": ("INT8 encoder", "--int8"),
         "graph": ("decoder graph", "any export")}
DECODER_GRAPHS = ("built", "traced")   # export/decoder_builder.py (default) | export/decoder_onnx.py (torch.onnx)
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


@dataclass(frozen=True)
class Option:
    key: str
    part: str                               # "decoder" | "encoder" (PARTS)
    kind: type                              # int, float, bool or str
    default: object
    help: str
    choices: tuple = ()                     # the allowed values, when they are a short list
    bounds: tuple[float, float] | None = None  # inclusive range, for numbers without choices
    pins: bool = True                       # replaces the part's ladder by one configuration

    def allowed(self) -> str:
        if self.kind is bool:
            return "true or false"
        if self.choices:
            return ", ".join(map(str, self.choices[:-1])) + " or " + str(self.choices[-1])
        lo, hi = self.bounds
        return f"{'an integer' if self.kind is int else 'a number'} from {lo:g} to {hi:g}"

    def parse(self, text: str) -> object:
        t = text.strip()
        try:
            if self.kind is bool:
                if t.lower() not in _TRUE + _FALSE:
                    raise ValueError
                value = t.lower() in _TRUE
            else:
                value = self.kind(t)
        except ValueError:
            value = None
        ok = value is not None and (value in self.choices if self.choices else
                                    self.bounds is None or self.bounds[0] <= value <= self.bounds[1])
        if not ok:
            raise OptionError(f"--extra-options {self.key}={text}: {self.key} takes {self.allowed()}")
        return value


def _qc(name: str):
    return next(f.default for f in fields(QuantConfig) if f.name == name)


EXTRA_OPTIONS: tuple[Option, ...] = (
    Option("block_size", "decoder", int, _qc("block_size"), "weights per 4-bit block along K",
           choices=BLOCK_SIZES),
    Option("method", "decoder", str, _qc("method"), "affine = float offset per block (llama.cpp Q4_1), "
           "asym = uint8 zero point, sym = no offset", choices=DECODER_METHODS),
    Option("symmetric", "decoder", bool, _qc("method") == "sym", "true is method=sym, false is method=affine"),
    Option("lm_head_bits", "decoder", int, _qc("lm_head_bits"), "bits of the lm_head, 32 keeps it f32", choices=LM_HEAD_BITS),
    Option("accuracy_level", "decoder", int, _qc("accuracy_level"),
           "MatMulNBits compute, 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations", choices=ACCURACY_LEVELS),
    Option("refine", "decoder", int, _qc("refine"), "per block: candidate grids refitted (method=affine) or clipping ranges tried (method=asym); 0 = plain rounding",
           bounds=(0, MAX_REFINE)),
    Option("separate_adapters", "decoder", bool, _qc("separate_adapters"), "keep the LLM's LoRA as a low-rank f32 "
           "branch beside the 4-bit base weights instead of merging it into them (built graph)"),
    Option("eval_prompts", "decoder", int, 4, "prompts the 4-bit candidates are scored on", bounds=(1, MAX_EVAL_PROMPTS),
           pins=False),
    Option("eval_tokens", "decoder", int, 60, "reference tokens scored per prompt", bounds=(1, MAX_EVAL_TOKENS), pins=False),
    Option("prompt_tokens", "decoder", int, 220, "tokens per scoring prompt", bounds=PROMPT_TOKEN_RANGE, pins=False),
    Option("decoder_reference", "decoder", str, "auto", "what the 4-bit candidates are scored against: f32 = the "
           "f32 LLM in memory, streamed = f32 computed layer by layer from the safetensors (for LLMs too large to "
           "hold in f32), auto = f32 up to "
           f"{F32_REFERENCE_MAX_BYTES / 2**30:g} GiB of f32 weights, streamed above", choices=REFERENCES, pins=False),
    Option("decoder_graph", "graph", str, DECODER_GRAPHS[0], "built = the decoder written op by op from the weights "
           "(GroupQueryAttention, in-place KV cache), traced = torch.onnx's graph; a decoder the builder does not "
           "know (RoPE scaling, biases) falls back to traced with a log line", choices=DECODER_GRAPHS, pins=False),
    Option("encoder_smooth_alpha", "encoder", float, ENCODER_SMOOTH_ALPHA, "SmoothQuant strength, 0 = off",
           bounds=(0.0, 1.0)),
    Option("encoder_method", "encoder", str, "minmax", "activation range calibration", choices=ENCODER_METHODS),
    Option("encoder_w3_float", "encoder", bool, False, "keep the MLP down projections float"),
    Option("encoder_float_worst_inputs", "encoder", float, 0.0,
           "fraction of activations (worst int8 rounding first) whose MatMuls stay float", bounds=(0.0, 1.0)),
    Option("encoder_weight_only", "encoder", bool, False,
           "int8 MatMul weights and float activations (no activation rounding, and the keys above then do not apply)"),
    Option("encoder_weight_nmse_budget", "encoder", float, WEIGHT_NMSE_BUDGET,
           "with encoder_weight_only: the weights whose rounding moves the visual tokens most stay float until "
           "the others' summed NMSE is within this (0 rounds every weight)", bounds=(0.0, 1.0)),
)
OPTIONS = {o.key: o for o in EXTRA_OPTIONS}


def _show(v: object) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def extra_help() -> str:
    """The --extra-options help text: every key with its default and allowed values, by part."""
    parts = []
    for part, (what, flag) in PARTS.items():
        keys = "; ".join(f"{o.key}={_show(o.default)} [{o.allowed()}] {o.help}" for o in EXTRA_OPTIONS if o.part == part)
        parts.append(f"{what} ({flag}): {keys}")
    return ("KEY=VALUE knobs, shown at their defaults. A decoder or encoder key pins that part to one configuration "
            "(the keys not given at their defaults) instead of its accuracy-aware ladder; eval_* and prompt_tokens only "
            "change how the 4-bit candidates are scored. Unknown keys, bad values and keys for a part this export does "
            "not quantize stop the export before it starts. " + ". ".join(parts))


def _known_keys() -> str:
    return "; ".join(f"{what} ({flag}): " + ", ".join(o.key for o in EXTRA_OPTIONS if o.part == part)
                     for part, (what, flag) in PARTS.items())


def split_extra_options(items: Iterable[str]) -> dict[str, str]:
    """['KEY=VALUE', ...] -> {KEY: VALUE}; a malformed item, an empty key or a key given twice is an OptionError."""
    out: dict[str, str] = {}
    for it in items:
        k, sep, v = it.partition("=")
        k = k.strip()
        if not sep or not k:
            raise OptionError(f"--extra-options takes KEY=VALUE items, got {it!r}")
        if k in out and out[k] != v.strip():
            raise OptionError(f"--extra-options {k} is given twice ({out[k]!r} and {v.strip()!r}); give it once")
        out[k] = v.strip()
    return out


def check_extra_options(extra: Mapping[str, str], *, int8: bool, llm_bits: int) -> dict[str, object]:
    """Validate raw KEY -> VALUE strings against EXTRA_OPTIONS; return the typed values of the keys given.
    Raises OptionError (one line: what is wrong and what to do)."""
    values: dict[str, object] = {}
    active = {"decoder": llm_bits == 4, "encoder": bool(int8), "graph": True}
    for key, text in extra.items():
        opt = OPTIONS.get(key)
        if opt is None:
            close = difflib.get_close_matches(key, OPTIONS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise OptionError(f"--extra-options: unknown key {key!r}{hint}; known keys: {_known_keys()}")
        if not active[opt.part]:
            what, flag = PARTS[opt.part]
            raise OptionError(f"--extra-options {key} sets the {what}, which this export does not quantize; "
                              f"add {flag} or drop {key}")
        values[key] = opt.parse(str(text))
    if "symmetric" in values and "method" in values and values["symmetric"] != (values["method"] == "sym"):
        raise OptionError(f"--extra-options symmetric={_show(values['symmetric'])} contradicts "
                          f"method={values['method']}; give one of them")
    method = values.get("method", "sym" if values.get("symmetric") else OPTIONS["method"].default)
    if values.get("refine") and method == "sym":
        raise OptionError("--extra-options refine applies to method=affine or asym (this pins method=sym); "
                          "drop refine or choose one of those")
    return values


def value(values: Mapping[str, object], key: str) -> object:
    """The typed value given for `key`, else its default from the table."""
    return values.get(key, OPTIONS[key].default)


def pinned(values: Mapping[str, object], part: str) -> dict[str, object]:
    """The keys given that pin `part` ("decoder" | "encoder") to one configuration."""
    return {k: v for k, v in values.items() if OPTIONS[k].part == part and OPTIONS[k].pins}


__all__ = ["EXTRA_OPTIONS", "OPTIONS", "Option", "BLOCK_SIZES", "ENCODER_METHODS", "extra_help",
           "split_extra_options", "check_extra_options", "value", "pinned"]
