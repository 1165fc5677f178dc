"""Extreme eigenpairs of a symmetric operator: Lanczos with full reorthogonalization, and deflated power iteration.

Lanczos (Lanczos 1950; Golub & Van Loan, Matrix Computations, Alg. 10.1.1 with full
reorthogonalization) builds an orthonormal Krylov basis Q_m with Q_m^T A Q_m = T_m tridiagonal;
the Ritz values of T_m approximate A's extreme eigenvalues. A Ritz pair (theta, Q_m s) has
residual |A y - theta y| = |beta_m s_m| (Golub & Van Loan eq. 10.1.6), a rigorous bound on the
distance from theta to an eigenvalue; we stop when it is below `tol * |theta|` for all k wanted.
Power iteration with deflation (as PyHessian does) is provided for comparison.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from taxonomy.errors import BasinError


@dataclass
class Eigen:
    """Eigenvalues (ordered as asked: largest first for "LA"/"LM"), eigenvectors as rows, convergence."""

    values: torch.Tensor  # [k]
    vectors: torch.Tensor  # [k, n]
    converged: bool
    iterations: int  # operator applications
    residuals: torch.Tensor  # [k] |A v - lambda v|
    method: str = "lanczos"
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "values": [float(v) for v in self.values],
            "converged": bool(self.converged),
            "iterations": int(self.iterations),
            "residuals": [float(r) for r in self.residuals],
            "method": self.method,
        }


def _apply(op) -> Callable[[torch.Tensor], torch.Tensor]:
    if callable(getattr(op, "matvec", None)):
        return op.matvec
    if isinstance(op, torch.Tensor):
        return lambda v: op @ v
    if callable(op):
        return op
    raise BasinError(f"operator: expected a HessianOperator, a matrix or a callable, got {type(op).__name__}")


def _size(op, size: int | None) -> int:
    if size is not None:
        return size
    if hasattr(op, "size") and isinstance(op.size, int):
        return op.size
    if isinstance(op, torch.Tensor):
        return op.shape[0]
    raise BasinError("operator: pass size= for a plain callable")


def _pick(theta: torch.Tensor, k: int, which: str) -> torch.Tensor:
    if which == "LA":
        return torch.argsort(theta, descending=True)[:k]
    if which == "SA":
        return torch.argsort(theta)[:k]
    if which == "LM":
        return torch.argsort(theta.abs(), descending=True)[:k]
    raise BasinError(f"which: expected 'LA', 'SA' or 'LM', got {which!r}")


def lanczos_tridiag(matvec, v0: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`steps` Lanczos steps from v0 with full reorthogonalization -> (alpha [m], beta [m], Q [m, n]) in float64.

    beta[j] couples q_j and q_{j+1}; beta[m-1] is the residual norm after the last step.
    Stops early (m < steps) on an invariant subspace.
    """
    n = v0.numel()
    q = v0.double() / v0.double().norm()
    basis = torch.zeros(steps, n, dtype=torch.float64)
    alphas, betas = [], []
    for j in range(steps):
        basis[j] = q
        w = matvec(q.to(v0.dtype)).double()
        a = torch.dot(w, q)
        w = w - a * q - (betas[-1] * basis[j - 1] if j > 0 else 0.0)
        for _ in range(2):  # classical Gram-Schmidt twice ("twice is enough")
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        b = w.norm()
        alphas.append(a)
        betas.append(b)
        if b <= 1e-10 * max(1.0, float(torch.stack(alphas).abs().max())):
            break
        q = w / b
    m = len(alphas)
    return torch.stack(alphas), torch.stack(betas), basis[:m]


