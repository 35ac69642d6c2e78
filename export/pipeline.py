"""The export pipeline behind `emrrg-export`: checkpoint -> validated bundle.

    load checkpoint ─► merge adapters (checked against the unmerged model)
       ─► encoder ONNX: custom-op (SelectiveScan), one torch export, + its pure-ONNX twin (pure_onnx_twin),
          each validated vs PyTorch f32
       ─► --int8: explicit Q/DQ calibrated on X-rays, validated on calibration + held-out images
       ─► decoder ONNX with KV cache (validated) ─► --llm-bits 4: MatMulNBits, accuracy-aware choice
       ─► tokenizer, embeddings, manifest (every file's sha256) ─► one atomic rename

Everything is written into a hidden temporary sibling of the output (see export/bundle.py), so a
failure or an interrupt at any step leaves nothing behind.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from emrrg.export.bundle import share_external_data, staged_bundle, write_manifest
from emrrg.export.errors import ExportError, NoPassingConfigError
from emrrg.export.report_check import DEFAULT_REPORT_LIMIT, verdict_line

from emrrg.runtime import contract as C  # artifact keys, file names, I/O names and the manifest's sections

TARGETS = ("cpu", "cuda", "tensorrt", "jetson")
# Merging replaces W x + s·B(A x) by (W + s·BA) x: f32 rounding of one extra matmul per layer, amplified by
# depth and the norms; a wrong merge shows up at >= 1e-2. Same bound as tests/model/test_adapters.py.
MERGE_MAX_ABS = 1e-3
HELD_OUT = 4  # real X-rays kept out of calibration to validate the INT8 encoder on unseen images


@dataclass
class ExportOptions:
    int8: bool = False
    llm_bits: int = 4                    # 4: MatMulNBits; 32: keep the decoder in f32
    target: str = "cpu"
    calib: str | None = None             # folder of DICOM/PNG/JPEG; None: the real X-rays shipped offline
    strict: bool = False                 # fail when no quantization configuration meets its thresholds
    overwrite: bool = False
    extra: dict[str, str] = field(default_factory=dict)  # --extra-options KEY=VALUE (export/options.py)
    max_calib: int | None = None         # cap on calibration images (tests use a few)
    calib_reports: str | None = None     # annotation.json: report check of the INT8 / 4-bit rungs (report_check.py)
    calib_reports_limit: int = DEFAULT_REPORT_LIMIT  # its validation studies

    def values(self) -> dict:
        """`extra` as typed values, checked against export/options.py's table (OptionError when one is wrong)."""
        from emrrg.export.options import check_extra_options
        return check_extra_options(self.extra, int8=self.int8, llm_bits=self.llm_bits)


def check_target(target: str) -> None:
    """Fail before any work when the target's toolchain is missing."""
    if target not in TARGETS:
        raise ExportError(f"unknown --target {target!r}; choose one of {', '.join(TARGETS)}")
    if target in ("tensorrt", "jetson"):
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            raise ExportError(f"--target {target} needs TensorRT on this machine (engines are built on the GPU that "
                              "runs them): install JetPack 6/7 on a Jetson or NVIDIA's TensorRT packages, or export "
                              "with --target cpu / cuda (the same ONNX files run in ONNX Runtime)") from None


def _steps(opts: ExportOptions) -> list[str]:
    # the f32 decoder is exported before the INT8 encoder: --calib-reports checks encoder rungs through it
    s = ["load checkpoint", "merge adapters", "export encoder", "validate encoder", "export decoder"]
    if opts.int8:
        s.append("int8 encoder")
    if opts.llm_bits == 4:
        s.append("4-bit decoder")
    s += ["tokenizer + manifest"]
    return s


