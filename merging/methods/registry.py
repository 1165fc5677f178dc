"""Binds merge functions to their taxonomy entries.

A tensorwise merge method is a pure function over one tensor name's inputs:

    fn(tensors: list[Tensor], base: Tensor | None, params: dict[str, Any], rng: torch.Generator) -> Tensor

- `tensors`: the non-base inputs, float32, on the compute device. For methods with
  `needs_base=True` the base is passed separately and is NOT in `tensors`; for methods without
  a base, the base model (when a recipe names one and lists it under `models:`) is simply one
  of `tensors`, and `base` is still passed for methods that can use it optionally.
- `params`: global parameters as scalars, per-model parameters (`Param.per_model`) as lists
  aligned with `tensors`; every parameter of the taxonomy entry is present (defaults filled).
  Gradients and filters are already resolved for this tensor by the engine.
- `rng`: a CPU generator seeded from the recipe seed and the tensor name; draw with
  `torch.rand(shape, generator=rng)` and move to the tensors' device.
Returns a float32 tensor of the inputs' shape. No I/O, no global state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from taxonomy import MethodInfo
from taxonomy import get as get_info

MergeFn = Callable[[list[torch.Tensor], "torch.Tensor | None", dict[str, Any], torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class RegisteredMethod:
    info: MethodInfo
    fn: MergeFn

    def __call__(
        self,
        tensors: list[torch.Tensor],
        base: torch.Tensor | None = None,
        params: dict[str, Any] | None = None,
        rng: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Call with defaults filled in; convenient in tests and notebooks."""
        full = self.info.defaults()
        full.update(params or {})
        for p in self.info.params:
            if p.per_model and not isinstance(full[p.name], (list, tuple)):
                full[p.name] = [full[p.name]] * len(tensors)
        if rng is None:
            rng = torch.Generator().manual_seed(0)
        return self.fn(tensors, base, full, rng)


_METHODS: dict[str, RegisteredMethod] = {}


def merge_method(name: str) -> Callable[[MergeFn], MergeFn]:
    """Register `fn` as the implementation of taxonomy entry `name` (which must exist)."""

    def wrap(fn: MergeFn) -> MergeFn:
        info = get_info(name)
        if info.name in _METHODS:
            raise RuntimeError(f"merge method {name!r} implemented twice")
        _METHODS[info.name] = RegisteredMethod(info, fn)
        return fn

    return wrap


def get_method(name: str) -> RegisteredMethod:
    from merging.methods import load_all

    load_all()
    info = get_info(name)  # raises BasinError for unknown names
    try:
        return _METHODS[info.name]
    except KeyError:
        from taxonomy import BasinError

        raise BasinError(f"method {name!r} is in the taxonomy but is not a tensorwise merge method") from None


def registered_names() -> list[str]:
    from merging.methods import load_all

    load_all()
    return sorted(_METHODS)
