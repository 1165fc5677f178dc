"""Run a merge benchmark: reference rows and one row per merge method, cached per cell.

Rows as FusionBench reports them (Tang et al. 2024): the pretrained model, each individual
fine-tune on its own task, the output ensemble of the fine-tunes (mean of their softmax outputs,
each through the task's head), then one row per grid entry. Columns: the tasks' metric, its
average, and the normalized score merged / individual fine-tune per task (Yadav et al. 2023,
TIES-Merging, sec. 6; FusionBench), the merged body's L2 distance from the base, which data the
merge read, and the landscape columns: for the pretrained body and every merge, the loss along the
linear path to each fine-tune and its barrier (`evaluations.bench.geometry.merge_paths`). The pool's
geometry (pairwise barriers among the fine-tunes, distances from the base, task-vector cosines)
comes from `evaluations.bench.geometry`.

Every cell's result is written to `cache_dir/<key>.json` as soon as it finishes; `key` hashes the
suite's data and models, the cell and the seed, so a rerun skips finished cells.

Seeds: `run_seeds` runs a suite built once per seed (a built-in suite trains its fine-tunes with that
seed) and `aggregate` reports each row as the mean over seeds with its standard deviation (ddof 1).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from evaluations.bench.executors import Local, Ray
from evaluations.bench.grid import MethodEntry, MethodGrid, run_merge, run_merges
from evaluations.bench.pools import ModelPool, State, TaskPool
from merging.io.atomic import atomic_write_text
from taxonomy.errors import BasinError

CACHE_VERSION = 4  # 4: a path's end points are the models themselves


@dataclass
class Suite:
    name: str
    models: ModelPool
    tasks: TaskPool
    methods: MethodGrid
    seed: int = 0
    description: str = ""
    path_points: int = 11  # points on each merge -> fine-tune path (landscape columns)

    def __post_init__(self) -> None:
        if sorted(self.models.models) != sorted(self.tasks.names):
            raise BasinError(f"suite {self.name!r}: fine-tunes {sorted(self.models.models)} and tasks "
                             f"{sorted(self.tasks.names)} must match one to one")

    def fingerprint(self) -> str:
        return hashlib.sha256((self.models.fingerprint() + self.tasks.fingerprint()).encode()).hexdigest()


@dataclass(frozen=True)
class Cell:
    """One unit of work: a reference row ('pretrained', 'individual', 'ensemble'), a merge, or 'geometry'."""

    kind: str
    entry: MethodEntry | None = None

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, **(self.entry.describe() if self.entry else {})}


@dataclass
class Row:
    label: str
    kind: str  # reference | merge
    scores: dict[str, float]
    params: dict[str, Any] = field(default_factory=dict)
    selection: list[dict[str, Any]] = field(default_factory=list)  # [{params, val}] when searched
    distance_from_base: float | None = None
    seconds: float = 0.0
    normalized: dict[str, float] = field(default_factory=dict)
    data: str = ""  # which data the row's model read (beyond the weights)
    paths: dict[str, Any] = field(default_factory=dict)  # merge_paths: loss along merged -> each fine-tune
    spread: dict[str, float] = field(default_factory=dict)  # std over seeds: per task, average, normalized
    per_seed: list[dict[str, Any]] = field(default_factory=list)

    @property
    def barrier(self) -> float | None:
        """Mean over tasks of the loss barrier from this row's body to each fine-tune."""
        bars = self.paths.get("barrier")
        return sum(bars.values()) / len(bars) if bars else None

    @property
    def average(self) -> float:
        return sum(self.scores.values()) / len(self.scores)

    @property
    def normalized_average(self) -> float | None:
        return sum(self.normalized.values()) / len(self.normalized) if self.normalized else None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "average": self.average, "normalized_average": self.normalized_average,
                "barrier_to_finetunes": self.barrier}


@dataclass
class BenchmarkResult:
    suite: str
    tasks: list[str]
    rows: list[Row]
    geometry: dict[str, Any]
    seed: int
    executor: str
    wall_seconds: float
    cached_cells: int
    environment: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=list)

    def row(self, label: str) -> Row:
        for r in self.rows:
            if r.label == label:
                return r
        raise KeyError(label)

    def to_json(self) -> dict[str, Any]:
        return {"suite": self.suite, "tasks": self.tasks, "rows": [r.to_json() for r in self.rows],
                "geometry": self.geometry, "seed": self.seed, "executor": self.executor,
                "wall_seconds": self.wall_seconds, "cached_cells": self.cached_cells, "environment": self.environment,
                "seeds": self.seeds or [self.seed]}

    def table_rows(self) -> list[list[str]]:
        from evaluations.bench.report import table_rows

        return table_rows(self)

    def to_markdown(self) -> str:
        from evaluations.bench.report import to_markdown

        return to_markdown(self)

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["label", "kind", *self.tasks, "average", *(f"normalized_{t}" for t in self.tasks),
                    "normalized_average", "distance_from_base", "params", "seconds"])
        for r in self.rows:
            w.writerow([r.label, r.kind, *(r.scores[t] for t in self.tasks), r.average,
                        *(r.normalized.get(t, "") for t in self.tasks),
                        "" if r.normalized_average is None else r.normalized_average,
                        "" if r.distance_from_base is None else r.distance_from_base,
                        json.dumps(r.params), r.seconds])
        return buf.getvalue()

    def save(self, out_dir: str | Path, stem: str = "bench", plots: bool = True) -> list[Path]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / f"{stem}.md", out / f"{stem}.json", out / f"{stem}.csv"]
        for path, text in zip(paths, (self.to_markdown(), json.dumps(self.to_json(), indent=2) + "\n", self.to_csv())):
            atomic_write_text(path, text)
        if plots:
            from evaluations.bench.plots import save_plots

            paths += save_plots(self, out, stem)
        return paths


