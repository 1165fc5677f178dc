"""Tensorwise methods over in-memory state dicts (small models, notebooks), bit-identical to a streamed merge."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from merging.methods.apply import full_params, merge_tensor, merge_tensor_parts
from merging.methods.catalog import get_method
from merging.methods.registry import RegisteredMethod, scaled_sum
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
    resolved, names = _checked(method, m, models, base, params)
    return {
        name: merge_tensor(m, name, [sd[name] for sd in models], None if base is None else base[name], resolved, seed)
        for name in names
    }


def _checked(method: str, m: RegisteredMethod, models: Sequence[Mapping[str, torch.Tensor]],
             base: Mapping[str, torch.Tensor] | None, params: Mapping[str, Any] | None
             ) -> tuple[dict[str, Any], list[str]]:
    """The resolved parameters and the tensor names, after checking the models and the base agree."""
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
    return resolved, names


class ScaledMerge:
    """A merge anchor + lambda * delta (TSV-M, Iso-C, Iso-CTS, CART: the methods with `scaled` parts) with its
    parts computed once: `at(lambda)` is `merge_state_dicts(method, ..., params | {"lambda": lambda})`, bit for
    bit, without recomputing the SVDs for every lambda of a sweep."""

    def __init__(self, method: str, models: Sequence[Mapping[str, torch.Tensor]],
                 base: Mapping[str, torch.Tensor] | None = None, params: Mapping[str, Any] | None = None,
                 seed: int = 0) -> None:
        m = get_method(method)
        if m.scaled is None:
            raise BasinError(f"method {method!r}: its merge is not base + lambda * delta (no lambda-free parts)")
        self.method, self.params, self.n_models = m, dict(params or {}), len(models)
        resolved, names = _checked(method, m, models, base, params)
        self.dtypes = {name: models[0][name].dtype for name in names}
        self.parts = {name: merge_tensor_parts(m, name, [sd[name] for sd in models],
                                               None if base is None else base[name], resolved, seed)
                      for name in names}

    def at(self, scale: float) -> dict[str, torch.Tensor]:
        """The merged state dict with lambda = `scale` (checked against the method's range)."""
        lam = full_params(self.method, {**self.params, "lambda": scale}, self.n_models)["lambda"]
        return {name: (part.clone() if isinstance(part, torch.Tensor) else scaled_sum(part, lam).to(self.dtypes[name]))
                for name, part in self.parts.items()}


def scaled_merge(method: str, models: Sequence[Mapping[str, torch.Tensor]],
                 base: Mapping[str, torch.Tensor] | None = None, params: Mapping[str, Any] | None = None,
                 seed: int = 0) -> ScaledMerge:
    """`ScaledMerge`: a lambda sweep of `method` with the lambda-free parts computed once."""
    return ScaledMerge(method, models, base, params, seed)