class _Progress:
    """The pipeline's steps on stderr with the step name and elapsed seconds (runtime/logs.py's Progress): a bar
    on a terminal, a plain line every few seconds otherwise, nothing with -q."""

    def __init__(self, steps: list[str], enabled: bool):
        from emrrg.runtime.logs import Progress

        self.steps, self.i = steps, 0
        self.bar = Progress(len(steps), "emrrg-export", units="steps", enabled=enabled)

    def start(self, name: str) -> None:
        self.bar.set_note(name)

    def done(self) -> None:
        self.i += 1
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _images(opts: ExportOptions) -> list:
    from emrrg.assets import real_xrays
    from emrrg.export.quantize_encoder import list_calibration_images

    imgs = list_calibration_images(opts.calib) if opts.calib else real_xrays()
    if opts.max_calib:
        imgs = imgs[: opts.max_calib]
    return imgs


def _split(images: list) -> tuple[list, list]:
    """Calibration / held-out split: the last HELD_OUT images (at least one) are never calibrated on."""
    k = min(HELD_OUT, max(1, len(images) // 4))
    return (images[:-k], images[-k:]) if len(images) > 1 else (images, images)


def export_bundle(checkpoint: str | Path, out: str | Path, opts: ExportOptions | None = None,
                  progress: bool = True, log: Callable[[str], None] = print) -> dict:
    opts = opts or ExportOptions()
    check_target(opts.target)
    if opts.llm_bits not in (4, 32):
        raise ExportError(f"--llm-bits {opts.llm_bits} is not supported (4, or 32 to keep the decoder in f32)")
    opts.values()  # unknown --extra-options keys and bad values stop the export here, before any work
    _check_calib_reports(opts)
    import torch

    from emrrg.checkpoint import load_checkpoint
    from emrrg.runtime.bundle import sha256_tree
    from emrrg.export.encoder_onnx import export_encoder, pure_onnx_twin, validate_encoder

    steps = _steps(opts)
    bar = _Progress(steps, progress)
    t_start = time.perf_counter()
    try:
        with staged_bundle(out, overwrite=opts.overwrite) as tmp, torch.no_grad():
            work = tmp / ".work"
            work.mkdir()
            # 1. checkpoint + images ------------------------------------------------------------------
            bar.start(steps[0])
            reference, why = _decoder_reference(checkpoint, opts)
            if opts.calib_reports and reference == "streamed":
                raise ExportError("--calib-reports needs the f32 reference in memory (decoder_reference=f32); "
                                  "this LLM is scored against the streamed one")
            model = load_checkpoint(checkpoint, llm_weights=reference == "f32")
            src_sha = sha256_tree(checkpoint)
            images = _images(opts)
            calib, held = _split(images)
            size = model.cfg.encoder.img_size
            from emrrg.runtime.preprocess import preprocess_study
            px_all = np.stack([preprocess_study([p], size=size) for p in images])       # (N, 1, 3, S, S)
            bar.done()
            # 2. merge, checked against the unmerged model ---------------------------------------------
            bar.start(steps[1])
            probe = torch.from_numpy(px_all[: min(2, len(px_all))])
            before = model.encode_images(probe)
            # the LLM's LoRA factors, for the 4-bit rung that keeps them beside the quantized base weights
            from emrrg.export.decoder_builder import lora_factors
            adapters = lora_factors(model.llama_model) if opts.llm_bits == 4 and reference == "f32" else {}
            merged = model.merge_adapters()
            after = model.encode_images(probe)
            merge_diff = float((before - after).abs().max())
            if merge_diff > MERGE_MAX_ABS:
                raise ExportError(f"merged encoder differs from the unmerged one by {merge_diff:.2e} "
                                  f"(> {MERGE_MAX_ABS}); the checkpoint's adapters do not merge cleanly")
            bar.done()
            # 3. encoder ONNX, both variants: one torch export, the pure-ONNX twin derived from its graph --
            bar.start(steps[2])
            enc_custom = export_encoder(model, work / "encoder.f32.onnx", "custom_op")
            pure_onnx_twin(work / "encoder.f32.onnx", work / "encoder.f32.scan.onnx")
            bar.done()
            bar.start(steps[3])
            ref_tokens = {"calibration": _ref_tokens(model, px_all[: len(calib)]),
                          "held_out": _ref_tokens(model, px_all[len(calib):] if len(images) > 1 else px_all)}
            sets = {"calibration": px_all[: len(calib)], "held_out": px_all[len(calib):] if len(images) > 1 else px_all}
            val = {"encoder_f32_pure": validate_encoder(work / "encoder.f32.scan.onnx", model, sets,
                                                        oplib=False, reference_outputs=ref_tokens, verbose=False)}
            from emrrg.runtime.oplib import find_op_library
            if find_op_library() is not None:
                val["encoder_f32"] = validate_encoder(work / "encoder.f32.onnx", model, sets, reference_outputs=ref_tokens,
                                                      verbose=False)
            bar.done()
            # 4. f32 decoder ---------------------------------------------------------------------------
            bar.start("export decoder")
            if reference == "streamed":
                dec = _streamed_decoder(model, checkpoint, work / "decoder_f32")
            else:
                dec = _export_decoder(model, work / "decoder_f32", opts, log, min_positions=decoder_positions(model))
            val["decoder_f32"] = dec.validation
            val["decoder_reference"] = {"kind": reference, "why": why}
            bar.done()
            reports = None
            if opts.calib_reports:
                from emrrg.export.report_check import ReportCheck
                reports = ReportCheck(model, opts.calib_reports, dec, opts.calib_reports_limit, log=log)
            enc_files = {"custom": work / "encoder.f32.onnx", "pure": work / "encoder.f32.scan.onnx"}
            enc_precision, calibration = "fp32", None
            # 5. INT8 encoder ----------------------------------------------------------------------------
            if opts.int8:
                bar.start("int8 encoder")
                calibration, enc_val = _quantize_encoder(model, work, calib, sets, ref_tokens, opts, log, reports)
                val.update(enc_val)
                enc_files = {"custom": work / "encoder.int8.onnx", "pure": work / "encoder.int8.scan.onnx"}
                enc_precision = "int8"
                bar.done()
            shutil.move(str(enc_files["custom"]), tmp / C.ENCODER_FILE)
            shutil.move(str(enc_files["pure"]), tmp / C.ENCODER_SCAN_FILE)
            # both encoder files hold the same weights: store them once
            enc_data = share_external_data(tmp, [C.ENCODER_FILE, C.ENCODER_SCAN_FILE], C.ENCODER_DATA_FILE)
            # 6. 4-bit decoder ---------------------------------------------------------------------------
            dec_dir, dec_precision, dec_choice = work / "decoder_f32", "fp32", None
            if opts.llm_bits == 4:
                bar.start("4-bit decoder")
                dec_dir, dec_choice = _quantize_decoder(model, ref_tokens["calibration"][:1], dec, work, opts,
                                                        streamed=reference == "streamed" and checkpoint,
                                                        adapters=adapters, reports=reports)
                dec_precision = "int4"
                val["decoder_4bit"] = dec_choice
                bar.done()
            for f in dec_dir.iterdir():
                if f.name in (C.DECODER_FILE, C.DECODER_DATA_FILE):
                    shutil.move(str(f), tmp / f.name)
            if dec.cross_kv is not None:  # hybrid layers: visual K/V stay f32, from the f32 export (one file)
                shutil.move(str(dec.cross_kv), tmp / C.CROSS_KV_FILE)
            embed_art = _write_embedding(dec.embed_tokens, tmp, quantized=opts.llm_bits == 4)
            # 7. tokenizer + manifest --------------------------------------------------------------------
            bar.start(steps[-1])
            model.tokenizer.save_pretrained(tmp / C.TOKENIZER_DIR)
            shutil.rmtree(work)
            manifest = _manifest(model, dec, opts, src_sha, checkpoint, enc_custom, enc_precision, dec_precision,
                                 calibration, val, merged, merge_diff, images, calib, held, tmp)
            manifest["artifacts"][C.EMBED_TOKENS] = embed_art
            manifest["encoder"]["external_data"] = enc_data
            manifest["export_s"] = round(time.perf_counter() - t_start, 1)
            full = write_manifest(tmp, manifest)
            bar.done()
    finally:
        bar.close()
    return full


def _quantize_encoder(model, work: Path, calib, sets, ref_tokens, opts: ExportOptions, log,
                      reports=None) -> tuple[dict, dict]:
    """INT8 through the accuracy-aware ladder (quantize_encoder.ENCODER_INT8_LADDER, or the one configuration
    pinned with --extra-options encoder_smooth_alpha / encoder_method / encoder_w3_float): the first whose
    Q/DQ graph passes the validation thresholds on the calibration and held-out images -- and, with
    --calib-reports (`reports`, a report_check.ReportCheck), whose reports through the f32 decoder stay within
    the report bands -- is kept. Without a pass the best (passed, then highest held-out mean cosine) is kept
    with passed=False, or --strict stops the export. Returns (calibration facts with every attempt, validation
    figures)."""
    import onnx

    from emrrg.runtime.oplib import find_op_library
    from emrrg.export.encoder_onnx import validate_encoder
    from emrrg.export.options import pinned, value
    from emrrg.export.quantize_encoder import ENCODER_INT8_LADDER, mlp_down_nodes, quantize_int8

    x = opts.values()
    ladder = ENCODER_INT8_LADDER
    if pinned(x, "encoder"):
        ladder = ({"name": "user", "smooth_alpha": value(x, "encoder_smooth_alpha") or None,
                   "method": value(x, "encoder_method"), "float_mlp_down": value(x, "encoder_w3_float"),
                   "float_worst_inputs": value(x, "encoder_float_worst_inputs"),
                   "weight_only": value(x, "encoder_weight_only"),
                   "weight_nmse_budget": value(x, "encoder_weight_nmse_budget")},)
    w3 = mlp_down_nodes(onnx.load(str(work / "encoder.f32.scan.onnx"), load_external_data=False))
    # the variant the runtime runs on this machine: the custom-op graph when the op library is built
    runtime_variant = "custom" if find_op_library() is not None else "pure"
    attempts, best = [], None
    for cfg in ladder:
        q = quantize_int8(work / "encoder.f32.onnx", work / "encoder.f32.scan.onnx", calib,
                          work / f"encoder.int8.{cfg['name']}.onnx",
                          pure_out_path=work / f"encoder.int8.{cfg['name']}.scan.onnx",
                          smooth_alpha=cfg["smooth_alpha"], method=cfg.get("method", "minmax"),
                          nodes_to_exclude=w3 if cfg.get("float_mlp_down") else (),
                          float_worst_inputs=cfg.get("float_worst_inputs", 0.0),
                          weight_only=cfg.get("weight_only", False),
                          weight_nmse_budget=cfg.get("weight_nmse_budget", 0.0))
        files = {"pure": Path(q["pure_path"]), "custom": Path(q["path"])}
        checks = [("encoder_int8_pure", files["pure"], False)]
        if runtime_variant == "custom":
            checks.append(("encoder_int8", files["custom"], "auto"))
        figures = {key: validate_encoder(path, model, sets, oplib=oplib, reference_outputs=ref_tokens, verbose=False,
                                         raise_on_failure=False) for key, path, oplib in checks}
        passed = all(f["passed"] for f in figures.values())
        pure_sets = figures["encoder_int8_pure"]["sets"]
        held = float(pure_sets["held_out" if "held_out" in pure_sets else next(iter(pure_sets))]["mean_cosine"])
        attempts.append({"name": cfg["name"], "passed": passed, "held_out_mean_cosine": held,
                         "bytes": q["bytes"], "config": {k: v for k, v in cfg.items() if k != "name"}})
        log(f"int8 encoder {cfg['name']}: {'pass' if passed else 'miss'} (held-out mean token cosine {held:.6f})")
        if passed and reports is not None:
            passed, attempts[-1]["reports"] = reports.check_encoder(files[runtime_variant])
            attempts[-1]["passed"] = passed
            log(f"int8 encoder {cfg['name']}: {verdict_line(attempts[-1]['reports'])}")
        if best is None or (passed, held) > (best[0]["passed"], best[0]["held_out_mean_cosine"]):
            loser, best = (best[1] if best else {}), (attempts[-1], files, figures, q)
        else:
            loser = files
        for f in loser.values():  # keep one candidate on disk (a base encoder pair is ~200 MB)
            f.unlink(missing_ok=True)
        if passed:
            break
    chosen, files, figures, q = best
    if reports is not None:
        reports.adopt_encoder(files[runtime_variant], chosen["name"], chosen["passed"])
    if not chosen["passed"]:
        if opts.strict:
            raise NoPassingConfigError(
                "--strict: no INT8 encoder configuration passes its thresholds (" +
                ", ".join(f"{a['name']} held-out cosine {a['held_out_mean_cosine']:.4f}" for a in attempts) +
                "); nothing was written. Drop --strict to keep the best one (marked passed=false in the manifest), "
                "or export without --int8 for an f32 encoder", attempts)
        log(f"warning: no INT8 encoder configuration passes its thresholds; keeping {chosen['name']} "
            f"(held-out mean token cosine {chosen['held_out_mean_cosine']:.4f}); export without --int8 for f32")
    shutil.move(str(files["custom"]), work / "encoder.int8.onnx")
    shutil.move(str(files["pure"]), work / "encoder.int8.scan.onnx")
    calibration = dict(q.get("calibration") or {}, chosen=chosen["name"], attempts=attempts)
    return calibration, figures


def _write_embedding(src: Path, root: Path, quantized: bool) -> dict:
    """embed_tokens.npy: f32, or (4-bit bundles) int8 blocks + f16 scales (emrrg.runtime.embedding); returns
    the manifest's embed_tokens artifact."""
    if not quantized:
        shutil.move(str(src), root / C.EMBED_TOKENS_FILE)
        return C.Artifact(C.EMBED_TOKENS_FILE, C.EMBED_FP32, "any").to_dict()
    from emrrg.runtime.embedding import Q8_BLOCK, Q8BlockEmbedding, quantize_q8_blocks

    w = np.load(src)
    q, scales = quantize_q8_blocks(w)
    np.save(root / C.EMBED_TOKENS_FILE, q)
    np.save(root / C.EMBED_SCALES_FILE, scales)
    err = float(np.abs(Q8BlockEmbedding(q, scales).dequantize() - w).max())
    art = C.Artifact(C.EMBED_TOKENS_FILE, C.EMBED_Q8, "any", data=(C.EMBED_SCALES_FILE,), scales=C.EMBED_SCALES_FILE,
                     block_size=Q8_BLOCK)
    return {**art.to_dict(), "max_abs_error_vs_fp32": err}


def _ref_tokens(model, px: np.ndarray) -> np.ndarray:
    import torch
    return np.concatenate([model.encode_images(torch.from_numpy(px[i:i + 4])).numpy() for i in range(0, len(px), 4)])


def _check_calib_reports(opts: ExportOptions) -> None:
    """--calib-reports: an INT8 encoder or a 4-bit decoder to check and an annotation with a validation split,
    before any work."""
    if opts.calib_reports is None:
        return
    if opts.llm_bits != 4 and not opts.int8:
        raise ExportError("--calib-reports checks the rungs of the INT8 encoder (--int8) and of the 4-bit decoder; "
                          "with --llm-bits 32 and no --int8 it has nothing to check")
    if opts.calib_reports_limit < 1:
        raise ExportError(f"--calib-reports-limit {opts.calib_reports_limit}: give 1 or more studies")
    from emrrg.data.annotation import missing_images
    from emrrg.evaluate import EvalError, load_split

    try:
        split = load_split(opts.calib_reports, "val", opts.calib_reports_limit)
    except EvalError as e:
        raise ExportError(f"--calib-reports: {e}") from None
    missing = missing_images(split.examples, split.root)
    if missing:
        raise ExportError(f"--calib-reports: {len(missing)} image(s) of its validation studies are missing, "
                          f"e.g. {missing[0]}")


def _ladder(values: dict):
    """The decoder keys of --extra-options (typed, ExportOptions.values()) pin one configuration, the keys not
    given at export/options.py's defaults; without them the accuracy-aware ladder of quantize_decoder is walked."""
    from emrrg.export.options import pinned, value
    from emrrg.export.quantize_decoder import DEFAULT_LADDER, QuantConfig

    pins = pinned(values, "decoder")
    if not pins:
        return DEFAULT_LADDER
    method = values.get("method") or ("sym" if value(values, "symmetric") else value(values, "method"))
    kw = {k: value(values, k) for k in ("block_size", "lm_head_bits", "accuracy_level", "refine", "separate_adapters")}
    name = "user-" + "-".join(f"{k}{v}" for k, v in sorted(pins.items()))
    return (QuantConfig(name, method=method, **kw),)


def _max_positions_new(cfg) -> int:
    """The KV cache's room for new tokens that the manifest promises the runtime (at least 512)."""
    return max(512, cfg.generation.max_new_tokens)


def decoder_positions(model) -> int:
    """Every position a report through this bundle can reach (the runtime's cache length): the prompt with its
    visual tokens plus max_positions_new. The built graph's rotary tables must cover it, even past the LLM's
    max_position_embeddings (transformers computes rotary angles for any position, so the reference does too)."""
    before, after = model.prompt_ids()
    return len(before) + model.cfg.num_visual_tokens + len(after) + _max_positions_new(model.cfg)


def _export_decoder(model, out: Path, opts: ExportOptions, log: Callable[[str], None], min_positions: int = 0):
    """The f32 decoder: built from the weights (export/decoder_builder.py, the default) or traced with torch.onnx
    (--extra-options decoder_graph=traced). A decoder the builder does not know falls back to traced, with a log line."""
    from emrrg.export.decoder_builder import BuilderUnsupported, export_decoder_built
    from emrrg.export.decoder_onnx import export_decoder
    from emrrg.export.options import value

    llm = model.llama_model
    if value(opts.values(), "decoder_graph") == "built":
        try:
            return export_decoder_built(llm, out, tokenizer=model.tokenizer, verbose=False,
                                        min_positions=min_positions)
        except BuilderUnsupported as e:
            log(f"decoder graph: {e}; exporting it with torch.onnx instead (decoder_graph=traced)")
    return export_decoder(llm, out, tokenizer=model.tokenizer, verbose=False)


def _decoder_reference(checkpoint, opts: ExportOptions) -> tuple[str, str]:
    """("f32" | "streamed", why): what the 4-bit candidates are scored against (export/streamed_reference.py)."""
    from emrrg.checkpoint import read_config
    from emrrg.export.options import value
    from emrrg.export.streamed_reference import choose_reference

    if opts.llm_bits != 4:
        return "f32", "f32 LLM in memory (--llm-bits 32)"
    return choose_reference(checkpoint, read_config(checkpoint), value(opts.values(), "decoder_reference"))


def _streamed_shape(model):
    import dataclasses

    from emrrg.export.decoder_builder import LlamaShape

    shape = LlamaShape.from_config(model.llama_model.config)
    return dataclasses.replace(shape, max_positions=max(shape.max_positions, decoder_positions(model)))


def _streamed_decoder(model, checkpoint, out: Path):
    """The decoder step without an f32 decoder: the spec and the f32 embedding table, read from the safetensors
    (an f32 decoder.onnx of a 7B would be 28 GB, and its validation would hold it in an ORT session)."""
    from emrrg.export.decoder_builder import SafetensorsWeights, builder_spec, save_embed_table, token_ids
    from emrrg.export.decoder_onnx import DecoderExport, decoder_spec
    from emrrg.export.streamed_reference import llm_weight_files

    t0 = time.perf_counter()
    shape = _streamed_shape(model)
    out.mkdir(parents=True)
    embed = save_embed_table(SafetensorsWeights(llm_weight_files(checkpoint, model.cfg)), shape, out)
    spec = builder_spec(shape, token_ids(decoder_spec(model.llama_model, model.tokenizer)))
    return DecoderExport(decoder=None, embed_tokens=embed, cross_kv=None, spec=spec, bytes={},
                         validation={"skipped": "no f32 decoder is built: the 4-bit candidates are scored against "
                                                "the streamed f32 reference"}, export_s=time.perf_counter() - t0)


def _quantize_decoder(model, visual: np.ndarray, dec, work: Path, opts: ExportOptions,
                      streamed: str | Path | bool = False, adapters: dict | None = None,
                      reports=None) -> tuple[Path, dict]:
    """4-bit decoder through the accuracy-aware chooser, scored teacher-forced against the f32 PyTorch LLM
    on real report text after the EMRRG prompt (export/decoder_eval.py). streamed (the checkpoint): the f32
    reference and the activation statistics come from export/streamed_reference.py, the candidates are built
    from the safetensors. adapters: the LLM's LoRA factors taken before the merge (decoder_builder.lora_factors),
    for the ladder's rung that keeps them separate. reports: --calib-reports' report_check.ReportCheck, a further
    check of each rung that meets the thresholds."""
    import torch

    from emrrg.export.decoder_eval import DecoderEvaluator, TorchDecoder, build_reference, eval_prompts, prefill_feeds
    from emrrg.export.decoder_onnx import ort_session
    from emrrg.export import quantize_decoder as qd
    from emrrg.export.options import value

    x = opts.values()
    n_prompts, n_new, prompt_tokens = (value(x, k) for k in ("eval_prompts", "eval_tokens", "prompt_tokens"))
    tok = model.tokenizer
    visual_kv = {}
    if dec.cross_kv is not None:  # hybrid layers: score with one calibration image's visual K/V on both sides
        sess = ort_session(dec.cross_kv)
        visual_kv = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {C.CROSS_KV_INPUT: visual})))
        model.set_visual(torch.from_numpy(visual))
    prompts = eval_prompts(tok, n=n_prompts, prompt_tokens=prompt_tokens)
    calib_prompts = eval_prompts(tok, n=2, prompt_tokens=prompt_tokens, first_report=300)
    if streamed:
        return _quantize_streamed(model, streamed, prompts, calib_prompts, n_new, dec, work, opts)
    try:
        reference = build_reference(TorchDecoder(model.llama_model), prompts, n_new)
    finally:
        model.set_visual(None)
    embed = np.load(dec.embed_tokens)
    calib = [dict(f, **visual_kv) for f in prefill_feeds(dec.spec, embed, calib_prompts)]
    stats = qd.collect_activation_stats(dec.decoder, calib)
    ladder, quantize = _ladder(x), None
    if dec.spec.cache == C.CACHE_SHARED:  # built graph: each candidate is built from the weights
        from emrrg.export.decoder_builder import BUILT_LADDER, ModuleWeights, _module_shape, quantized_builder, token_ids
        ladder = ladder if ladder is not qd.DEFAULT_LADDER else BUILT_LADDER
        quantize = quantized_builder(ModuleWeights(model.llama_model),
                                     _module_shape(model.llama_model, min_positions=decoder_positions(model)),
                                     token_ids(dec.spec), adapters=adapters)
    return _choose(dec.decoder, work, DecoderEvaluator(reference, embed, visual_kv=visual_kv or None), ladder, stats,
                   opts, quantize, reports)


