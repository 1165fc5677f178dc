"""1-D and 2-D loss-landscape slices: L(theta + a d1) and L(theta + a d1 + b d2) on a grid (Li et al. 2018).

Grid points are built in chunks directly as stacked tensors (center + a d1 + b d2 broadcast over the chunk)
and evaluated by `evaluate_points`, batched with `vmap` when that helps, one point at a time otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from evaluations.landscape.evaluate import LossFn, alpha_grid, evaluate_points
from evaluations.landscape.params import Params, as_params, is_float
from evaluations.results import as_float64, fields_json
from taxonomy.errors import BasinError


def _grid(alphas: int | Iterable[float], span: float) -> torch.Tensor:
    return alpha_grid(alphas, -span, span) if isinstance(alphas, int) else alpha_grid(alphas)


def _stacked(center: Params, coeffs: torch.Tensor, dirs: list[Params]) -> Params:
    """center + sum_j coeffs[:, j] * dirs[j], stacked over the rows of `coeffs`."""
    out = {}
    for k, v in center.items():
        if not is_float(v):
            out[k] = v.unsqueeze(0).expand(len(coeffs), *v.shape)
            continue
        acc = v.unsqueeze(0).expand(len(coeffs), *v.shape)
        for j, d in enumerate(dirs):
            if k in d:
                acc = acc + coeffs[:, j].to(v.device, v.dtype).reshape(-1, *([1] * v.dim())) * d[k].unsqueeze(0)
        out[k] = acc
    return out


def _check_dir(center: Params, d: Params, label: str) -> None:
    for k, t in d.items():
        if k not in center:
            raise BasinError(f"{label}: tensor {k!r} is not a parameter of the model")
        if t.shape != center[k].shape:
            raise BasinError(f"{label}: tensor {k!r} has shape {tuple(t.shape)}, the model {tuple(center[k].shape)}")


@dataclass
class Slice1D:
    alphas: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray
    batched: bool = False

    def __post_init__(self) -> None:  # evaluations.results: result arrays are numpy float64
        self.alphas, self.loss, self.accuracy = (as_float64(v) for v in (self.alphas, self.loss, self.accuracy))

    def to_json(self) -> dict:
        return fields_json(self)


@dataclass
class Slice2D:
    alphas: np.ndarray  # along d1 (columns)
    betas: np.ndarray  # along d2 (rows)
    loss: np.ndarray  # [len(betas), len(alphas)]
    accuracy: np.ndarray
    batched: bool = False

    def __post_init__(self) -> None:
        self.alphas, self.betas = as_float64(self.alphas), as_float64(self.betas)
        self.loss, self.accuracy = as_float64(self.loss), as_float64(self.accuracy)

    def to_json(self) -> dict:
        return fields_json(self)


def slice_1d(model: nn.Module, center: object, direction: Params, data, loss_fn: LossFn | None = None,
             alphas: int | Iterable[float] = 21, span: float = 1.0, batched: bool | str = "auto",
             bn_reset_data=None, progress: bool = False) -> Slice1D:
    """L(center + a d) for a in `alphas` (an int: that many points evenly on [-span, span])."""
    c = as_params(center, "center")
    _check_dir(c, direction, "direction")
    grid = _grid(alphas, span)
    coeffs = grid[:, None]
    loss, acc, used = evaluate_points(model, len(grid), lambda idx: _stacked(c, coeffs[idx], [direction]), data,
                                      loss_fn, batched, bn_reset_data, progress=progress, desc="slice 1d")
    return Slice1D(alphas=grid.numpy(), loss=loss, accuracy=acc, batched=used)


def slice_2d(model: nn.Module, center: object, d1: Params, d2: Params, data, loss_fn: LossFn | None = None,
             alphas: int | Iterable[float] = 21, betas: int | Iterable[float] | None = None, span: float = 1.0,
             batched: bool | str = "auto", bn_reset_data=None, progress: bool = False) -> Slice2D:
    """L(center + a d1 + b d2) on the grid alphas x betas (betas default to alphas)."""
    c = as_params(center, "center")
    _check_dir(c, d1, "d1")
    _check_dir(c, d2, "d2")
    ga = _grid(alphas, span)
    gb = ga if betas is None else _grid(betas, span)
    bb, aa = torch.meshgrid(gb, ga, indexing="ij")
    coeffs = torch.stack([aa.reshape(-1), bb.reshape(-1)], dim=1)
    loss, acc, used = evaluate_points(model, len(coeffs), lambda idx: _stacked(c, coeffs[idx], [d1, d2]), data,
                                      loss_fn, batched, bn_reset_data, progress=progress, desc="slice 2d")
    shape = (len(gb), len(ga))
    return Slice2D(alphas=ga.numpy(), betas=gb.numpy(), loss=loss.reshape(shape), accuracy=acc.reshape(shape),
                   batched=used)
