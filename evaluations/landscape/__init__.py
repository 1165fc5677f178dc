"""The landscape evaluator: paths, barriers, convexity and connectivity, 1-D/2-D landscapes.

Models are `nn.Module`s evaluated at parameter dicts with `torch.func.functional_call`; data is (x, y)
tensors or a DataLoader. Every result is a dataclass with `to_json()`; plots live in `plots.py`.
"""

from __future__ import annotations

from evaluations.landscape.barriers import REFERENCES, Barrier, barrier, barrier_values, interpolation_barrier
from evaluations.landscape.directions import (
    PCADirections,
    Plane,
    filter_normalize,
    pca_directions,
    plane_through,
    random_directions,
)
from evaluations.landscape.evaluate import PathResult, default_loss, evaluate_path, evaluate_points, reset_batchnorm
from evaluations.landscape.geometry import (
    Connectivity,
    Convexity,
    Determinism,
    Directedness,
    ModeConvexity,
    basins_from_matrix,
    connectivity,
    convexity,
    determinism,
    directedness,
    mode_convexity,
    pairwise_barriers,
)
from evaluations.landscape.params import as_params, flatten, lerp, stack, unflatten
from evaluations.landscape.paths import (
    BezierCurve,
    ChainPath,
    FittedCurve,
    LinearPath,
    Path,
    PolygonalChain,
    chain_path,
    fit_curve,
    linear_path,
)
from evaluations.landscape.slices import Slice1D, Slice2D, slice_1d, slice_2d

__all__ = [
    "REFERENCES", "Barrier", "BezierCurve", "ChainPath", "Connectivity", "Convexity", "Determinism",
    "Directedness", "FittedCurve", "LinearPath", "ModeConvexity", "PCADirections", "Path", "PathResult", "Plane",
    "PolygonalChain", "Slice1D", "Slice2D", "as_params", "barrier", "barrier_values", "basins_from_matrix",
    "chain_path", "connectivity", "convexity", "default_loss", "determinism", "directedness", "evaluate_path",
    "evaluate_points", "filter_normalize", "fit_curve", "flatten", "interpolation_barrier", "lerp", "linear_path",
    "mode_convexity", "pairwise_barriers", "pca_directions", "plane_through", "random_directions",
    "reset_batchnorm", "slice_1d", "slice_2d", "stack", "unflatten",
]