def _choose(f32_onnx, work: Path, evaluator, ladder, stats, opts: ExportOptions, quantize,
            accept=None) -> tuple[Path, dict]:
    from emrrg.export import quantize_decoder as qd

    try:
        choice = qd.choose_decoder_config(f32_onnx, work / "decoder_4bit", evaluator,
                                          ladder=ladder, act_stats=stats, top1_min=qd.TOP1_MIN, kl_max=qd.KL_MAX,
                                          strict=opts.strict, verbose=False, quantize=quantize, accept=accept)
    except NoPassingConfigError as e:
        raise NoPassingConfigError(f"--strict: 4-bit decoder: {e}; nothing was written. Drop --strict to keep the best "
                                   "one (marked passed=false in the manifest), or use --llm-bits 32 for an f32 decoder",
                                   e.attempts) from None
    return work / "decoder_4bit", choice.manifest()


def _quantize_streamed(model, checkpoint, prompts, calib_prompts, n_new: int, dec, work: Path, opts: ExportOptions
                       ) -> tuple[Path, dict]:
    """_quantize_decoder for an LLM that is never in memory: reference and statistics streamed layer by layer,
    every candidate built from the safetensors, the f32 reference's model dropped before the first candidate."""
    from emrrg.export.decoder_builder import BUILT_LADDER, SafetensorsWeights, quantized_builder, token_ids
    from emrrg.export.decoder_eval import DecoderEvaluator
    from emrrg.export import quantize_decoder as qd
    from emrrg.export.streamed_reference import StreamedLlama, llm_weight_files

    files = llm_weight_files(checkpoint, model.cfg)
    ladder = _ladder(opts.values())
    ladder = ladder if ladder is not qd.DEFAULT_LADDER else BUILT_LADDER
    ref = StreamedLlama(files, model.llama_model.config)
    reference = ref.reference(prompts, n_new)
    stats = ref.activation_stats(calib_prompts) if any(c.act_weighted for c in ladder) else None
    del ref
    quantize = quantized_builder(SafetensorsWeights(files), _streamed_shape(model), token_ids(dec.spec))
    return _choose(None, work, DecoderEvaluator(reference, np.load(dec.embed_tokens)), ladder, stats, opts, quantize)