def _cell_key(suite_fp: str, cell: Cell, seed: int) -> str:
    blob = json.dumps({"v": CACHE_VERSION, "suite": suite_fp, "cell": cell.describe(), "seed": seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in a if a[k].is_floating_point()))


@torch.no_grad()
def _ensemble(suite: Suite) -> dict[str, float]:
    bodies = [suite.models.module(s) for s in suite.models.models.values()]
    out = {}
    for task in suite.tasks.tasks:
        probs = torch.stack([task.logits(b).softmax(-1) for b in bodies]).mean(0)
        out[task.name] = float(task.metric(probs.log(), task.test[1]))
    return out


def run_cell(suite: Suite, cell: Cell, threads: int = 1) -> dict[str, Any]:
    """Compute one cell; one intra-op thread so results do not depend on where the cell runs."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        out = _compute(suite, cell)
    finally:
        torch.set_num_threads(old)
    out["seconds"] = time.perf_counter() - start
    return out


def _compute(suite: Suite, cell: Cell) -> dict[str, Any]:
    pool, tasks = suite.models, suite.tasks
    from evaluations.bench.geometry import evaluate_with_values, merge_paths

    if cell.kind == "pretrained":
        scores, values = evaluate_with_values(pool, tasks, pool.base)
        return {"label": "pretrained", "kind": "reference", "scores": scores, "distance_from_base": 0.0,
                "data": "none", "paths": merge_paths(pool, tasks, pool.base, suite.path_points, values)}
    if cell.kind == "individual":
        scores = {t: tasks[t].score(pool.module(s)) for t, s in pool.models.items()}
        return {"label": "individual fine-tunes", "kind": "reference", "scores": scores,
                "data": "each task's train split (fine-tuning)"}
    if cell.kind == "ensemble":
        return {"label": "output ensemble", "kind": "reference", "scores": _ensemble(suite),
                "data": "none (every fine-tune run, task identity for heads)"}
    if cell.kind == "geometry":
        from evaluations.bench.geometry import pool_geometry

        return {"geometry": pool_geometry(pool, tasks, suite.path_points)}
    if cell.kind != "merge" or cell.entry is None:
        raise BasinError(f"unknown cell kind {cell.kind!r}")
    return _merge_cell(suite, cell.entry)


def _select(suite: Suite, entry: MethodEntry) -> tuple[dict[str, Any], list[dict[str, Any]], State | None]:
    """The candidate with the best mean validation metric (first best on ties), every candidate's score, and the
    best candidate's merged state (None when there was a single candidate, nothing merged yet)."""
    pool, tasks = suite.models, suite.tasks
    candidates = entry.candidates()
    if len(candidates) == 1:
        return candidates[0], [], None
    selection: list[dict[str, Any]] = []
    best, best_val, best_state = candidates[0], -math.inf, None
    for params, merged in zip(candidates, run_merges(entry.method, pool, tasks, candidates, suite.seed)):
        val = tasks.evaluate(pool.module(merged), "val")
        score = sum(val.values()) / len(val)
        selection.append({"params": params, "val": score})
        if score > best_val:
            best, best_val, best_state = params, score, merged
    return best, selection, best_state


def _merge_cell(suite: Suite, entry: MethodEntry) -> dict[str, Any]:
    from evaluations.bench.geometry import evaluate_with_values, merge_paths
    from evaluations.bench.grid import data_used

    pool, tasks = suite.models, suite.tasks
    best, selection, merged = _select(suite, entry)
    if merged is None:
        merged = run_merge(entry.method, pool, tasks, dict(best), suite.seed)
    scores, values = evaluate_with_values(pool, tasks, merged)
    return {"label": entry.label, "kind": "merge", "scores": scores, "params": dict(best), "selection": selection,
            "distance_from_base": _distance(merged, pool.base), "data": data_used(entry),
            "paths": merge_paths(pool, tasks, merged, suite.path_points, values)}


def plan_cells(suite: Suite, geometry: bool = True) -> list[Cell]:
    cells = [Cell("pretrained"), Cell("individual"), Cell("ensemble")]
    cells += [Cell("merge", e) for e in suite.methods.entries]
    return cells + ([Cell("geometry")] if geometry else [])


