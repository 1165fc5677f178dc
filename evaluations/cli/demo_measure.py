"""The demo's `measure` section: fine-tune, merge and measure on real weights (all-MiniLM-L6-v2), offline, on CPU.

Basin's premise end to end: two fine-tunes of one base on two text sources, merged three ways, each merge measured
by the merge report (`evaluations.merge_report`, what `basin merge --measure` runs), so the table shows whether the
merge keeps both fine-tunes' gains and what stands between them (the loss barrier, the task vectors' cosine).

- data: (A) sentences of scikit-learn's bundled dataset descriptions, (B) sentences of Python standard-library
  docstrings; each sentence becomes a pair (first half of its words, second half) for the encoder's in-batch
  contrastive objective (`evaluations.model_losses.CONTRASTIVE`); sorted, deduplicated, split with a seeded shuffle
  into `a.jsonl`, `b.jsonl` (training) and `eval.jsonl` (held-out pairs of both);
- fine-tunes: Adam on basin's own objective (`objective_for(model).batch_loss`), seeded;
- merges: linear 0.5/0.5 of the fine-tunes; task_arithmetic (weights 1) and TIES (weights 1, density 0.5) on the
  base.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATASETS = ("load_iris", "load_wine", "load_breast_cancer", "load_diabetes", "load_digits", "load_linnerud")
MODULES = ("json", "os", "collections", "re", "pathlib", "itertools", "functools", "textwrap", "string", "random",
           "math", "statistics", "shutil", "heapq", "bisect", "argparse", "csv", "datetime", "fractions", "decimal")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
FOLDERS = ("measure-data", "ft_a", "ft_b", "measure-linear", "measure-task_arithmetic", "measure-ties")
SEED = 0


@dataclass(frozen=True)
class Settings:
    """Sizes of the section: the full demo, or `QUICK` (tests)."""

    steps: int = 20  # Adam steps per fine-tune
    eval_pairs: int = 16  # held-out pairs per source
    points: int = 5  # alphas on each path and barrier
    lr: float = 5e-5
    seq_len: int = 32
    batch_size: int = 16
    methods: tuple[str, ...] = ("linear", "task_arithmetic", "ties")


FULL = Settings()
QUICK = Settings(steps=4, eval_pairs=8, points=3, methods=("linear", "task_arithmetic"))


# --- data -------------------------------------------------------------------------------------------------------
def sentences(text: str, min_words: int = 6) -> list[str]:
    """Sentences of `text` (split after . ! ?), whitespace collapsed; lines of tables and short fragments dropped."""
    out = []
    for raw in re.split(r"(?<=[.!?])\s+", text):
        s = " ".join(raw.split())
        letters = sum(c.isalpha() for c in s)
        if len(s.split()) >= min_words and letters >= 0.6 * len(s) and "===" not in s and ":" not in s[:2]:
            out.append(s)
    return out


def source_a() -> list[str]:
    """Sentences of scikit-learn's bundled dataset descriptions (sorted, unique)."""
    import sklearn.datasets as ds

    return sorted({s for name in DATASETS for s in sentences(getattr(ds, name)().DESCR)})


def _docstrings(module) -> list[str]:
    docs = [module.__doc__ or ""]
    for name in sorted(vars(module)):
        obj = getattr(module, name)
        if not name.startswith("_") and callable(obj) and getattr(obj, "__module__", None) == module.__name__:
            docs.append(obj.__doc__ or "")
    return docs


def source_b() -> list[str]:
    """Sentences of Python standard-library docstrings: the modules' and their public functions' (sorted, unique)."""
    import importlib

    docs = [d for name in MODULES for d in _docstrings(importlib.import_module(name))]
    return sorted({s for d in docs for s in sentences(d)})


