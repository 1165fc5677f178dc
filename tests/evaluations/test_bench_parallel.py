"""`run_seeds` on worker processes: the same results as one process, cells cached as they arrive, errors raised."""

from __future__ import annotations

import json

import pytest
import torch

from evaluations.bench import MethodEntry, MethodGrid
from evaluations.bench.executors import Local, make_executor
from evaluations.bench.harness import run_seeds
from evaluations.bench.suites.digits_tasks import DigitsConfig, build_suite
from taxonomy.errors import BasinError

TINY = DigitsConfig(width=16, pretrain_epochs=2, probe_epochs=1, finetune_epochs=2, merge_sample=64,
                    tasks=("rot90", "invert"))
GRID = MethodGrid((
    MethodEntry("TA", "task_arithmetic", search={"lambda": [0.5, 1.0]}),
    MethodEntry("TIES", "ties", {"density": 0.5}),
))


class TinySeeds:
    """A picklable `build(seed)`: the tiny digits suite trained with `seed` (workers import this module)."""

    def __init__(self, cache):
        self.cache = str(cache)

    def __call__(self, seed: int):
        return build_suite(cache_dir=self.cache, config=TINY, grid=GRID, seed=seed)


def comparable(result) -> dict:
    """The result's JSON without timings and cache counts (which differ between runs by design)."""
    def strip(d):
        if isinstance(d, dict):
            return {k: strip(v) for k, v in d.items()
                    if k not in ("seconds", "wall_seconds", "cached_cells", "environment")}
        return [strip(x) for x in d] if isinstance(d, list) else d
    return strip(json.loads(json.dumps(result.to_json())))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tmp_path_factory.mktemp("parallel-models")


def test_workers_give_the_bytes_of_one_process_and_cache_every_cell(tmp_path, models):
    seeds = [0, 1]
    parallel = run_seeds(TinySeeds(models), seeds, Local(workers=2), tmp_path / "cells-p",
                         progress=False)
    # the fine-tunes the workers trained, every cell again in this process
    sequential = run_seeds(TinySeeds(models), seeds, Local(), tmp_path / "cells-s", progress=False)
    assert comparable(parallel) == comparable(sequential)
    assert parallel.seeds == seeds and parallel.environment["workers"] == 2
    assert sorted(p.name for p in (tmp_path / "cells-p").iterdir()) == \
        sorted(p.name for p in (tmp_path / "cells-s").iterdir())
    assert parallel.cached_cells == 0 and sequential.cached_cells == 0
    # a rerun reads every cell from the cache
    again = run_seeds(TinySeeds(models), seeds, Local(workers=2), tmp_path / "cells-p", progress=False)
    assert again.cached_cells == sum(1 for _ in (tmp_path / "cells-p").iterdir())
    assert comparable(again) == comparable(parallel)


def test_a_fine_tune_trained_by_a_worker_is_the_one_this_process_trains(tmp_path, models):
    from safetensors.torch import load_file

    TinySeeds(tmp_path)(1)
    here = next(tmp_path.glob("*/rot90.safetensors"))
    there = models / here.parent.name / "rot90.safetensors"  # the same configuration key (seed 1)
    a, b = load_file(str(here)), load_file(str(there))
    # the same training; this process may run more intra-op threads than a worker, whose float32 sums then round
    # differently on some CPUs (seen on AVX2), so equal up to that rounding
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_an_error_in_a_worker_reaches_the_caller(tmp_path, models):
    with pytest.raises(BasinError, match="nosuch"):
        run_seeds(TinySeeds(models), [0, 1], Local(workers=2), tmp_path / "cells", methods=["nosuch"],
                  progress=False)


def test_workers_must_be_positive(tmp_path, capsys):
    from evaluations.cli import main

    with pytest.raises(BasinError, match="--workers"):
        make_executor("local", workers=0)
    out = tmp_path / "out"
    assert main(["bench", "digits-tasks", "--workers", "0", "--out", str(out), "--cache", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--workers" in err
    assert not out.exists() and not (tmp_path / "c").exists()
