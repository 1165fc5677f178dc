"""Diagonal of a curvature operator: exact where the operator can form it, else Hutchinson's estimator.

Hutchinson diagonal (Bekas, Kokiopoulou & Saad 2007): diag(A) = E[z * (A z)] for Rademacher z; the per-entry
standard error is the sample standard deviation of z_i (A z)_i over sqrt(samples) (its variance is
sum_{j != i} A_ij^2). Sampling stops once |stderr|_2 <= rtol |estimate|_2 after at least `min_samples`.
The exact diagonal is the GGN / Fisher operators' `exact_diagonal()` (one vector-Jacobian product per output
row and factor column: evaluations.probes.ggn), for small outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from evaluations.probes.operator import as_operator, operator_mode
from evaluations.probes.result import ProbeResult
from taxonomy.errors import ProbeError

METHODS = ("auto", "exact", "hutchinson")


@dataclass
class DiagonalEstimate(ProbeResult):
    """`values` +- `stderr` (per entry; zeros when exact); `error`: |stderr|_2 / |values|_2; `products`
    (= `iterations`): operator applications (vector-Jacobian products for the exact diagonal). Arrays: numpy
    float64."""

    ARRAYS = ("values", "stderr")
    values: np.ndarray
    stderr: np.ndarray
    samples: int
    converged: bool
    products: int
    method: str
    mode: str | None = None

    @property
    def iterations(self) -> int:
        return self.products

    @property
    def error(self) -> float:
        stderr, values = torch.from_numpy(self.stderr), torch.from_numpy(self.values)  # torch's norm: the same bits
        return float(stderr.norm() / values.norm().clamp_min(1e-300))

    def to_json(self) -> dict:
        return {"values": self.values.tolist(), "stderr": self.stderr.tolist(), "samples": self.samples,
                "converged": self.converged, "iterations": self.products, "method": self.method, "error": self.error,
                "mode": self.mode}


def _exact(op) -> DiagonalEstimate:
    fn = getattr(op, "exact_diagonal", None)
    if not callable(fn):
        raise ProbeError(f"diagonal: {type(op).__name__} has no exact diagonal; use method='hutchinson'")
    values = fn().double()
    cost = int(getattr(op, "_diagonal_cost", lambda: 0)())
    return DiagonalEstimate(values, torch.zeros_like(values), 0, True, cost, "exact", operator_mode(op))


def hutchinson_diagonal(op, rtol: float = 0.05, min_samples: int = 10, max_samples: int = 1000, seed: int = 0,
                        size: int | None = None, block: int = 10) -> DiagonalEstimate:
    """Hutchinson's diagonal estimate with a per-entry standard error (`block` Rademacher vectors per `matmat`)."""
    op = as_operator(op, size)
    n = op.shape[0]
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(n, dtype=torch.float64)
    squares = torch.zeros(n, dtype=torch.float64)
    count, converged = 0, False
    while count < max_samples:
        k = min(block, max_samples - count)
        z = (torch.randint(0, 2, (k, n), generator=gen) * 2 - 1).to(op.dtype)
        prod = (z.double() * op.matmat(z.to(op.device)).double().cpu())
        total += prod.sum(0)
        squares += (prod**2).sum(0)
        count += k
        mean, stderr = _moments(total, squares, count)
        if count >= max(min_samples, 2) and float(stderr.norm()) <= rtol * float(mean.norm()):
            converged = True
            break
    mean, stderr = _moments(total, squares, count)
    return DiagonalEstimate(mean, stderr, count, converged, count, "hutchinson", operator_mode(op))


def _moments(total: torch.Tensor, squares: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    mean = total / count
    if count < 2:
        return mean, torch.full_like(mean, math.inf)
    var = (squares - count * mean**2).clamp_min(0) / (count - 1)
    return mean, (var / count).sqrt()


def diagonal(op, method: str = "auto", **options) -> DiagonalEstimate:
    """diag(op): "exact" (the operator's `exact_diagonal()`), "hutchinson", or "auto" (exact when the operator has
    one within its cost limit, else Hutchinson). `options`: `hutchinson_diagonal`'s."""
    if method not in METHODS:
        raise ProbeError(f"method: expected one of {METHODS}, got {method!r}")
    if method == "exact":
        return _exact(op)
    if method == "auto" and callable(getattr(op, "exact_diagonal", None)):
        try:
            return _exact(op)
        except ProbeError:
            pass
    return hutchinson_diagonal(op, **options)
