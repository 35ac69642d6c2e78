"""The 4-bit ladder's order (uint4 asymmetric first, its AWQ-style refit, then the exact affine encodings) and the
built graph's rung skipping for weights already on a 4-bit grid, checked on the tiny decoder and on a snapped copy.
The real model's figures: benchmarks/results/decoder_graph_accuracy.md."""
import numpy as np

from emrrg.export.decoder_builder import (BUILT_LADDER, ModuleWeights, _module_shape, on_block_grid,
                                          quantized_builder)
from emrrg.export.quantize_decoder import (DEFAULT_LADDER, KL_MAX, TOP1_MIN, QuantConfig, choose_decoder_config,
                                           quantize_weight, weighted_rel_error)
from tests.export.test_decoder_builder import _snap_to_grid
from tests.export.test_decoder_export import ScriptedEvaluator, tiny_llm


def test_ladder_order():
    methods = [(c.method, c.bits, c.act_weighted) for c in DEFAULT_LADDER]
    sep = [k for k, c in enumerate(DEFAULT_LADDER) if c.separate_adapters]
    # the separate-LoRA rung: after the merged affine rungs (no extra MatMuls), before any 8-bit weights
    assert DEFAULT_LADDER[sep[0] - 1].name == "affine-b32-awq-lm8"
    assert all(c.worst_k_8bit == 0 and c.bits == 4 for c in DEFAULT_LADDER[:sep[0] + 1])
    assert methods[:3] == [("asym", 4, False), ("asym", 4, True), ("affine", 4, False)]
    assert DEFAULT_LADDER[1].awq_scale and not any(c.awq_scale for c in DEFAULT_LADDER[2:])   # AWQ: the asym rung
    # f32 activations only after every int8-activation rung, all-8-bit weights included: they are the slow,
    # exact last resort of the report check; separate LoRA first, then merged; never with an 8-bit lm_head
    f32_act = [k for k, c in enumerate(DEFAULT_LADDER) if c.accuracy_level == 0]
    assert f32_act == [len(DEFAULT_LADDER) - 2, len(DEFAULT_LADDER) - 1] and methods[f32_act[0] - 1][1] == 8
    assert [DEFAULT_LADDER[k].separate_adapters for k in f32_act] == [True, False] and sep == [sep[0], f32_act[0]]
    assert all(DEFAULT_LADDER[k].lm_head_bits == 32 for k in f32_act)
    assert all(m == "affine" for m, b, _ in methods[2:f32_act[0] - 1])
    assert {c.lm_head_bits for c in DEFAULT_LADDER} == {8, 32} and BUILT_LADDER is DEFAULT_LADDER
    assert (TOP1_MIN, KL_MAX) == (0.95, 0.05)                                            # thresholds unchanged


def test_asym_clip_search_never_worse():
    rng = np.random.default_rng(0)
    w = (rng.standard_t(3, (256, 64)) * 0.02).astype(np.float32)                        # heavy tails: clipping helps
    h = rng.uniform(0.1, 4.0, 256).astype(np.float32)
    plain = weighted_rel_error(w, quantize_weight(w, 4, 32, "asym").dequantized, h)
    refit = quantize_weight(w, 4, 32, "asym", refine=6, h=h)
    assert refit.zero_points is not None and refit.correction is None                  # same layout, same bytes
    assert weighted_rel_error(w, refit.dequantized, h) < 0.95 * plain


def test_grid_weights_skip_the_asym_rungs(tmp_path):
    llm, _ = tiny_llm(seed=6)
    assert not on_block_grid(ModuleWeights(llm), _module_shape(llm))
    fresh = quantized_builder(ModuleWeights(llm), _module_shape(llm)).skip
    assert all(fresh(c, DEFAULT_LADDER[k + 1:]) is None for k, c in enumerate(DEFAULT_LADDER)
               if not c.separate_adapters)                      # that one is skipped without adapters (below)
    _snap_to_grid(llm)
    src, shape = ModuleWeights(llm), _module_shape(llm)
    assert on_block_grid(src, shape)
    quantize = quantized_builder(src, shape)
    assert quantize.skip(DEFAULT_LADDER[0], DEFAULT_LADDER[1:]).startswith("weights on a 4-bit block-32 grid")
    assert quantize.skip(DEFAULT_LADDER[0], ()) is None                                 # nothing exact after it
    ev = ScriptedEvaluator({"affine-b32-lm8": (0.97, 0.01)})
    choice = choose_decoder_config(None, tmp_path / "q", ev, ladder=DEFAULT_LADDER, quantize=quantize, verbose=False)
    assert ev.calls == ["affine-b32-lm8"]                                               # nothing built or scored before
    assert [a.get("skipped") is not None for a in choice.attempts] == [True, True, False]
    assert choice.config.name == "affine-b32-lm8" and choice.passed


