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


Layout = list[tuple[str, tuple[int, ...], torch.dtype]]


@dataclass(frozen=True)
class TaskOutputs:
    """Per-task tensors of one tensor name, written beside the merged model (`merging.output.task_files`).

    - `layout(shape, n_models, dtype)`: (key, shape, dtype) of each tensor `compute` returns for an input of that
      shape and output dtype, known before any data is read (the writer plans its file from it);
    - `compute(task_vectors, params, dtype)`: key -> tensor, from the float32 task vectors of one tensor name:
      "task_vector" (the vector the tasks share, in `dtype`), "mask.{t}" (task t's bool mask) and any per-task
      statistics (float64 vectors of n_models entries);
    - `rescale`: True when task t is base + c_t mask_t * task_vector with c_t from the statistics (EMR),
      False when c_t = 1 (TALL masks);
    - `stream(tensors, base, params, dtype)`: the same outputs chunk by chunk, from the flat stored inputs (an
      object like `merging.methods.masks.SideStream`, with the same bits as `compute`); None: `compute` whole.
    """

    layout: Callable[[tuple[int, ...], int, torch.dtype], Layout]
    compute: Callable[[list[torch.Tensor], dict[str, Any], torch.dtype], dict[str, torch.Tensor]]
    rescale: bool = False
    stream: Callable[[list[torch.Tensor], torch.Tensor, dict[str, Any], torch.dtype], Any] | None = None


@dataclass(frozen=True)
class RegisteredMethod:
    """A merge function bound to its taxonomy entry (name, parameters, defaults, ranges) and its capabilities.

    - `elementwise`: output entry j depends only on the inputs' entries j (the engine may merge in chunks);
    - two-phase (`fn` has `prepare` and `apply`, see `merging.methods.chunking`): chunked after a whole-tensor
      pass;
    - `fused(inputs, params[, state])`: the compiled kernel's per-chunk function, or None where it does not apply;
    - `optional_base`: the method uses a recipe's base_model when one is given but does not need one;
    - `task_outputs`: per-task tensors (masks, a task vector) the merge writes beside the merged model, for
      methods whose tasks are rebuilt at inference from the task's identity (`TaskOutputs`);
    - `scaled(tensors, base, params, rng) -> (anchor, delta)`: for methods whose merge is anchor + lambda * delta
      with neither part depending on `params["lambda"]` (`delta` None where lambda is not applied); `fn` computes
      exactly that expression, so a sweep over lambda can compute the parts once
      (`merging.modelwise.state_dicts.scaled_merge`) and get the same bits.
    """

    info: MethodInfo
    fn: MergeFn
    elementwise: bool = False
    fused: Callable[..., Any] | None = None
    optional_base: bool = False
    task_outputs: TaskOutputs | None = None
    scaled: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] | None = None

    @property
    def two_phase(self) -> bool:
        return hasattr(self.fn, "prepare") and hasattr(self.fn, "apply")

    @property
    def chunked(self) -> bool:
        """Whether the method runs on cache-sized chunks (elementwise or two-phase)."""
        return self.elementwise or self.two_phase

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


def merge_method(name: str, *, elementwise: bool = False, fused: Callable[..., Any] | None = None,
                 optional_base: bool = False, task_outputs: TaskOutputs | None = None,
                 scaled: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] | None = None
                 ) -> Callable[[MergeFn], RegisteredMethod]:
    """Bind `fn` to taxonomy entry `name` (which must exist) with its capabilities; `merging.methods.catalog`
    collects the bound methods. A two-phase object's own `fused` method is its kernel."""

    def wrap(fn: MergeFn) -> RegisteredMethod:
        kernel = fused if fused is not None else getattr(fn, "fused", None)
        return RegisteredMethod(get_info(name), fn, elementwise, kernel, optional_base, task_outputs, scaled)

    return wrap


def scaled_sum(parts: tuple[torch.Tensor, torch.Tensor | None], scale: float) -> torch.Tensor:
    """anchor + scale * delta (the anchor itself where delta is None): the one expression every `scaled` method's
    merge ends with."""
    anchor, delta = parts
    return anchor if delta is None else anchor + scale * delta
