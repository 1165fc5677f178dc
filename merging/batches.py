"""Data given as tensors, in one place: `(x, y)` pairs (or an iterable of them, e.g. a DataLoader) as a list
of batches, and model inputs (a tensor, a dict of keyword tensors, `(x, y, ...)`, or an iterable of those) as
positional and keyword arguments. Used by alignment, the model-level merges, the landscape and the probes."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from taxonomy.errors import DataError


def _is_pair(data: Any) -> bool:
    return isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)


def batch_list(data: Any, batch_size: int | None = None, generator: torch.Generator | None = None) -> list:
    """`(x, y)` tensors as one batch, or split into batches of `batch_size` rows (in order, or shuffled by
    `generator`); an iterable of batches (pairs, tuples, dicts of tensors) as a list, each batch unchanged
    (lists become tuples)."""
    if _is_pair(data):
        x, y = data
        if len(x) != len(y):
            raise DataError(f"data: x has {len(x)} rows but y has {len(y)}")
        if batch_size is None or (batch_size >= len(x) and generator is None):
            return [(x, y)]
        if generator is None:
            return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        order = torch.randperm(len(x), generator=generator)
        return [(x[order[i : i + batch_size]], y[order[i : i + batch_size]]) for i in range(0, len(x), batch_size)]
    if isinstance(data, Iterable) and not isinstance(data, (torch.Tensor, str, bytes, dict)):
        out = [tuple(b) if isinstance(b, list) else b for b in data]
        if not out:
            raise DataError("data: no batches")
        return out
    raise DataError(f"data: expected (x, y) tensors or an iterable of batches, got {type(data).__name__}")


def xy_batches(data: Any, batch_size: int | None = None, generator: torch.Generator | None = None
               ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`batch_list`, each batch an `(x, y, ...)` tuple cut to its `(x, y)`."""
    out = []
    for batch in batch_list(data, batch_size, generator):
        if not (isinstance(batch, tuple) and len(batch) >= 2):
            raise DataError("data: each batch must be an (x, y) pair")
        out.append((batch[0], batch[1]))
    return out


def input_batches(data: Any) -> Iterator[tuple[tuple, dict]]:
    """(positional, keyword) model inputs from a tensor, a dict of tensors, a tuple `(x, y, ...)` whose first
    item is the input, or an iterable of those."""
    if isinstance(data, torch.Tensor):
        yield (data,), {}
    elif isinstance(data, dict):
        yield (), dict(data)
    elif isinstance(data, tuple) and data and isinstance(data[0], torch.Tensor):
        yield (data[0],), {}
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
        for item in data:
            yield from input_batches(item)
    else:
        raise DataError(f"data: expected a tensor, a dict, an (x, y) tuple or an iterable of batches, "
                        f"got {type(data).__name__}")
