"""Trace estimation with a standard error: Hutch++ (Meyer, Musco, Musco & Woodruff 2021, Alg. 1) with an
adaptive Hutchinson stage (Hutchinson 1990; Avron & Toledo 2011), and XTrace (`xtrace`, Epperly, Tropp & Webber
2024) for a fixed budget of products.

tr(A) = tr(Q^T A Q) + tr((I - QQ^T) A (I - QQ^T)) for any orthonormal Q. Hutch++ takes Q = orth(A S) for
`sketch` Rademacher columns S, so Q captures the dominant eigenvectors (a Hessian's outliers, which carry
most of Hutchinson's variance); the first term is exact (A Q: `sketch` more products), the second is
estimated by Hutchinson's estimator E[z^T A z], z = (I - QQ^T) v for Rademacher v. Given Q it is unbiased;
its standard error is the sample standard deviation of the z^T A z over sqrt(samples). Sampling stops once
that standard error is at most max(rtol * |estimate|, atol), after at least `min_samples` samples.
`sketch=0` is plain Hutchinson.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from evaluations.probes.operator import as_operator, operator_mode
from evaluations.probes.result import ProbeResult
from taxonomy.errors import ProbeError


@dataclass
class Estimate(ProbeResult):
    """`mean` +- `stderr` (the sample standard error); `samples`/`products` (= `iterations`): Hutchinson samples
    / operator applications in all; `converged`: stderr <= max(rtol |mean|, atol) was reached within `max_samples`."""

    mean: float
    stderr: float
    samples: int
    converged: bool
    products: int = 0
    sketch: int = 0  # the Hutch++ low-rank part's rank (0: plain Hutchinson)
    mode: str | None = None  # a HessianOperator's network mode ("eval" / "train")

    @property
    def iterations(self) -> int:
        """Operator applications in all (`products`)."""
        return self.products

    @property
    def ci95(self) -> tuple[float, float]:
        return (self.mean - 1.96 * self.stderr, self.mean + 1.96 * self.stderr)

    def to_json(self) -> dict:
        return {"mean": self.mean, "stderr": self.stderr, "samples": self.samples, "converged": self.converged,
                "products": self.products, "sketch": self.sketch, "mode": self.mode, "ci95": list(self.ci95)}


def rademacher(n: int, gen: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).to(dtype)


def _low_rank_part(matvec, n: int, sketch: int, gen: torch.Generator, dtype: torch.dtype):
    """(Q [n, r] float64 orthonormal, exact tr(Q^T A Q), products) with Q = orth(A S), S: `sketch` Rademacher
    columns (r < sketch where A S is rank-deficient)."""
    if sketch == 0:
        return torch.zeros(n, 0, dtype=torch.float64), 0.0, 0
    images = torch.stack([matvec(rademacher(n, gen, dtype)).double() for _ in range(sketch)], 1)
    q, r = torch.linalg.qr(images)
    keep = r.diagonal().abs() > 1e-10 * r.diagonal().abs().max().clamp_min(1e-300)  # drop a rank-deficient sketch
    q = q[:, keep]
    exact = sum(float(torch.dot(col, matvec(col.to(dtype)).double())) for col in q.T)
    return q, exact, sketch + q.shape[1]


def hutchinson_trace(
    op,
    rtol: float = 0.05,
    atol: float = 0.0,
    min_samples: int = 10,
    max_samples: int = 1000,
    seed: int = 0,
    size: int | None = None,
    sketch: int = 10,
) -> Estimate:
    """Estimate tr(op) by Hutch++ (`sketch` low-rank directions, at most n // 4) and adaptive Hutchinson.

    Defaults: relative standard error 5% after at least 10 samples, `sketch` = 10 (2 * 10 products for the
    exact low-rank part). `converged` means stderr <= max(rtol * |mean|, atol) within `max_samples`; the
    stderr is the sample standard error, so the error is within 1.96 stderr about 95% of the time.
    """
    op = as_operator(op, size)
    matvec, n, dtype = op.matvec, op.shape[0], op.dtype
    gen = torch.Generator().manual_seed(seed)
    q, exact, products = _low_rank_part(matvec, n, min(max(sketch, 0), n // 4), gen, dtype)
    samples: list[float] = []
    converged = False
    while len(samples) < max_samples:
        v = rademacher(n, gen, dtype)
        if q.shape[1]:
            v = (v.double() - q @ (q.T @ v.double())).to(dtype)
        samples.append(float(torch.dot(v.double(), matvec(v).double())))
        if len(samples) >= max(min_samples, 2):
            mean, stderr = _mean_stderr(samples)
            if stderr <= max(rtol * abs(exact + mean), atol):
                converged = True
                break
    mean, stderr = _mean_stderr(samples)
    return Estimate(exact + mean, stderr, len(samples), converged, products + len(samples), q.shape[1],
                    operator_mode(op))


def _mean_stderr(samples: list[float]) -> tuple[float, float]:
    t = torch.tensor(samples, dtype=torch.float64)
    if len(t) < 2:
        return float(t.mean()), math.inf
    return float(t.mean()), float(t.std(unbiased=True) / math.sqrt(len(t)))


def _orth(y: torch.Tensor, rtol: float = 1e-12) -> torch.Tensor:
    """An orthonormal basis [n, r] of the column space of y (singular values below rtol * the largest dropped)."""
    if y.shape[1] == 0:
        return y
    u, s, _ = torch.linalg.svd(y, full_matrices=False)
    return u[:, s > rtol * s.max()]  # a zero y: no column


def _leave_one_out(r: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each test vector i: c_i = V_i V_i^T w_i and tr(V_i^T H V_i), V_i an orthonormal basis of the span of
    the sketch's coordinates R without column i (Q V_i spans A Omega_{-i}) -> (C [r, m], low-rank traces [m])."""
    m = r.shape[1]
    c = torch.zeros_like(w)
    low = torch.zeros(m, dtype=torch.float64)
    for i in range(m):
        v = _orth(torch.cat([r[:, :i], r[:, i + 1 :]], 1))
        c[:, i] = v @ (v.T @ w[:, i])
        low[i] = torch.trace(v.T @ h @ v)
    return c, low


def xtrace(op, matvecs: int = 40, rtol: float = 0.05, atol: float = 0.0, seed: int = 0,
           size: int | None = None) -> Estimate:
    """tr(op) by XTrace (Epperly, Tropp & Webber 2024, "XTrace: making the most of every sample in stochastic
    trace estimation", Sec. 2): Hutch++ made exchangeable, every test vector used both ways.

    m = matvecs // 2 Rademacher test vectors Omega, Y = A Omega, Q an orthonormal basis of range(Y), Z = A Q (the
    other <= m products). For each i, Q_(i) = orth(A Omega_{-i}) (inside range(Q), so A Q_(i) comes from Z) and
    t_i = tr(Q_(i)^T A Q_(i)) + w_i^T A w_i with w_i = (I - Q_(i) Q_(i)^T) omega_i: unbiased, since Q_(i) does not
    depend on omega_i. The estimate is the mean of the t_i; its error estimate `stderr` (the paper's) is their
    standard deviation / sqrt(m). The t_i share their test vectors, so this is an estimate, not a standard error:
    in the seeded tests |error| <= 3 stderr in 86% (PSD) to 95% (indefinite) of draws, against 99.7% for a
    Gaussian mean. `converged`: stderr <= max(rtol |mean|, atol). An operator of rank < m - 1 (or a sketch
    spanning the whole space) is captured whole (error 0). `sketch` reports rank(Y); `products` = m + rank(Y)."""
    op = as_operator(op, size)
    n = op.shape[0]
    if isinstance(matvecs, bool) or not isinstance(matvecs, int) or matvecs < 4:
        raise ProbeError(f"matvecs: expected an integer >= 4 (two per test vector), got {matvecs!r}")
    m = min(matvecs // 2, n)
    gen = torch.Generator().manual_seed(seed)
    omega = torch.stack([rademacher(n, gen, torch.float64) for _ in range(m)], 1)  # [n, m]
    y = op.matmat(omega.T.to(op.dtype)).double().T
    q = _orth(y)
    z = op.matmat(q.T.contiguous().to(op.dtype)).double().T if q.shape[1] else q
    if q.shape[1] == n:  # the sketch spans the whole space: tr(Q^T A Q) is the trace itself
        return Estimate(float(torch.trace(q.T @ z)), 0.0, m, True, m + n, n, operator_mode(op))
    c, low = _leave_one_out(q.T @ y, q.T @ omega, q.T @ z)
    u, au = omega - q @ c, y - z @ c  # w_i and A w_i, column by column
    t = low + (u * au).sum(0)
    mean = float(t.mean())
    stderr = float(t.std(unbiased=True) / math.sqrt(m)) if m > 1 else math.inf
    converged = stderr <= max(rtol * abs(mean), atol)
    return Estimate(mean, stderr, m, converged, m + q.shape[1], q.shape[1], operator_mode(op))
