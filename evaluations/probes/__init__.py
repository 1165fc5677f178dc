"""Curvature and kernel probes: Hessian, GGN, Fisher and KFAC operators; spectra (Lanczos, Hutchinson / Hutch++ /
XTrace, SLQ, diagonal) of any `LinearOperator`, sharpness, and the empirical NTK; their results derive from
`ProbeResult` and hold numpy float64 arrays (`evaluations.results`)."""

from __future__ import annotations

from evaluations.probes.blocks import BlockDiagonal
from evaluations.probes.curvature import CurvatureOperator, Task, as_task
from evaluations.probes.density import Density, spectral_density
from evaluations.probes.diagonal import DiagonalEstimate, diagonal, hutchinson_diagonal
from evaluations.probes.ggn import (
    EmpiricalFisherOperator,
    GGNOperator,
    MonteCarloFisherOperator,
    OutputCurvature,
    curvature_operator,
)
from evaluations.probes.hvp import HessianOperator
from evaluations.probes.kernel import (
    activation_pattern_distance,
    activation_patterns,
    kernel_alignment,
    kernel_distance,
    kernel_velocity,
)
from evaluations.probes.kfac import KFACInverse, KFACOperator
from evaluations.probes.lanczos import Eigen, lanczos, power_iteration
from evaluations.probes.linearize import KernelRegression, LinearizedModel, linearize, ntk_regression
from evaluations.probes.ntk import NTKResult, empirical_ntk, empirical_ntk_result
from evaluations.probes.operator import CallableOperator, DenseOperator, LinearOperator, Operator, as_operator
from evaluations.probes.params import Selection, select_params
from evaluations.probes.result import ProbeResult
from evaluations.probes.sharpness import Sharpness, adaptive_sharpness, epsilon_sharpness, top_to_trace_ratio
from evaluations.probes.trace import Estimate, hutchinson_trace, xtrace


def top_eigenvalue(model, loss_fn, data, params=None, tol: float = 1e-3, seed: int = 0) -> float:
    """Largest Hessian eigenvalue of the mean loss over `data` (Lanczos to `tol` relative accuracy)."""
    return float(lanczos(HessianOperator(model, loss_fn, data, params=params), k=1, tol=tol, seed=seed).values[0])


__all__ = [
    "KFACInverse", "KFACOperator",
    "BlockDiagonal",
    "CurvatureOperator",
    "DiagonalEstimate",
    "EmpiricalFisherOperator",
    "GGNOperator",
    "MonteCarloFisherOperator",
    "OutputCurvature",
    "Task",
    "as_task",
    "curvature_operator",
    "diagonal",
    "hutchinson_diagonal",
    "CallableOperator",
    "DenseOperator",
    "LinearOperator",
    "Operator",
    "ProbeResult",
    "as_operator",
    "KernelRegression",
    "LinearizedModel",
    "NTKResult",
    "Selection",
    "Sharpness",
    "adaptive_sharpness",
    "epsilon_sharpness",
    "linearize",
    "ntk_regression",
    "top_to_trace_ratio",
    "Density",
    "Eigen",
    "Estimate",
    "HessianOperator",
    "activation_pattern_distance",
    "activation_patterns",
    "empirical_ntk",
    "empirical_ntk_result",
    "hutchinson_trace",
    "xtrace",
    "kernel_alignment",
    "kernel_distance",
    "kernel_velocity",
    "lanczos",
    "power_iteration",
    "select_params",
    "spectral_density",
    "top_eigenvalue",
]
