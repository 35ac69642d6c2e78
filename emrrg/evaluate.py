"""`emrrg-eval`: report-generation metrics on a split of an R2Gen-style annotation.json.

    emrrg-eval CKPT_OR_BUNDLE --data annotation.json --split test -o scores.json
    emrrg-eval --iu -o iu.json

What it computes, as R2Gen / EMRRG (arXiv 2510.16776) report it:
- NLG: BLEU-1..4, METEOR, ROUGE-L, CIDEr over the split (`emrrg.metrics.nlg.nlg_scores`, the COCO
  caption scorers with the PTB tokenizer);
- clinical efficacy (CE): precision / recall / F1 over the 14 CheXpert classes, micro and macro, from
  the rule-based labeler run on the generated and the reference reports (`emrrg.metrics.labeler`);
- the upstream model-selection score 0.8·BLEU-4 + 0.2·CIDEr;
- the "most common report" baseline: the single most frequent training report predicted for every
  example of the split (ties: the first in annotation order), scored the same way.

The source is either an emrrg checkpoint directory (the f32 PyTorch model, batched generation) or a
bundle written by emrrg-export (through `emrrg.runtime.Runtime`, torch-free); both read the same
pixels through `emrrg.runtime.preprocess`. Decoding defaults to the source's own settings; the
`--beams`, `--min-new-tokens`, `--max-new-tokens`, `--repetition-penalty`, `--length-penalty` and
`--no-repeat-ngram-size` flags override them.

`--iu` needs no model: it scores the metrics themselves on the real IU X-Ray reports read at run time
from the installed torchxrayvision package (CC BY-NC-ND; never copied into this repository):
- the labeler against the reports' own MeSH major terms (coded by NLM indexers), per CheXpert class;
- reference points for trivial predictors on IU: the most common IU report for every study, and a
  shuffled report (each study gets another study's report).
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from emrrg.runtime.helpfmt import CommandParser, DefaultsHelpFormatter

BLEU_CIDER_WEIGHTS = (0.8, 0.2)  # upstream EMRRG / R2GenGPT checkpoint selection: 0.8·BLEU-4 + 0.2·CIDEr


class EvalError(ValueError):
    """A source, split or annotation the evaluator cannot use."""


# ---- data --------------------------------------------------------------------------------------

@dataclass
class Split:
    annotation: Path
    name: str
    examples: list[dict]

    @property
    def root(self) -> Path:
        return self.annotation.parent

    def images(self, ex: dict) -> list[Path]:
        return [self.root / p for p in ex["image_path"]]


def load_split(annotation: str | Path, split: str, limit: int | None = None) -> Split:
    from emrrg.data.annotation import SPLITS, load_annotation

    annotation = Path(annotation)
    if not annotation.is_file():
        raise EvalError(f"{annotation}: no such annotation file")
    if split not in SPLITS:
        raise EvalError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    try:
        ann = load_annotation(annotation)
    except (ValueError, json.JSONDecodeError) as e:
        raise EvalError(f"{annotation}: {e}") from None
    ex = ann[split][:limit] if limit else ann[split]
    if not ex:
        raise EvalError(f"{annotation}: split {split!r} is empty")
    return Split(annotation, split, ex)


def most_common_report(examples: Sequence[dict]) -> str:
    """The most frequent report text (ties: the first in order)."""
    counts = collections.Counter(e["report"] for e in examples)
    best = max(counts.values())
    return next(e["report"] for e in examples if counts[e["report"]] == best)


REPEATED_SENTENCE_RULE = ("a report with the same sentence twice (emrrg.data.reports.split_report_sentences: split at "
                          ". ! ? followed by whitespace or the end, so '1.5 cm' does not split, and after 'a.m.' / "
                          "'p.m.' only before a capital letter; spaces and case folded)")


def repeats_a_sentence(report: str) -> bool:
    """True when `report` says one sentence twice (:data:`REPEATED_SENTENCE_RULE`)."""
    from emrrg.data.reports import split_report_sentences

    sentences = [" ".join(s.rstrip(".!?").split()).casefold() for s in split_report_sentences(report)]
    sentences = [s for s in sentences if s]
    return len(set(sentences)) < len(sentences)


def repeated_sentence_reports(preds: Sequence[str]) -> dict:
    """How many of `preds` repeat a sentence (a report that loops), with the rule in words."""
    return {"count": sum(repeats_a_sentence(p) for p in preds), "of": len(preds), "rule": REPEATED_SENTENCE_RULE}


def selection_score(nlg: dict) -> float:
    wb, wc = BLEU_CIDER_WEIGHTS
    return wb * float(nlg["BLEU_4"]) + wc * float(nlg["CIDEr"])


def score_reports(preds: Sequence[str], refs: Sequence[str], meteor: bool = True, tokenizer: str = "auto") -> dict:
    """NLG + CE + the selection score of predictions against references (one reference each)."""
    from emrrg.metrics.labeler import ce_scores
    from emrrg.metrics.nlg import nlg_scores

    nlg = nlg_scores(list(preds), list(refs), meteor=meteor, tokenizer=tokenizer)
    ce = ce_scores(list(preds), list(refs))
    return {"nlg": nlg, "ce": ce, "score": selection_score(nlg)}


# ---- generation ---------------------------------------------------------------------------------

def decode_overrides(beams: int | None = None, min_new_tokens: int | None = None, max_new_tokens: int | None = None,
                     repetition_penalty: float | None = None, length_penalty: float | None = None,
                     no_repeat_ngram_size: int | None = None) -> dict:
    over = {"num_beams": beams, "min_new_tokens": min_new_tokens, "max_new_tokens": max_new_tokens,
            "repetition_penalty": repetition_penalty, "length_penalty": length_penalty,
            "no_repeat_ngram_size": no_repeat_ngram_size}
    return {k: v for k, v in over.items() if v is not None}   # resolved against each source's own settings


class TorchGenerator:
    """Batched generation with the f32 PyTorch model (studies grouped by view count)."""

    kind = "pytorch"

    def __init__(self, model, batch_size: int = 8):
        self.model, self.batch_size = model, batch_size
        self.image_size = model.cfg.encoder.img_size

    @classmethod
    def from_checkpoint(cls, path: str | Path, batch_size: int = 8) -> "TorchGenerator":
        from emrrg.checkpoint import load_checkpoint
        return cls(load_checkpoint(path), batch_size)

    def settings(self, over: dict) -> dict:
        from dataclasses import asdict
        gen = self.model.cfg.generation
        return asdict(type(gen).resolve(asdict(gen), over))

    def pixels(self, images: Sequence[Path]) -> np.ndarray:
        from emrrg.runtime.preprocess import preprocess_study
        return preprocess_study(list(images), size=self.image_size)          # (V, 3, S, S)

    def generate(self, studies: Sequence[Sequence[Path]], over: dict,
                 on_done: Callable[[int], None] | None = None) -> list[list[int]]:
        import torch

        g = self.settings(over)
        keys = ["num_beams", "min_new_tokens", "max_new_tokens", "repetition_penalty", "no_repeat_ngram_size"]
        kwargs = {k: g[k] for k in keys}
        # greedy has no length penalty (None: not passed on, so transformers does not warn about it)
        kwargs["length_penalty"] = g["length_penalty"] if g["num_beams"] > 1 else None
        px = [self.pixels(s) for s in studies]
        out: list[list[int] | None] = [None] * len(studies)
        by_views: dict[int, list[int]] = collections.defaultdict(list)
        for i, p in enumerate(px):
            by_views[p.shape[0]].append(i)
        self.model.eval()
        for idx in by_views.values():
            for k in range(0, len(idx), self.batch_size):
                chunk = idx[k:k + self.batch_size]
                batch = torch.from_numpy(np.stack([px[i] for i in chunk]))    # (b, V, 3, S, S)
                ids = self.model.generate_ids(batch, **kwargs)
                for i, row in zip(chunk, ids.tolist()):
                    out[i] = row
                if on_done:
                    on_done(len(chunk))
        return out  # type: ignore[return-value]

    def decode(self, ids: Sequence[int]) -> str:
        return self.model.decode(ids)


class BundleGenerator:
    """One study at a time through the torch-free runtime."""

    kind = "bundle"

    def __init__(self, runtime):
        self.rt = runtime
        self.image_size = runtime.image_size

    @classmethod
    def from_bundle(cls, path: str | Path, backend: str = "auto", threads: int | None = None) -> "BundleGenerator":
        from emrrg.runtime.report_runtime import Runtime
        return cls(Runtime.from_pretrained(path, backend=backend, threads=threads))

    def settings(self, over: dict) -> dict:
        return self.rt.settings(**over).as_generation()

    def generate(self, studies: Sequence[Sequence[Path]], over: dict,
                 on_done: Callable[[int], None] | None = None) -> list[list[int]]:
        g = self.settings(over)
        saved = dict(self.rt.gen)
        self.rt.gen.update(g)
        try:
            out = []
            for s in studies:
                out.append(list(self.rt.generate(list(s))["token_ids"]))
                if on_done:
                    on_done(1)
            return out
        finally:
            self.rt.gen.clear()
            self.rt.gen.update(saved)

    def decode(self, ids: Sequence[int]) -> str:
        return self.rt.decode_text(ids)


def open_source(path: str | Path, batch_size: int = 8, backend: str = "auto", threads: int | None = None):
    """A checkpoint directory (config.json) or a bundle (manifest.json) -> a generator."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        return BundleGenerator.from_bundle(path, backend=backend, threads=threads)
    if (path / "config.json").is_file():
        return TorchGenerator.from_checkpoint(path, batch_size)
    raise EvalError(f"{path} is neither an emrrg checkpoint (config.json) nor a bundle (manifest.json)")


