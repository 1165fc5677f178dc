"""Eigenvalue spectral density by stochastic Lanczos quadrature (Ghorbani, Krishnan & Xiao 2019, Sec. 3).

For a random unit v, m Lanczos steps give T_m = S diag(theta) S^T; the Gauss quadrature
nodes theta_i with weights tau_i = S[0, i]^2 approximate the spectral measure of A seen from v,
and averaging over `runs` start vectors estimates phi(t) = (1/n) sum_i delta(t - lambda_i)
(Ghorbani et al. eq. 3-5). The density on a grid is smoothed with Gaussians of width `sigma`
(relative to the spectrum's range) and normalized so it integrates to 1 on the grid.

Convergence is reported, not assumed: `converged` is True when, in every run, the extreme Ritz pairs
(the spectrum's edges, which set the grid and the outliers) have Lanczos residuals |beta_m s_mi| at most
`tol` times the spectral radius, or the Krylov space became invariant. `moment_stderr` is the standard
error of the first moment (1/n) tr(A) over the runs (the Hutchinson error; None for a single run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from evaluations.probes.lanczos import lanczos_tridiag, tridiagonal
from evaluations.probes.operator import as_operator, operator_mode
from evaluations.probes.result import ProbeResult
from evaluations.probes.trace import rademacher


@dataclass
class Density(ProbeResult):
    """SLQ quadrature nodes and weights per run and the smoothed density on a grid; `iterations`: operator
    applications, all runs together; `converged`: see the module docstring. Arrays: numpy float64."""

    ARRAYS = ("nodes", "weights", "grid", "density", "edge_residuals")
    nodes: np.ndarray  # [runs, m] Ritz values (quadrature nodes)
    weights: np.ndarray  # [runs, m] quadrature weights, each row sums to 1
    grid: np.ndarray  # [points]
    density: np.ndarray  # [points], integrates to 1 over grid
    sigma: float
    steps: int
    converged: bool = False
    iterations: int = 0  # operator applications, all runs together
    edge_residuals: np.ndarray | None = None  # [runs, 2] residuals of the smallest and largest Ritz pairs
    moment_stderr: float | None = None
    mode: str | None = None  # a HessianOperator's network mode ("eval" / "train")

    def mass(self, low: float, high: float) -> float:
        """Estimated fraction of eigenvalues in [low, high) (from the quadrature weights, no smoothing)."""
        nodes, weights = torch.from_numpy(self.nodes), torch.from_numpy(self.weights)  # torch's sums: the same bits
        inside = (nodes >= low) & (nodes < high)
        return float((weights * inside).sum() / nodes.shape[0])

    def moment(self, p: int) -> float:
        """Estimated (1/n) tr(A^p)."""
        nodes, weights = torch.from_numpy(self.nodes), torch.from_numpy(self.weights)
        return float((weights * nodes**p).sum() / nodes.shape[0])

    def to_json(self) -> dict:
        return {"grid": self.grid.tolist(), "density": self.density.tolist(), "sigma": self.sigma,
                "steps": self.steps, "nodes": self.nodes.tolist(), "weights": self.weights.tolist(),
                "converged": self.converged, "iterations": self.iterations,
                "edge_residuals": None if self.edge_residuals is None else self.edge_residuals.tolist(),
                "moment_stderr": self.moment_stderr, "mode": self.mode}

    def plot(self, path: str, log: bool = True) -> None:
        from evaluations.plotting import pyplot, save_figure

        plt = pyplot()
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(self.grid, self.density)
        if log:
            ax.set_yscale("log")
            ax.set_ylim(bottom=max(1e-8, float(self.density.max()) * 1e-9))
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        fig.tight_layout()
        save_figure(fig, path, dpi=120)


def spectral_density(
    op,
    steps: int = 80,
    runs: int = 4,
    points: int = 1000,
    sigma: float = 1e-3,
    seed: int = 0,
    size: int | None = None,
    tol: float = 1e-2,
) -> Density:
    """SLQ density of a symmetric operator: `runs` Lanczos runs of `steps` steps each (full reorthogonalization).

    `tol`: the edge residual, relative to the spectral radius, below which a run counts as converged.
    """
    op = as_operator(op, size)
    matvec, n = op.matvec, op.shape[0]
    steps = min(steps, n)
    gen = torch.Generator().manual_seed(seed)
    all_nodes, all_weights, edges = [], [], []
    converged = True
    iterations = 0
    for _ in range(runs):
        alpha, beta, _ = lanczos_tridiag(matvec, rademacher(n, gen, op.dtype), steps)
        iterations += len(alpha)
        theta, s = torch.linalg.eigh(tridiagonal(alpha, beta))
        ends = [0, len(theta) - 1]
        res = (beta[-1] * s[-1, ends]).abs()
        invariant = len(alpha) < steps or len(alpha) == n
        converged &= invariant or bool((res <= tol * theta.abs().max().clamp_min(1e-30)).all())
        edges.append(torch.zeros(2, dtype=torch.float64) if invariant else res)
        nodes = torch.full((steps,), float(theta[0]), dtype=torch.float64)
        weights = torch.zeros(steps, dtype=torch.float64)
        nodes[: len(theta)] = theta
        weights[: len(theta)] = s[0] ** 2
        all_nodes.append(nodes)
        all_weights.append(weights)
    nodes = torch.stack(all_nodes)
    weights = torch.stack(all_weights)
    lo, hi = float(nodes.min()), float(nodes.max())
    width = max(hi - lo, 1e-12)
    sig = sigma * width
    grid = torch.linspace(lo - 0.05 * width - 3 * sig, hi + 0.05 * width + 3 * sig, points, dtype=torch.float64)
    gauss = torch.exp(-((grid[:, None, None] - nodes[None]) ** 2) / (2 * sig**2)) / (sig * math.sqrt(2 * math.pi))
    dens = (gauss * weights[None]).sum(dim=(1, 2)) / runs
    dens = dens / torch.trapezoid(dens, grid)
    firsts = (weights * nodes).sum(1)
    stderr = float(firsts.std(unbiased=True) / math.sqrt(runs)) if runs > 1 else None
    return Density(nodes, weights, grid, dens, sig, steps, converged, iterations, torch.stack(edges), stderr,
                   operator_mode(op))
