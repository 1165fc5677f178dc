"""Interpolation family: weighted averages and spherical interpolation of parameters."""

from __future__ import annotations

from typing import Any

import torch

from merging.methods.registry import merge_method


@merge_method("linear")
def linear(
    tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict[str, Any], rng: torch.Generator
) -> torch.Tensor:
    """Weighted average sum_i w_i theta_i (divided by sum_i w_i when `normalize`); Wortsman et al. 2022."""
    weights = torch.tensor(params["weight"], dtype=tensors[0].dtype, device=tensors[0].device)
    out = torch.einsum("i,i...->...", weights, torch.stack(tensors))
    if params["normalize"]:
        total = weights.sum()
        if total == 0:
            from taxonomy import BasinError

            raise BasinError("linear: the weights sum to zero, cannot normalize")
        out = out / total
    return out