def predict_split(gen, split: Split, over: dict, progress: bool = False) -> list[dict]:
    """Generate a report for every example: [{id, reference, prediction, token_ids}]."""
    from emrrg.runtime.logs import Progress  # a bar on a terminal, plain lines in a log file

    bar = Progress(len(split.examples), f"generate {split.name}", units="studies", enabled=progress)
    try:
        ids = gen.generate([split.images(e) for e in split.examples], over, on_done=bar.update)
    finally:
        bar.close()
    return _rows(gen, split.examples, ids)


def _rows(gen, examples: Sequence[dict], ids: Sequence[Sequence[int]]) -> list[dict]:
    return [{"id": e["id"], "reference": e["report"], "prediction": gen.decode(t), "token_ids": list(t)}
            for e, t in zip(examples, ids)]


def _torch_threads(threads: int | None) -> None:
    """torch's intra-op threads, when torch is there (a bundle source runs without it)."""
    if threads:
        try:
            import torch
            torch.set_num_threads(threads)
        except ImportError:
            pass


def _predict_worker(queue, part: int, source: str, batch_size: int, backend: str, threads: int | None,
                    annotation: str, split_name: str, start: int, stop: int, over: dict) -> None:
    """One process of predict_split_workers: its contiguous slice of the split, one ("done", n) message per
    finished batch, then ("rows", part, rows) or ("error", part, message)."""
    try:
        _torch_threads(threads)
        split = load_split(annotation, split_name)
        split.examples = split.examples[start:stop]
        gen = open_source(source, batch_size, backend, threads)
        ids = gen.generate([split.images(e) for e in split.examples], over, on_done=lambda n: queue.put(("done", n)))
        queue.put(("rows", part, _rows(gen, split.examples, ids)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises EvalError
        queue.put(("error", part, f"{type(e).__name__}: {e}"))


def predict_split_workers(source: str | Path, split: Split, over: dict, workers: int, batch_size: int = 8,
                          backend: str = "auto", threads: int | None = None, progress: bool = False) -> list[dict]:
    """predict_split over `workers` processes, each with its own copy of the source and a contiguous slice of
    the split (`threads` each), merged in split order. The rows are the same as one process's at the same batch
    size when each slice's batches are: batch size 1 gives the same per-study computation everywhere.
    threads=None shares the cores among the workers."""
    import multiprocessing as mp
    import os
    import queue as queue_mod

    from emrrg.runtime.logs import Progress

    n = len(split.examples)
    bounds = [(n * k // workers, n * (k + 1) // workers) for k in range(workers)]
    threads = threads or max(1, (os.cpu_count() or 1) // workers)     # not every worker on every core
    ctx = mp.get_context("spawn")                 # no fork of a process that may hold torch / ORT threads
    queue = ctx.Queue()
    by_part = {k: ctx.Process(target=_predict_worker, daemon=True,
                              args=(queue, k, str(source), batch_size, backend, threads, str(split.annotation),
                                    split.name, a, b, over)) for k, (a, b) in enumerate(bounds) if b > a}
    procs = list(by_part.values())
    bar = Progress(n, f"generate {split.name} ({len(procs)} workers)", units="studies", enabled=progress)
    parts: dict[int, list[dict]] = {}
    ended: set[int] = set()                      # workers seen exited cleanly without their reports
    try:
        for p in procs:
            p.start()
        while len(parts) < len(procs):
            try:
                msg = queue.get(timeout=5)
            except queue_mod.Empty:   # nothing for 5 s: check that the workers are alive
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise EvalError(f"an evaluation worker exited with code {dead[0].exitcode} "
                                    "(out of memory? try fewer --workers)") from None
                # A worker that had exited cleanly at the previous empty wait sent everything before it exited:
                # with the queue empty again and its reports missing, they were lost and waiting would never end.
                now = {k for k, p in by_part.items() if p.exitcode == 0 and k not in parts}
                lost, ended = now & ended, now
                if lost:
                    raise EvalError(f"evaluation worker {min(lost) + 1} of {len(procs)} ended without sending "
                                    "its reports") from None
                continue
            if msg[0] == "done":
                bar.update(msg[1])
            elif msg[0] == "rows":
                parts[msg[1]] = msg[2]
            else:
                raise EvalError(f"evaluation worker {msg[1] + 1} of {len(procs)}: {msg[2]}")
    finally:
        bar.close()
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
    return [r for k in sorted(parts) for r in parts[k]]


def evaluate_source(gen, split: Split, over: dict, train_examples: Sequence[dict] | None = None,
                    meteor: bool = True, tokenizer: str = "auto", progress: bool = False,
                    predict: Callable[[], list[dict]] | None = None) -> dict:
    """Score a split. `predict`: makes the predictions instead of predict_split(gen, ...) (for instance
    predict_split_workers); `gen` still gives the source kind and the decoding settings."""
    t0 = time.perf_counter()
    rows = predict() if predict else predict_split(gen, split, over, progress)
    t1 = time.perf_counter()
    refs = [r["reference"] for r in rows]
    res: dict[str, Any] = {
        "source_kind": gen.kind,
        "split": split.name,
        "n": len(rows),
        "decoding": gen.settings(over),
        "model": score_reports([r["prediction"] for r in rows], refs, meteor, tokenizer),
        "generate_s": round(t1 - t0, 2),
        "repeated_sentence_reports": repeated_sentence_reports([r["prediction"] for r in rows]),
    }
    if train_examples:
        base = most_common_report(train_examples)
        res["baseline_most_common"] = {"report": base, **score_reports([base] * len(refs), refs, meteor, tokenizer)}
    res["predictions"] = rows
    return res


# ---- IU X-Ray: the metrics on real reports --------------------------------------------------------

# MeSH major headings (IU X-Ray "major" terms, the part before "/") -> CheXpert class. Only headings
# that name the class itself; the labeler is scored per class on the studies where MeSH is explicit.
IU_MESH_TO_CHEXPERT: dict[str, str] = {
    "normal": "No Finding",
    "Cardiomegaly": "Cardiomegaly",
    "Opacity": "Lung Opacity",
    "Airspace Disease": "Lung Opacity",
    "Infiltrate": "Lung Opacity",
    "Density": "Lung Opacity",
    "Nodule": "Lung Lesion",
    "Mass": "Lung Lesion",
    "Pulmonary Edema": "Edema",
    "Pulmonary Congestion": "Edema",
    "Consolidation": "Consolidation",
    "Pneumonia": "Pneumonia",
    "Pulmonary Atelectasis": "Atelectasis",
    "Pneumothorax": "Pneumothorax",
    "Pleural Effusion": "Pleural Effusion",
    "Fractures, Bone": "Fracture",
    "Catheters, Indwelling": "Support Devices",
    "Implanted Medical Device": "Support Devices",
    "Tube, Inserted": "Support Devices",
    "Medical Device": "Support Devices",
    "Surgical Instruments": "Support Devices",
    "Stents": "Support Devices",
}


def iu_mesh_labels(mesh: Sequence[str]) -> dict[str, int]:
    from emrrg.metrics.labeler import CHEXPERT_CLASSES

    out = {c: 0 for c in CHEXPERT_CLASSES}
    for term in mesh:
        c = IU_MESH_TO_CHEXPERT.get(term.split("/")[0].strip())
        if c:
            out[c] = 1
    return out


def iu_evaluation(limit: int | None = None, meteor: bool = True, tokenizer: str = "auto", seed: int = 0) -> dict:
    """The labeler against MeSH, and trivial-predictor reference points, on the real IU reports."""
    from emrrg.metrics.labeler import ce_from_labels, iu_records, label_reports

    recs = [r for r in iu_records() if r.mesh and r.mesh != ("No Indexing",)]
    if limit:
        recs = recs[:limit]
    if len(recs) < 2:
        raise EvalError("need at least two IU reports")
    texts = [r.text for r in recs]
    labeler = ce_from_labels(label_reports(texts), [iu_mesh_labels(r.mesh) for r in recs])
    common = most_common_report([{"report": t} for t in texts])
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(texts))
    perm = np.where(perm == np.arange(len(texts)), np.roll(perm, 1), perm)  # nobody gets their own report
    shuffled = [texts[i] for i in perm]
    return {
        "source": "torchxrayvision/data/NLMCXR_reports.tgz (IU X-Ray, CC BY-NC-ND, read at run time)",
        "n": len(recs),
        "labeler_vs_mesh": {"note": "rule-based labeler on FINDINGS+IMPRESSION vs NLM MeSH major headings mapped to "
                                    "CheXpert classes (IU_MESH_TO_CHEXPERT); uncertain -> positive",
                            **labeler},
        "baseline_most_common": {"report": common, **score_reports([common] * len(texts), texts, meteor, tokenizer)},
        "baseline_shuffled": score_reports(shuffled, texts, meteor, tokenizer),
    }


# ---- CLI -------------------------------------------------------------------------------------------

def _summary_line(name: str, s: dict) -> str:
    n, ce = s["nlg"], s["ce"]
    met = f"{n['METEOR']:.4f}" if n.get("METEOR") is not None else "-"
    return (f"{name:<22} B1 {n['BLEU_1']:.4f} B4 {n['BLEU_4']:.4f} METEOR {met} ROUGE-L {n['ROUGE_L']:.4f} "
            f"CIDEr {n['CIDEr']:.4f} | CE P {ce['precision_micro']:.4f} R {ce['recall_micro']:.4f} "
            f"F1 {ce['f1_micro']:.4f} (macro F1 {ce['f1_macro']:.4f})")


def eval_main(argv: list[str] | None = None) -> None:
    p = CommandParser(
        prog="emrrg-eval", formatter_class=DefaultsHelpFormatter,
        description="BLEU-1..4, METEOR, ROUGE-L, CIDEr and CheXpert CE P/R/F1 of a checkpoint or a bundle on a split "
                    "of an R2Gen annotation.json; --iu scores the metrics on the real IU X-Ray reports.")
    p.add_argument("source", nargs="?", help="emrrg checkpoint directory or emrrg-export bundle")
    p.add_argument("--data", help="R2Gen-style annotation.json (image paths relative to it) (default: none; "
                                  "required unless --iu)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="which split to score")
    p.add_argument("--limit", type=int, default=None, help="first N studies of the split (default: all)")
    p.add_argument("-o", "--output", default=None, help="write the JSON here (default: print a summary only)")
    p.add_argument("--iu", action="store_true", help="score the labeler and metrics on the real IU X-Ray reports "
                                                     "(no model; torchxrayvision must be installed)")
    p.add_argument("--beams", type=int, default=None, help="beam count (default: the source's own setting)")
    p.add_argument("--min-new-tokens", type=int, default=None, help="(default: the source's)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="(default: the source's)")
    p.add_argument("--repetition-penalty", type=float, default=None, help="(default: the source's)")
    p.add_argument("--length-penalty", type=float, default=None,
                   help="beam score = sum of log-probabilities / length ** this (default: the source's)")
    p.add_argument("--no-repeat-ngram-size", type=int, default=None, help="ban repeated n-grams of this size, 0 = off "
                                                                          "(default: the source's)")
    p.add_argument("--batch-size", type=int, default=8, help="studies per batch (PyTorch source)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes generating in parallel, each with its own copy of the source, a contiguous "
                        "slice of the split and --threads threads (default: the cores shared among them); the "
                        "reports are the same as one process's at batch size 1")
    p.add_argument("--backend", default="auto", help="runtime backend for a bundle source")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch and ONNX Runtime) (default: all cores)")
    p.add_argument("--no-baseline", action="store_true", help="skip the most-common-training-report baseline")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (it starts a Java process)")
    p.add_argument("--tokenizer", default="auto", choices=("auto", "ptb", "simple"), help="NLG tokenizer")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if not a.iu and (not a.source or not a.data):
        p.error("give a SOURCE and --data (or --iu)")
    from emrrg.cli import _cli_errors

    # A bundle is scored through the torch-free runtime; a checkpoint (config.json) needs PyTorch.
    needs_torch = bool(a.source) and (Path(a.source) / "config.json").is_file()
    with _cli_errors(p.prog, needs_torch=needs_torch):
        try:
            _run_eval(a)
        except EvalError as e:
            print(f"{p.prog}: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None


def _run_eval(a) -> None:
    _torch_threads(a.threads)
    meteor = not a.no_meteor
    if a.iu:
        res = iu_evaluation(a.limit, meteor=meteor, tokenizer=a.tokenizer)
        lab = res["labeler_vs_mesh"]
        print(f"IU X-Ray: {res['n']} reports; labeler vs MeSH: P {lab['precision_micro']:.4f} R {lab['recall_micro']:.4f} "
              f"F1 {lab['f1_micro']:.4f} (macro F1 {lab['f1_macro']:.4f})")
        print(_summary_line("most common report", res["baseline_most_common"]))
        print(_summary_line("shuffled report", res["baseline_shuffled"]))
    else:
        from emrrg.data.annotation import load_annotation

        src = Path(a.source)
        if not src.exists():
            raise EvalError(f"{src}: no such checkpoint or bundle")
        split = load_split(a.data, a.split, a.limit)
        gen = open_source(src, a.batch_size, a.backend, a.threads)
        train = None if a.no_baseline else load_annotation(a.data)["train"]
        over = decode_overrides(a.beams, a.min_new_tokens, a.max_new_tokens, a.repetition_penalty,
                                a.length_penalty, a.no_repeat_ngram_size)
        if a.workers < 1:
            raise EvalError(f"--workers {a.workers}: give 1 or more")
        predict = None
        if a.workers > 1:
            predict = lambda: predict_split_workers(src, split, over, a.workers, a.batch_size, a.backend,  # noqa: E731
                                                    a.threads, progress=not a.no_progress)
        res = evaluate_source(gen, split, over, train, meteor=meteor, tokenizer=a.tokenizer,
                              progress=not a.no_progress, predict=predict)
        if a.workers > 1:
            res["workers"] = a.workers
        res = {"source": str(src), "data": str(a.data), **res}
        print(f"{src} on {a.split} ({res['n']} studies, {gen.kind}, decoding {res['decoding']}, {res['generate_s']} s):")
        print(_summary_line("model", res["model"]))
        rep = res["repeated_sentence_reports"]
        print(f"{'':<22} reports repeating a sentence: {rep['count']} / {rep['of']}")
        if "baseline_most_common" in res:
            print(_summary_line("most common report", res["baseline_most_common"]))
    if a.output:
        out = Path(a.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(res, indent=1, default=float) + "\n")
        tmp.replace(out)
        print(f"wrote {out}")


if __name__ == "__main__":  # pragma: no cover
    eval_main()
