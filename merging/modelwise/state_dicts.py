"""Tensorwise methods over in-memory state dicts (small models, notebooks), bit-identical to a streamed merge."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from merging.methods.apply import full_params, merge_tensor
from merging.methods.catalog import get_method
from taxonomy.errors import BasinError


def merge_state_dicts(
    method: str,
    models: Sequence[Mapping[str, torch.Tensor]],
    base: Mapping[str, torch.Tensor] | None = None,
    params: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Merge in-memory state dicts with a registered tensorwise method (small models, notebooks).

    `models` excludes the base for methods that need one; per-model parameters are lists aligned
    with `models` or scalars.
    """
    m = get_method(method)
    if m.info.needs_base and base is None:
        raise BasinError(f"method {method!r} needs a base model")
    problem = m.info.model_count_problem(len(models))
    if problem:
        raise BasinError(f"method {problem}")
    resolved = full_params(m, params, len(models))
    names = list(models[0].keys())
    for i, sd in enumerate(models[1:], start=1):
        if set(sd) != set(names):
            missing = sorted(set(names) - set(sd))[:5]
            extra = sorted(set(sd) - set(names))[:5]
            raise BasinError(f"model {i} tensor names differ from model 0: missing {missing}, extra {extra}")
    if base is not None and set(base) != set(names):
        lacks = sorted(set(names) - set(base))[:5]
        extra = sorted(set(base) - set(names))[:5]
        raise BasinError(f"base tensor names differ from the models': base lacks {lacks}, models lack {extra}")
    return {
        name: merge_tensor(m, name, [sd[name] for sd in models], None if base is None else base[name], resolved, seed)
        for name in names
    }
