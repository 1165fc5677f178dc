"""Loss landscapes of transformers checkpoints, streamed: slices along seeded directions, the plane of three.

- `checkpoint_slices(model, center, data)`: L(center + a d1) and L(center + a d1 + b d2) on a grid, d1 and d2
  filter-normalised Gaussian directions (Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets",
  Sec. 4, Eq. 1) regenerated from their seeds chunk by chunk (`evaluations.lm_path.SeededDirection`).
- `checkpoint_plane(model, center, a, b, data)`: the plane through three checkpoints (Garipov et al. 2018,
  "Loss Surfaces, Mode Connectivity, and Fast Ensembling of DNNs", Sec. 5), on a grid covering the three
  points with a `margin` on every side (a fraction of the extent).

Both write every grid point into the one live model as weights over memory-mapped sources, so memory stays one
model plus a few chunks; results are the in-memory evaluator's `Slice1D` / `Slice2D`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from evaluations.landscape.evaluate import alpha_grid
from evaluations.landscape.slices import Slice1D, Slice2D
from evaluations.lm_path import (
    Measure,
    PlaneWeights,
    SeededDirection,
    evaluate_checkpoint_points,
    open_sources,
    plane_weights,
)
from evaluations.objective import Objective


@dataclass
class CheckpointLandscape:
    """What a checkpoint landscape measured: the slices, the objective and the data's size."""

    slice_1d: Slice1D | None
    slice_2d: Slice2D
    objective: str
    tokens: int
    examples: int
    plane: PlaneWeights | None = None
    unit: str = "rows"  # what `tokens` counts: the objective's unit (predicted tokens, examples, pairs)

    def to_json(self) -> dict:
        out = {"objective": self.objective, "tokens": self.tokens, "unit": self.unit, "examples": self.examples,
               "slice_2d": self.slice_2d.to_json()}
        if self.slice_1d is not None:
            out["slice_1d"] = self.slice_1d.to_json()
        if self.plane is not None:
            out["plane_points"] = {"origin": self.plane.points[0].tolist(), "a": self.plane.points[1].tolist(),
                                   "b": self.plane.points[2].tolist()}
        return out


def _grid2(ga: torch.Tensor, gb: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    bb, aa = torch.meshgrid(gb, ga, indexing="ij")
    return aa.reshape(-1).numpy(), bb.reshape(-1).numpy()


def _slice2(ga, gb, measures: list[Measure]) -> Slice2D:
    shape = (len(gb), len(ga))
    return Slice2D(alphas=np.asarray(ga), betas=np.asarray(gb),
                   loss=np.array([m.loss for m in measures]).reshape(shape),
                   accuracy=np.array([m.accuracy for m in measures]).reshape(shape))


def checkpoint_slices(model: nn.Module, center: object, data: Sequence, grid: int = 21, span: float = 1.0,
                      seed: int = 0, ignore: str | None = "biasbn", objective: Objective | None = None,
                      two_d: bool = True, progress: bool = False) -> CheckpointLandscape:
    """1-D slice along d1 and (with `two_d`) the 2-D slice over d1 x d2 around checkpoint `center`; d_j is
    `SeededDirection(seed, j)`; coordinates span [-span, span] with `grid` points per axis."""
    (src,) = open_sources(model, [center])
    params = {name for name, _ in model.named_parameters()}
    d1, d2 = (SeededDirection(src, params, seed, j, ignore) for j in (1, 2))
    g = alpha_grid(grid, -span, span)
    ones = np.ones(len(g))
    one, obj = evaluate_checkpoint_points(model, [src, d1], np.stack([ones, g.numpy()], 1), data, objective,
                                          progress, "slice 1d")
    s1 = Slice1D(alphas=g.numpy(), loss=np.array([m.loss for m in one]), accuracy=np.array([m.accuracy for m in one]))
    if not two_d:
        return CheckpointLandscape(s1, _slice2(g, g[:0], []), obj.name, one[0].rows, one[0].examples, unit=obj.unit)
    a, b = _grid2(g, g)
    two, _ = evaluate_checkpoint_points(model, [src, d1, d2], np.stack([np.ones(len(a)), a, b], 1), data, obj,
                                        progress, "slice 2d")
    return CheckpointLandscape(s1, _slice2(g, g, two), obj.name, one[0].rows, one[0].examples, unit=obj.unit)


def plane_grid(plane: PlaneWeights, grid: int, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`grid` coordinates per axis covering the three points, widened by `margin` x the extent on each side."""
    lo, hi = plane.points.min(0), plane.points.max(0)
    pad = margin * (hi - lo)
    return (alpha_grid(grid, float(lo[0] - pad[0]), float(hi[0] + pad[0])),
            alpha_grid(grid, float(lo[1] - pad[1]), float(hi[1] + pad[1])))


def checkpoint_plane(model: nn.Module, center: object, a: object, b: object, data: Sequence, grid: int = 21,
                     margin: float = 0.2, objective: Objective | None = None,
                     progress: bool = False) -> CheckpointLandscape:
    """The loss on the plane through checkpoints center, a and b (Garipov et al. 2018, Sec. 5)."""
    srcs = open_sources(model, [center, a, b])
    plane = plane_weights(model, *srcs)
    gx, gy = plane_grid(plane, grid, margin)
    x, y = _grid2(gx, gy)
    measures, obj = evaluate_checkpoint_points(model, srcs, plane.weights(x, y), data, objective, progress, "plane")
    return CheckpointLandscape(None, _slice2(gx.numpy(), gy.numpy(), measures), obj.name, measures[0].rows,
                               measures[0].examples, plane=plane, unit=obj.unit)