def plan(suite: Suite, methods: Sequence[str] | None = None, geometry: bool = True
         ) -> tuple[Suite, list[Cell], list[str]]:
    """The suite narrowed to `methods`, its cells and each cell's cache key."""
    suite = Suite(suite.name, suite.models, suite.tasks, suite.methods.select(methods), suite.seed, suite.description,
                  suite.path_points)
    cells = plan_cells(suite, geometry)
    fp = suite.fingerprint()
    return suite, cells, [_cell_key(fp, c, suite.seed) for c in cells]


def cached_cells(cache: Path | None, keys: Sequence[str]) -> dict[int, dict[str, Any]]:
    """The cells already in `cache` (index -> result)."""
    if cache is None:
        return {}
    cache.mkdir(parents=True, exist_ok=True)
    return {i: json.loads((cache / f"{k}.json").read_text()) for i, k in enumerate(keys)
            if (cache / f"{k}.json").is_file()}


def store_cell(cache: Path | None, key: str, out: dict[str, Any]) -> dict[str, Any]:
    """A finished cell in its cached form (so fresh and resumed runs are identical), written to `cache`."""
    out = json.loads(json.dumps(out))
    if cache is not None:
        atomic_write_text(cache / f"{key}.json", json.dumps(out))
    return out


def run_benchmark(suite: Suite, executor: Local | Ray | None = None, cache_dir: str | Path | None = None,
                  methods: Sequence[str] | None = None, geometry: bool = True, progress: bool = True
                  ) -> BenchmarkResult:
    """Run every cell of `suite` (the grid narrowed to `methods`), reusing cells cached in `cache_dir`."""
    executor = executor or Local()
    start = time.perf_counter()
    suite, cells, keys = plan(suite, methods, geometry)
    cache = Path(cache_dir) if cache_dir is not None else None
    results = cached_cells(cache, keys)
    cached = len(results)
    todo = [i for i in range(len(cells)) if i not in results]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(cells), initial=cached, desc=f"bench {suite.name}", unit="cell")
    try:
        for j, out in executor.map(run_cell, suite, [cells[i] for i in todo]):
            i = todo[j]
            results[i] = store_cell(cache, keys[i], out)
            if bar is not None:
                bar.set_postfix_str(cell_label(cells[i]))
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return assemble(suite.name, suite.tasks.names, suite.seed, cells, results, cached, executor.name,
                    time.perf_counter() - start)


def cell_label(cell: Cell) -> str:
    return cell.entry.label if cell.entry else cell.kind


def assemble(suite: str, tasks: Sequence[str], seed: int, cells: Sequence[Cell], results: Mapping[int, dict[str, Any]],
             cached: int, executor: str, seconds: float) -> BenchmarkResult:
    """The result of suite `suite` (its task names, training seed) from every cell's output (rows in the cells'
    order, normalized by the fine-tunes)."""
    rows, geo = [], {}
    for i, cell in enumerate(cells):
        out = results[i]
        if cell.kind == "geometry":
            geo = out["geometry"]
            continue
        rows.append(Row(out["label"], out["kind"], out["scores"], out.get("params", {}), out.get("selection", []),
                        out.get("distance_from_base"), out["seconds"], data=out.get("data", ""),
                        paths=out.get("paths", {})))
    individual = next(r for r in rows if r.label == "individual fine-tunes")
    for r in rows:
        if r is not individual:
            r.normalized = {t: r.scores[t] / individual.scores[t] if individual.scores[t] else math.nan
                            for t in individual.scores}
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "cpus_torch_threads": torch.get_num_threads()}
    return BenchmarkResult(suite, list(tasks), rows, geo, seed, executor, seconds, cached, env, [seed])


def run_seeds(build: Callable[[int], Suite], seeds: Sequence[int], executor: Local | Ray | None = None,
              cache_dir: str | Path | None = None, methods: Sequence[str] | None = None, geometry: bool = True,
              progress: bool = True) -> BenchmarkResult:
    """`run_benchmark` on `build(seed)` for every seed, aggregated (mean and std over seeds per row)."""
    from evaluations.bench.report import aggregate

    if not seeds or len(set(seeds)) != len(seeds):
        raise BasinError(f"--seeds: give distinct seeds, got {list(seeds)}")
    if isinstance(executor, Local) and executor.workers > 1:
        from evaluations.bench.parallel import run_seeds_on_workers

        results, seconds, prepared = run_seeds_on_workers(build, seeds, executor.workers, cache_dir, methods, geometry,
                                                          progress)
        result = aggregate(results)
        result.wall_seconds = seconds  # the seeds overlap: the whole run's wall time, not their sum
        result.environment.update(suite_seconds=prepared, workers=executor.workers)
        return result
    results = []
    for seed in seeds:
        start = time.perf_counter()
        suite = build(seed)
        prepared = time.perf_counter() - start
        result = run_benchmark(suite, executor, cache_dir, methods, geometry, progress)
        result.environment["suite_seconds"] = prepared
        results.append(result)
    return aggregate(results)