def _manifest(model, dec, opts, src_sha, checkpoint, enc_info, enc_precision, dec_precision, calibration, val,
              merged, merge_diff, images, calib, held, root: Path) -> dict:
    tok = model.tokenizer
    before, after = model.prompt_ids()
    from emrrg.model import PROMPT_AFTER, PROMPT_BEFORE
    A = C.Artifact
    arts = {
        C.ENCODER: A(C.ENCODER_FILE, enc_precision, opts.target, data=(C.ENCODER_DATA_FILE,), scan_variant="custom_op",
                     requires_op_library=True),
        C.ENCODER_FALLBACK: A(C.ENCODER_SCAN_FILE, enc_precision, "cpu", data=(C.ENCODER_DATA_FILE,),
                              scan_variant="pure_onnx", requires_op_library=False),
        C.DECODER: A(C.DECODER_FILE, dec_precision, opts.target,
                     data=(C.DECODER_DATA_FILE,) if (root / C.DECODER_DATA_FILE).exists() else ()),
        C.TOKENIZER: A(C.TOKENIZER_FILE, "-", "any"),               # embed_tokens: _write_embedding's
    }
    if (root / C.CROSS_KV_FILE).exists():
        arts[C.CROSS_KV] = A(C.CROSS_KV_FILE, "fp32", opts.target)
    cfg = model.cfg
    return {
        "source": {"checkpoint": str(checkpoint), "sha256": src_sha},
        "config": cfg.to_dict(),
        "prompt": C.Prompt(tuple(before), tuple(after), PROMPT_BEFORE, PROMPT_AFTER).to_dict(),
        "generation": {**asdict(cfg.generation), "max_positions_new": _max_positions_new(cfg)},
        "tokens": C.Tokens(eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
                           unk_token_id=tok.unk_token_id, unk_token=tok.unk_token).to_dict(),
        "encoder": C.EncoderInfo(cfg.encoder.img_size, cfg.num_visual_tokens, enc_info["hidden"]).to_dict(),
        "decoder": dec.spec.to_dict(),
        "artifacts": {k: a.to_dict() for k, a in arts.items()},
        "merge": {"merged": merged, "max_abs_diff": merge_diff, "tolerance": MERGE_MAX_ABS},
        "calibration": calibration or {"images": [Path(str(p)).name for p in calib], "used": False},
        "validation": {"images": {"calibration": [Path(str(p)).name for p in calib],
                                  "held_out": [Path(str(p)).name for p in held]}, **val},
        "export_options": {k: v for k, v in asdict(opts).items() if k != "overwrite"},
    }
