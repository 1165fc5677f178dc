"""The one result protocol of `evaluations/`: every result is a dataclass with `to_json()`, built on this module.

Array convention: a result's arrays are numpy float64 (`as_float64`, applied when the result is built: the
landscape results' and `evaluations.probes.result.ProbeResult`'s `__post_init__`), for JSON and plotting; tensors
stay inside the algorithms, and a caller that needs one converts at the use site (`torch.from_numpy`).
`jsonable` is the one conversion to JSON values (tensors and arrays as nested lists, numpy scalars as Python
numbers, nested results through their own `to_json`), and `fields_json` a dataclass's fields through it, so a
result's `to_json` only adds what is derived (e.g. `error = 1 - accuracy`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


def as_float64(value: Any) -> np.ndarray:
    """`value` (a tensor, array, list or number) as a numpy float64 array (a tensor is detached and moved to CPU)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)


def jsonable(value: Any) -> Any:
    """A JSON-ready copy of `value`: tensors and arrays as (nested) lists, numpy scalars as Python numbers,
    objects with `to_json` through it, dicts and sequences element-wise, everything else as it is."""
    if hasattr(value, "detach") and hasattr(value, "tolist"):  # a torch.Tensor, without importing torch here
        return value.detach().cpu().tolist()
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    if hasattr(value, "to_json") and not isinstance(value, type):
        return value.to_json()
    if isinstance(value, dict):
        return {key: jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(item) for item in value]
    return value


def fields_json(obj: Any, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every dataclass field of `obj` not in `exclude`, through `jsonable`."""
    return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name not in exclude}
