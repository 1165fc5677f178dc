"""argparse types shared by every `basin` command: numbers are finite and in range before any work starts.

A bad value is an argparse error, which `basin` prints as one line with exit status 2.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable

MAX_SEED = 2**63 - 1  # torch.Generator and numpy's default_rng both take any seed in [0, 2**63)


def _bounds(lo: float | None, hi: float | None) -> str:
    if hi is None:
        return f">= {lo:g}"
    if lo is None:
        return f"<= {hi:g}"
    return f"in [{lo:g}, {hi:g}]"


def int_range(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [lo, hi] (either bound may be None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be an integer {_bounds(lo, hi)}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def float_range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float in [lo, hi] ((lo, hi] with `lo_open`); NaN and infinities are refused."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        below = lo is not None and (value <= lo if lo_open else value < lo)
        if below or (hi is not None and value > hi):
            where = f"in ({lo:g}, {hi:g}]" if lo_open and hi is not None else (
                f"> {lo:g}" if lo_open else _bounds(lo, hi))
            raise argparse.ArgumentTypeError(f"must be {where}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def int_list(lo: int = 1, hi: int | None = None, min_len: int = 1) -> Callable[[str], list[int]]:
    """An argparse type: comma-separated integers, each in [lo, hi], at least `min_len` of them."""
    one = int_range(lo, hi)

    def parse(text: str) -> list[int]:
        parts = [p.strip() for p in text.split(",")]
        values = [one(p) for p in parts]
        if len(values) < min_len:
            raise argparse.ArgumentTypeError(f"expected at least {min_len} comma-separated integers, got {text!r}")
        return values

    parse.__name__ = "integer list"
    return parse


positive_int = int_range(1)
nonnegative_int = int_range(0)
seed = int_range(0, MAX_SEED)


# A landscape/path point costs about this much memory end to end (float64 results, their JSON, the plots):
# `basin landscape` peak RSS grew by ~0.8 KB per 2-D grid point (grid 50 -> 400, a tiny MLP).
BYTES_PER_POINT = 1024
MEMORY_FRACTION = 0.5  # refuse a grid whose estimate is above this fraction of physical memory


def memory_budget() -> int:
    """Bytes a grid of points may use: MEMORY_FRACTION of physical memory (of 8 GiB when unknown)."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        total = 8 * 2**30
    return int(total * MEMORY_FRACTION)


def grid_size(dims: int, lo: int = 2) -> Callable[[str], int]:
    """An argparse type: points per axis of a `dims`-D grid, >= lo, refused when points**dims x BYTES_PER_POINT
    is above `memory_budget()`."""
    count = int_range(lo)

    def parse(text: str) -> int:
        value = count(text)
        need = value**dims * BYTES_PER_POINT
        budget = memory_budget()
        if need > budget:
            raise argparse.ArgumentTypeError(
                f"{value}{'^2' if dims == 2 else ''} points need about {need / 2**30:.3g} GiB, over the budget of "
                f"{budget / 2**30:.3g} GiB ({MEMORY_FRACTION:g} of physical memory)")
        return value

    parse.__name__ = "grid size"
    return parse
