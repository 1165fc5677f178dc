"""benchmarks/_timing.best_of: the run with the fewest CPU seconds, and the early stop after a slow first run."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
spec = importlib.util.spec_from_file_location("_timing", BENCHMARKS / "_timing.py")
timing = importlib.util.module_from_spec(spec)
spec.loader.exec_module(timing)


def _burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_best_of_keeps_the_cheapest_run_and_stops_after_a_slow_first_one():
    costs = iter([0.06, 0.01, 0.04])
    calls = []
    best = timing.best_of(lambda: calls.append(_burn(next(costs))), 3)
    assert len(calls) == 3 and set(best) == {"cpu_seconds", "wall_seconds"}
    assert 0.01 <= best["cpu_seconds"] < 0.04  # the second run's, not the first's or the last's
    calls.clear()
    timing.best_of(lambda: calls.append(_burn(0.01)), 3, enough_seconds=0.0)
    assert len(calls) == 1
