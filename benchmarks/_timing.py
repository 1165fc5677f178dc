"""In-process timing for the per-tensor benchmarks (knots_time, method_time): the best of a few runs."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_of(fn: Callable[[], object], repeats: int, enough_seconds: float = float("inf")) -> dict:
    """The run of `fn` with the fewest CPU seconds of this process (less sensitive to other processes than wall
    time) among `repeats`, as {"cpu_seconds", "wall_seconds"}; stops after a first run over `enough_seconds` wall."""
    best = None
    for i in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        fn()
        run = {"cpu_seconds": round(time.process_time() - cpu, 4), "wall_seconds": round(time.perf_counter() - wall, 4)}
        best = run if best is None or run["cpu_seconds"] < best["cpu_seconds"] else best
        if i == 0 and run["wall_seconds"] > enough_seconds:
            break
    return best