def pair(sentence: str) -> dict[str, str]:
    """The contrastive pair of a sentence: its first half of words, and its second half."""
    words = sentence.split()
    half = len(words) // 2
    return {"text": " ".join(words[:half]), "text_pair": " ".join(words[half:])}


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    from merging.io.atomic import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_data(folder: Path, settings: Settings) -> dict[str, Path]:
    """a.jsonl, b.jsonl (training), eval_a.jsonl, eval_b.jsonl and eval.jsonl (held out, both) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    held: list[dict[str, str]] = []
    for key, texts in (("a", source_a()), ("b", source_b())):
        order = list(texts)
        random.Random(SEED).shuffle(order)
        rows = [pair(s) for s in order]
        evals, train = rows[:settings.eval_pairs], rows[settings.eval_pairs:]
        files[key], files[f"eval_{key}"] = folder / f"{key}.jsonl", folder / f"eval_{key}.jsonl"
        _write_jsonl(files[key], train)
        _write_jsonl(files[f"eval_{key}"], evals)
        held += evals
    files["eval"] = folder / "eval.jsonl"
    _write_jsonl(files["eval"], held)
    return files


# --- fine-tunes -------------------------------------------------------------------------------------------------
def fine_tune(base: Path, data: Path, out: Path, settings: Settings) -> Path:
    """`base` fine-tuned with Adam on `data`'s pairs (basin's contrastive objective), saved as a HF folder."""
    import torch

    from evaluations.model_losses import objective_for
    from evaluations.models import load_model
    from evaluations.text_data import load_data

    torch.manual_seed(SEED)
    model = load_model(base)
    batches = load_data(model, data, seq_len=settings.seq_len, batch_size=settings.batch_size, seed=SEED)
    objective = objective_for(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    model.train()
    for step in range(settings.steps):
        loss, _ = objective.batch_loss(model, batches[step % len(batches)])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    save(model, base, out)
    return out


def save(model, base: Path, out: Path) -> None:
    """`model.save_pretrained` into `out` (replaced), with the base's tokenizer files. The buffers save_pretrained
    drops (`embeddings.position_ids`, which the base's file holds) need no copying: the merge planner leaves them
    out (`merging.plan.inputs.drop_recomputed`)."""
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(base / name, out / name)


def evaluate(folder: Path, files: list[Path], settings: Settings) -> list[tuple[float, float]]:
    """(loss, in-batch retrieval accuracy) of the model in `folder` on the pairs of each of `files`."""
    from evaluations.measure import measure_loss
    from evaluations.models import load_model
    from evaluations.text_data import load_data

    model = load_model(folder)
    out = []
    for path in files:
        r = measure_loss(model, load_data(model, path, seq_len=settings.seq_len, batch_size=settings.batch_size,
                                          seed=SEED))
        out.append((r.loss, float(r.accuracy)))
    return out


# --- merges, measured -------------------------------------------------------------------------------------------
def recipes(base: Path, ft_a: Path, ft_b: Path) -> dict[str, dict[str, Any]]:
    """The three merges of the section (mergekit schema)."""
    on_base = {"base_model": str(base), "dtype": "float32"}
    return {
        "linear": {"merge_method": "linear", "dtype": "float32", "models": [
            {"model": str(ft_a), "parameters": {"weight": 0.5}}, {"model": str(ft_b), "parameters": {"weight": 0.5}}]},
        "task_arithmetic": {"merge_method": "task_arithmetic", **on_base, "models": [
            {"model": str(ft_a), "parameters": {"weight": 1.0}}, {"model": str(ft_b), "parameters": {"weight": 1.0}}]},
        "ties": {"merge_method": "ties", **on_base, "models": [
            {"model": str(ft_a), "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": str(ft_b), "parameters": {"weight": 1.0, "density": 0.5}}]},
    }


def measured_merge(recipe: dict[str, Any], out: Path, eval_data: Path, settings: Settings):
    """Merge `recipe` into `out` and measure it as `basin merge --measure` does; (MergeReport, MeasureReport)."""
    from evaluations.merge_report import MeasureSpec, measure, prepare, write_report
    from merging import merge
    from merging.engine import observing
    from merging.merge_stats import MergeStats
    from merging.pipeline import load_recipe

    spec = MeasureSpec.resolve({"data": str(eval_data), "points": settings.points, "seq_len": settings.seq_len,
                                "batch_size": settings.batch_size, "seed": SEED})
    session = prepare(load_recipe(recipe), spec)
    stats = MergeStats(base_ref=session.base_ref)
    with observing(stats.observe):
        report = merge(recipe, out, overwrite=True, progress=False)
    measured, _ = write_report(measure(session, report.out_dir, stats), report.out_dir)
    return report, measured


def _barrier(measured, a: str, b: str) -> float:
    return next(x["loss_barrier"]["value"] for x in measured.barriers if {x["a"], x["b"]} == {a, b})


def _cosine(measured, a: str, b: str) -> dict[str, float]:
    """{"tv cos": cosine of the task vectors of `a` and `b`} from the merge stats; {} when the merge has no base (its
    statistics are then of the weights themselves, not of task vectors)."""
    stats = measured.stats
    labels = stats["inputs"]
    if stats["relative_to"] is None or a not in labels or b not in labels:
        return {}
    value = stats["model"]["cosines"][labels.index(a)][labels.index(b)]
    return {} if value is None else {"tv cos": float(value)}


# --- the section ------------------------------------------------------------------------------------------------
def _model_row(row_type, name: str, folder: Path, files: dict[str, Path], settings: Settings, seconds: float):
    from evaluations.cli.demo import _rss_mb

    start = time.perf_counter()
    (loss, acc), (loss_a, _), (loss_b, _) = evaluate(folder, [files[k] for k in ("eval", "eval_a", "eval_b")],
                                                     settings)
    return row_type("measure", name, seconds + time.perf_counter() - start, _rss_mb(),
                    {"loss": loss, "acc": acc, "loss A": loss_a, "loss B": loss_b})


def measure_section(work: Path, settings: Settings = FULL) -> list:
    """Fine-tune MiniLM on A and on B, merge the two three ways, measure every merge (see the module docstring)."""
    from evaluations.cli.demo import DemoRow, minilm_folder

    base = minilm_folder()
    files = write_data(work / FOLDERS[0], settings)
    rows = [_model_row(DemoRow, "base", base, files, settings, 0.0)]
    tuned = {}
    for key in ("a", "b"):
        start = time.perf_counter()
        tuned[key] = fine_tune(base, files[key], work / f"ft_{key}", settings)
        rows.append(_model_row(DemoRow, f"ft_{key} ({settings.steps} steps)", tuned[key], files, settings,
                               time.perf_counter() - start))
    a, b = str(tuned["a"]), str(tuned["b"])
    for method, recipe in recipes(base, tuned["a"], tuned["b"]).items():
        if method not in settings.methods:
            continue
        start = time.perf_counter()
        report, measured = measured_merge(recipe, work / f"measure-{method}", files["eval"], settings)
        merged = measured.losses["merge"]
        rows.append(DemoRow("measure", method, time.perf_counter() - start, report.peak_rss_mb,
                            {"loss": merged["loss"], "acc": merged["accuracy"], "barrier": _barrier(measured, a, b),
                             **_cosine(measured, a, b)}, "measure.json"))
    return rows