def test_separate_adapter_rung_is_skipped_without_adapters(tmp_path):
    """No LLM adapters: the rung would equal the merged affine one, so it is neither built nor scored."""
    llm, _ = tiny_llm(seed=7)
    rung = next(c for c in DEFAULT_LADDER if c.separate_adapters)
    ladder = (rung, QuantConfig("affine-b32-lm8"))
    ev = ScriptedEvaluator({"affine-b32-lm8": (0.97, 0.01)})
    choice = choose_decoder_config(None, tmp_path / "a", ev, ladder=ladder, verbose=False,
                                   quantize=quantized_builder(ModuleWeights(llm), _module_shape(llm)))
    assert ev.calls == ["affine-b32-lm8"] and "no LLM LoRA" in choice.attempts[0]["skipped"]


def test_report_check_refuses_a_rung_that_met_the_thresholds(tmp_path):
    """accept (export/report_check.py's report-level check): a rung within the teacher-forced thresholds that it
    refuses does not pass, its details go in the attempt, and the ladder goes on to the next rung."""
    llm, _ = tiny_llm(seed=8)
    ladder = (QuantConfig("affine-b32-lm8"), QuantConfig("int8-b32", bits=8))
    ev = ScriptedEvaluator({"affine-b32-lm8": (0.99, 0.001), "int8-b32": (1.0, 0.0)})
    seen = []

    def accept(path):
        seen.append(path.parent.name)
        ok = path.parent.name == "int8-b32"
        return ok, {"passed": ok, "studies": 2}

    choice = choose_decoder_config(None, tmp_path / "q", ev, ladder=ladder, verbose=False, accept=accept,
                                   quantize=quantized_builder(ModuleWeights(llm), _module_shape(llm)))
    assert seen == ["affine-b32-lm8", "int8-b32"] and choice.config.name == "int8-b32" and choice.passed
    assert [a["passed"] for a in choice.attempts] == [False, True]
    assert choice.attempts[0]["reports"] == {"passed": False, "studies": 2}


def test_report_bands():
    from emrrg.export.report_check import REPORT_BANDS, within_bands

    ref = {"CE_F1": 0.5, "BLEU_4": 0.1, "CIDEr": 0.0}
    b = within_bands({"CE_F1": 0.5 * (1 - 0.009), "BLEU_4": 0.1 * 1.06, "CIDEr": 0.0}, ref)
    assert b["CE_F1"]["ok"] and not b["BLEU_4"]["ok"] and b["CIDEr"]["ok"]             # 0.9% in, 6% out, 0 stays 0
    assert not within_bands({"CE_F1": 0.5, "BLEU_4": 0.1, "CIDEr": 0.01}, ref)["CIDEr"]["ok"]
    assert REPORT_BANDS == {"CE_F1": 0.01, "BLEU_4": 0.05, "CIDEr": 0.05}               # the fidelity targets


def test_identical_reports_rule():
    """At least REPORT_MIN_IDENTICAL of the reports word for word the baseline's: 19 of 20 passes at 0.95,
    18 of 20 does not (the bands could not tell a flipped beam from noise)."""
    from emrrg.export.report_check import REPORT_MIN_IDENTICAL, identical

    ref = [f"report {i}." for i in range(20)]
    assert REPORT_MIN_IDENTICAL == 0.95
    assert identical(ref, ref) == {"same": 20, "of": 20, "min_fraction": 0.95, "ok": True}
    one, two = ["other."] + ref[1:], ["other."] * 2 + ref[2:]
    assert identical(one, ref)["ok"] and identical(one, ref)["same"] == 19
    assert not identical(two, ref)["ok"] and identical(two, ref)["same"] == 18
