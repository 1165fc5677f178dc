"""Extreme eigenpairs of a symmetric operator: Lanczos with full reorthogonalization, and deflated power iteration.

Lanczos (Lanczos 1950; Golub & Van Loan, Matrix Computations, Alg. 10.1.1 with full
reorthogonalization) builds an orthonormal Krylov basis Q_m with Q_m^T A Q_m = T_m tridiagonal;
the Ritz values of T_m approximate A's extreme eigenvalues. A Ritz pair (theta, Q_m s) has
residual |A y - theta y| = |beta_m s_m| (Golub & Van Loan eq. 10.1.6), a rigorous bound on the
distance from theta to an eigenvalue; we stop when it (or the sharper r^2 / gap) is below
`tol * |theta|` for all k wanted. By default the start vector is the loss gradient (plus a little noise)
when the operator provides one (`start_vector`). Power iteration with deflation (as PyHessian does) is
provided for comparison.
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
            **{key: value for key, value in self.extra.items() if key in ("error_bounds", "start")},
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
    scale = 1.0
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
        scale = max(scale, abs(float(a)))
        if b <= 1e-10 * scale:
            break
        q = w / b
    m = len(alphas)
    return torch.stack(alphas), torch.stack(betas), basis[:m]


def _gaps(theta: torch.Tensor, idx: torch.Tensor, res_all: torch.Tensor) -> torch.Tensor:
    """Estimated distance from each chosen Ritz value to the rest of the spectrum.

    The distance to each other Ritz value, less that value's own residual (an eigenvalue lies within its
    residual of it; unconverged neighbours have large residuals, so an early, optimistic gap is shrunk).
    """
    if len(theta) < 2:
        return torch.full((len(idx),), 1e-30, dtype=theta.dtype)  # no estimate: the residual bound applies
    diff = (theta[idx, None] - theta[None, :]).abs() - res_all[None, :]
    diff[torch.arange(len(idx)), idx] = float("inf")
    return diff.min(dim=1).values.clamp_min(1e-30)


def _tridiag(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    return torch.diag(alpha) + torch.diag(beta[:-1], 1) + torch.diag(beta[:-1], -1)


def start_vector(op, n: int, start: str, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, str]:
    """Lanczos start vector: "random" (Gaussian), "gradient" or "auto" -> (vector, what was used).

    "gradient" (and "auto", when the operator has a `gradient()` method, as `HessianOperator` does) starts
    from the loss gradient plus 10% of a random unit vector. The gradient lies mostly in the span of the top
    Hessian eigenvectors (Gur-Ari, Roberts & Dyer 2018, "Gradient descent happens in a tiny subspace"), so
    the wanted Ritz pairs converge in fewer steps; the random part keeps every eigenvector in the Krylov
    space. A zero or non-finite gradient falls back to the random start.
    """
    if start not in ("auto", "random", "gradient"):
        raise BasinError(f"start: expected 'auto', 'random' or 'gradient', got {start!r}")
    gen = torch.Generator().manual_seed(seed)
    rand = torch.randn(n, generator=gen, dtype=torch.float64)
    rand = rand / rand.norm()
    has_gradient = callable(getattr(op, "gradient", None))
    if start == "gradient" and not has_gradient:
        raise BasinError(f"start='gradient': the operator {type(op).__name__} has no gradient() method")
    if start == "random" or not has_gradient:
        return rand.to(dtype), "random"
    g = op.gradient().double().cpu()
    norm = g.norm()
    if not torch.isfinite(norm) or norm == 0:
        return rand.to(dtype), "random"
    return (g / norm + 0.1 * rand).to(dtype), "gradient"


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
    start: str = "auto",
) -> Eigen:
    """Top-k eigenpairs of a symmetric operator by Lanczos with full reorthogonalization.

    Stopping rule, on the Ritz residuals r_i = |beta_m s_mi| of the k wanted Ritz pairs: every wanted Ritz
    value has an error bound <= tol * |theta_i|, or `max_iter` steps (default min(n, 200)) were taken;
    `converged` says which, `extra["error_bounds"]` gives the bounds. `bound="residual"` uses
    |theta - lambda| <= r (rigorous); `bound="gap"` (default) also accepts the quadratic bound r^2 / gap
    (Parlett, The Symmetric Eigenvalue Problem, Thm. 11.7.1), with the gap estimated from the other Ritz
    values less their residuals, once the Krylov space has k + 2 dimensions (an estimate, sharp once the
    Ritz values settle). `which`: "LA" largest algebraic, "SA" smallest, "LM" largest magnitude.
    `v0` overrides `start` (see `start_vector`). `iterations` counts operator applications.
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
        v0, used = start_vector(op, n, start, seed, op_dtype)
    else:
        used = "given"
    q = v0.double() / v0.double().norm()
    basis = torch.zeros(min(max_iter, 2 * k + 8), n, dtype=torch.float64)  # grown on demand
    alphas: list[torch.Tensor] = []
    betas: list[torch.Tensor] = []
    dtype = v0.dtype
    converged = False
    err = torch.full((k,), float("inf"), dtype=torch.float64)
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
        res_all = (b * s[-1]).abs()
        res = res_all[idx]
        scale = theta[idx].abs().clamp_min(1e-30)
        quadratic = bound == "gap" and m >= min(n, k + 2)  # let the Ritz values settle before trusting the gap
        err = torch.minimum(res, res**2 / _gaps(theta, idx, res_all)) if quadratic else res
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
    extra = {"error_bounds": [float(e) if torch.isfinite(e) else None for e in err[: len(idx)]], "start": used}
    return Eigen(theta[idx], vectors, converged, m, res, "lanczos", extra)


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
