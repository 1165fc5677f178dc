"""Hutchinson's trace estimator with a standard error (Hutchinson 1990; Avron & Toledo 2011).

tr(A) = E[v^T A v] for Rademacher v (entries +-1). The estimate is the sample mean of v_i^T A v_i,
its standard error the sample standard deviation over sqrt(samples); sampling stops once the
standard error is below `rtol * |mean|` (or `atol`), after at least `min_samples`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from evaluations.probes.lanczos import _apply, _size


@dataclass
class Estimate:
    mean: float
    stderr: float
    samples: int
    converged: bool

    @property
    def ci95(self) -> tuple[float, float]:
        return (self.mean - 1.96 * self.stderr, self.mean + 1.96 * self.stderr)

    def to_json(self) -> dict:
        return {"mean": self.mean, "stderr": self.stderr, "samples": self.samples, "converged": self.converged,
                "ci95": list(self.ci95)}


def rademacher(n: int, gen: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).to(dtype)


def hutchinson_trace(
    op,
    rtol: float = 1e-2,
    atol: float = 0.0,
    min_samples: int = 10,
    max_samples: int = 1000,
    seed: int = 0,
    size: int | None = None,
) -> Estimate:
    """Estimate tr(op) by Hutchinson's estimator; stop when stderr <= max(rtol * |mean|, atol)."""
    matvec = _apply(op)
    n = _size(op, size)
    gen = torch.Generator().manual_seed(seed)
    samples: list[float] = []
    converged = False
    while len(samples) < max_samples:
        v = rademacher(n, gen, getattr(op, "dtype", torch.float32))
        samples.append(float(torch.dot(v, matvec(v))))
        if len(samples) >= max(min_samples, 2):
            mean, stderr = _mean_stderr(samples)
            if stderr <= max(rtol * abs(mean), atol):
                converged = True
                break
    mean, stderr = _mean_stderr(samples)
    return Estimate(mean, stderr, len(samples), converged)


def _mean_stderr(samples: list[float]) -> tuple[float, float]:
    t = torch.tensor(samples, dtype=torch.float64)
    if len(t) < 2:
        return float(t.mean()), math.inf
    return float(t.mean()), float(t.std(unbiased=True) / math.sqrt(len(t)))