def _gaps(theta: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Distance from each chosen Ritz value to the nearest other one."""
    if len(theta) < 2:
        return torch.full((len(idx),), 1e-30, dtype=theta.dtype)  # no estimate: the residual bound applies
    diff = (theta[idx, None] - theta[None, :]).abs()
    diff[torch.arange(len(idx)), idx] = float("inf")
    return diff.min(dim=1).values.clamp_min(1e-30)


def _tridiag(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    return torch.diag(alpha) + torch.diag(beta[:-1], 1) + torch.diag(beta[:-1], -1)


def lanczos(
    op,
    k: int = 1,
    tol: float = 1e-3,
    max_iter: int | None = None,
    which: str = "LA",
    seed: int = 0,
    size: int | None = None,
    v0: torch.Tensor | None = None,
    bound: str = "gap",
) -> Eigen:
    """Top-k eigenpairs of a symmetric operator by Lanczos with full reorthogonalization.

    `bound="residual"` stops on |theta - lambda| <= r (rigorous); `bound="gap"` (default) also accepts the
    quadratic bound r^2 / gap (Parlett, The Symmetric Eigenvalue Problem, Thm. 11.7.1), with the gap to the
    nearest other Ritz value standing in for the true gap (an estimate, sharp once the Ritz values settle).

    Stops when every wanted Ritz pair has residual <= tol * |theta| (so each eigenvalue is within
    that relative error of a true eigenvalue) or after `max_iter` steps (default min(n, 200));
    `converged` says which. `which`: "LA" largest algebraic, "SA" smallest, "LM" largest magnitude.
    """
    matvec = _apply(op)
    n = _size(op, size)
    if bound not in ("residual", "gap"):
        raise BasinError(f"bound: expected 'residual' or 'gap', got {bound!r}")
    if not 1 <= k <= n:
        raise BasinError(f"k: must be between 1 and the operator size {n}, got {k}")
    max_iter = min(n, max_iter or 200)
    op_dtype = getattr(op, "dtype", torch.float32)
    if v0 is None:
        gen = torch.Generator().manual_seed(seed)
        v0 = torch.randn(n, generator=gen, dtype=torch.float64).to(op_dtype)
    q = v0.double() / v0.double().norm()
    basis = torch.zeros(min(max_iter, 2 * k + 8), n, dtype=torch.float64)  # grown on demand
    alphas: list[torch.Tensor] = []
    betas: list[torch.Tensor] = []
    dtype = v0.dtype
    converged = False
    for j in range(max_iter):
        if j == len(basis):
            basis = torch.cat([basis, torch.zeros(min(len(basis), max_iter - j), n, dtype=torch.float64)])
        basis[j] = q
        w = matvec(q.to(dtype)).double()
        a = torch.dot(w, q)
        w = w - a * q - (betas[-1] * basis[j - 1] if j > 0 else 0.0)
        for _ in range(2):
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        b = w.norm()
        alphas.append(a)
        betas.append(b)
        m = j + 1
        if m < k:
            if b < 1e-12:
                break
            q = w / b
            continue
        theta, s = torch.linalg.eigh(_tridiag(torch.stack(alphas), torch.stack(betas)))
        idx = _pick(theta, k, which)
        res = (b * s[-1, idx]).abs()
        scale = theta[idx].abs().clamp_min(1e-30)
        quadratic = bound == "gap" and m >= min(n, k + 2)  # let the Ritz values settle before trusting the gap
        err = torch.minimum(res, res**2 / _gaps(theta, idx)) if quadratic else res
        if bool((err <= tol * scale).all()) or b <= 1e-10 * float(theta.abs().max()):
            converged = True
            break
        if m == n:
            converged = True  # the Krylov space is the whole space: Ritz pairs are exact
            break
        q = w / b
    m = len(alphas)
    theta, s = torch.linalg.eigh(_tridiag(torch.stack(alphas), torch.stack(betas)))
    idx = _pick(theta, min(k, m), which)
    vectors = (s[:, idx].T @ basis[:m]).to(dtype)
    res = (betas[-1] * s[-1, idx]).abs()
    return Eigen(theta[idx], vectors, converged, m, res, "lanczos")


def power_iteration(
    op,
    k: int = 1,
    tol: float = 1e-3,
    max_iter: int = 100,
    seed: int = 0,
    size: int | None = None,
) -> Eigen:
    """Top-k eigenpairs (largest magnitude) by power iteration, deflating the ones found (Hotelling deflation).

    Each eigenvalue stops when its Rayleigh quotient changes by less than tol relative (the
    criterion PyHessian uses); `converged` is False if any hit `max_iter`. Residuals are reported.
    """
    matvec = _apply(op)
    n = _size(op, size)
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(op, "dtype", torch.float32)
    values, vectors, residuals = [], [], []
    all_converged = True
    total = 0
    for _ in range(k):
        v = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
        v = v / v.norm()
        lam = None
        ok = False
        for _ in range(max_iter):
            for u in vectors:
                v = v - torch.dot(u, v) * u
            v = v / v.norm()
            used = v
            hv = matvec(v)
            total += 1
            for u, lam_u in zip(vectors, values):
                hv = hv - lam_u * torch.dot(u, v) * u
            new = float(torch.dot(hv, v))
            if lam is not None and abs(new - lam) <= tol * abs(lam) + 1e-30:
                lam = new
                ok = True
                break
            lam = new
            v = hv / hv.norm().clamp_min(1e-30)
        all_converged &= ok
        values.append(lam)
        vectors.append(used)
        residuals.append(float((hv - lam * used).norm()))
    return Eigen(
        torch.tensor(values, dtype=torch.float64),
        torch.stack(vectors),
        all_converged,
        total,
        torch.tensor(residuals, dtype=torch.float64),
        "power_iteration",
    )
