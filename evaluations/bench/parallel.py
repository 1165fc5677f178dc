"""A built-in suite's seeds on worker processes: each seed's training (`build(seed)`) and then each of its cells
is a job for a pool of spawned processes, so on N cores N jobs run at once and one seed's cells run while another
seed trains. Every job runs on one intra-op thread, as `harness.run_cell` always does, so the results are the bytes
a sequential run gives; the parent caches each cell as it arrives (an interrupted run keeps what finished).

`build` must be picklable (e.g. `evaluations.bench.suites.BuiltinSuite`): only the workers call it, and each keeps
the last suites it built, so it runs a seed's cells without rebuilding it; the parent gets each seed's cells and
cache keys from the worker that built it.
"""

from __future__ import annotations

import multiprocessing
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evaluations.bench import harness
from evaluations.bench.harness import BenchmarkResult, Cell, Suite

KEEP_SUITES = 2  # suites a worker keeps built (the MiniLM suite: ~0.5 GB each)
_built: OrderedDict[int, tuple[Suite, list[Cell], list[str]]] = OrderedDict()


def _start_worker() -> None:
    torch.set_num_threads(1)


def _suite(build: Callable[[int], Suite], seed: int, methods: Sequence[str] | None,
           geometry: bool) -> tuple[Suite, list[Cell], list[str]]:
    if seed not in _built:
        _built[seed] = harness.plan(build(seed), methods, geometry)
        while len(_built) > KEEP_SUITES:
            _built.popitem(last=False)
    _built.move_to_end(seed)
    return _built[seed]


@dataclass(frozen=True)
class Outline:
    """What the parent needs of a seed's suite: its name, task names, cells and their cache keys."""

    suite: str
    tasks: list[str]
    cells: list[Cell]
    keys: list[str]


def _prepare(build: Callable[[int], Suite], seed: int, methods: Sequence[str] | None, geometry: bool) -> Outline:
    """Build (train, when not cached) `seed`'s suite in this worker; its outline."""
    suite, cells, keys = _suite(build, seed, methods, geometry)
    return Outline(suite.name, list(suite.tasks.names), cells, keys)


def _cell(build: Callable[[int], Suite], seed: int, methods: Sequence[str] | None, geometry: bool,
          index: int) -> dict[str, Any]:
    suite, cells, _ = _suite(build, seed, methods, geometry)
    return harness.run_cell(suite, cells[index])


def run_seeds_on_workers(build: Callable[[int], Suite], seeds: Sequence[int], workers: int,
                         cache_dir: str | Path | None = None, methods: Sequence[str] | None = None,
                         geometry: bool = True, progress: bool = True) -> tuple[list[BenchmarkResult], float, float]:
    """Each seed's result (in `seeds`' order), the run's wall seconds and the seconds until the last suite was
    built."""
    start = time.perf_counter()
    cache = Path(cache_dir) if cache_dir is not None else None
    planned: dict[int, Outline] = {}
    results: dict[int, dict[int, dict[str, Any]]] = {}
    cached: dict[int, int] = {}
    seconds: dict[int, float] = {}
    prepared = 0.0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=0, desc="bench (seeds' training)", unit="cell")
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker)
    jobs: dict[Future, tuple[int, int | None]] = {}
    try:
        for seed in seeds:
            jobs[pool.submit(_prepare, build, seed, methods, geometry)] = (seed, None)
        while jobs:
            done, _ = wait(jobs, return_when=FIRST_COMPLETED)
            for job in sorted(done, key=lambda j: jobs[j][0]):
                seed, index = jobs.pop(job)
                out = job.result()
                if index is None:
                    prepared = time.perf_counter() - start
                    planned[seed] = out
                    results[seed] = harness.cached_cells(cache, out.keys)
                    cached[seed] = len(results[seed])
                    seconds[seed] = time.perf_counter()
                    for i in range(len(out.cells)):
                        if i not in results[seed]:
                            jobs[pool.submit(_cell, build, seed, methods, geometry, i)] = (seed, i)
                    if bar is not None:
                        bar.total += len(out.cells)
                        bar.update(cached[seed])
                else:
                    outline = planned[seed]
                    results[seed][index] = harness.store_cell(cache, outline.keys[index], out)
                    if bar is not None:
                        bar.set_description_str(f"bench {outline.suite}")
                        bar.set_postfix_str(f"seed {seed}, {harness.cell_label(outline.cells[index])}")
                        bar.update(1)
                if seed in planned and len(results[seed]) == len(planned[seed].cells):
                    seconds[seed] = time.perf_counter() - seconds[seed]
    except BaseException:
        running = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in running:  # a running cell would go on for minutes
            process.terminate()
        raise
    finally:
        if bar is not None:
            bar.close()
    pool.shutdown()
    out = [harness.assemble(planned[s].suite, planned[s].tasks, s, planned[s].cells, results[s], cached[s], "local",
                            seconds[s]) for s in seeds]
    return out, time.perf_counter() - start, prepared
