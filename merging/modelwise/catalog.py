"""The model-level merges by name, with their taxonomy entries' parameters (defaults and ranges are written
only there): `merge_models("fisher", modules, data, {"eps": 1e-6})`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from merging.modelwise.data_aware import fisher_merge, regmean_merge
from taxonomy import get as get_info
from taxonomy.errors import BasinError


def _fisher(models: Sequence[nn.Module], data: Any, params: dict[str, Any], loss_fn: Callable | None
            ) -> dict[str, torch.Tensor]:
    return fisher_merge(models, data, loss_fn, weights=params["weight"], eps=float(params["eps"]))


def _regmean(models: Sequence[nn.Module], data: Any, params: dict[str, Any], loss_fn: Callable | None
             ) -> dict[str, torch.Tensor]:
    return regmean_merge(models, data, alpha=float(params["alpha"]))


def _regmean_plusplus(models: Sequence[nn.Module], data: Any, params: dict[str, Any], loss_fn: Callable | None
                      ) -> dict[str, torch.Tensor]:
    from merging.modelwise.regmean_plusplus import regmean_plusplus_merge

    return regmean_plusplus_merge(models, data, alpha=float(params["alpha"]))


MODEL_LEVEL: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "fisher": _fisher, "regmean": _regmean, "regmean_plusplus": _regmean_plusplus}


def merge_models(method: str, models: Sequence[nn.Module], data: Any, params: dict[str, Any] | None = None,
                 loss_fn: Callable | None = None) -> dict[str, torch.Tensor]:
    """The merged state dict of `models` by model-level `method` (shared `data` or one dataset per model)."""
    info = get_info(method)
    if info.name not in MODEL_LEVEL:
        raise BasinError(f"method {method!r} is not a model-level merge (choose from {sorted(MODEL_LEVEL)})")
    problem = info.model_count_problem(len(models))
    if problem:
        raise BasinError(f"method {problem}")
    return MODEL_LEVEL[info.name](models, data, info.resolve(params, len(models)), loss_fn)
