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


def _adamerging(granularity: str) -> Callable[..., dict[str, torch.Tensor]]:
    def merge(models: Sequence[nn.Module], data: Any, params: dict[str, Any], loss_fn: Callable | None,
              base: Any = None, seed: int = 0) -> dict[str, torch.Tensor]:
        from merging.modelwise.adamerging import adamerging

        if base is None:
            raise BasinError(f"method 'adamerging_{granularity}' needs a base model (base=...)")
        inputs = data if isinstance(data, list) and len(data) == len(models) else [data] * len(models)
        return adamerging(base, models, inputs, granularity, seed=seed, **params).state

    return merge


MODEL_LEVEL: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "fisher": _fisher, "regmean": _regmean, "regmean_plusplus": _regmean_plusplus,
    "adamerging_task": _adamerging("task"), "adamerging_layer": _adamerging("layer")}
NEEDS_BASE = ("adamerging_task", "adamerging_layer")


def merge_models(method: str, models: Sequence[nn.Module], data: Any, params: dict[str, Any] | None = None,
                 loss_fn: Callable | None = None, base: nn.Module | None = None, seed: int = 0
                 ) -> dict[str, torch.Tensor]:
    """The merged state dict of `models` by model-level `method` (shared `data` or one dataset per model).

    AdaMerging (`adamerging_task`, `adamerging_layer`) also takes the pretrained `base` (a module or state
    dict with the models' tensor names), `data` as each task's unlabeled test inputs, and `seed` (batches)."""
    info = get_info(method)
    if info.name not in MODEL_LEVEL:
        raise BasinError(f"method {method!r} is not a model-level merge (choose from {sorted(MODEL_LEVEL)})")
    problem = info.model_count_problem(len(models))
    if problem:
        raise BasinError(f"method {problem}")
    resolved = info.resolve(params, len(models))
    if info.name in NEEDS_BASE:
        return MODEL_LEVEL[info.name](models, data, resolved, loss_fn, base=base, seed=seed)
    return MODEL_LEVEL[info.name](models, data, resolved, loss_fn)
