"""Extreme eigenpairs of a symmetric operator: Lanczos with full reorthogonalization, and deflated power iteration.

Lanczos (Lanczos 1950; Golub & Van Loan, Matrix Computations, Alg. 10.1.1 with full
reorthogonalization) builds an orthonormal Krylov basis Q_m; the Ritz values of Q_m^T A Q_m
approximate A's extreme eigenvalues. A Ritz pair (theta, y) with residual |A y - theta y| <= r has an
eigenvalue within r of theta (Parlett, The Symmetric Eigenvalue Problem, Thm. 4.5.1): `lanczos` stops
on that rigorous bound, then confirms that no wanted eigenvalue was missed with a second Krylov sequence
from a random vector orthogonal to the basis (on large operators: to the wanted Ritz vectors, after a thick
restart, with a quantified stopping test; see `lanczos` for what `converged` guarantees). By default
the start vector is the loss gradient (plus a little noise) when the operator provides one (`start_vector`).
`lanczos_tridiag` is the plain three-term recurrence (for quadrature). Power iteration with deflation
(as PyHessian does) is provided for comparison.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from evaluations.probes.operator import as_operator, has_gradient, operator_mode
from evaluations.probes.result import ProbeResult
from taxonomy.errors import ProbeError

JSON_EXTRAS = ("error_bounds", "start", "confirmation_steps", "mode")


@dataclass
class Eigen(ProbeResult):
    """Eigenvalues (ordered as asked: largest first for "LA"/"LM"), eigenvectors as rows, convergence; numpy
    float64 arrays (the vectors hold the operator dtype's values: `torch.from_numpy(eig.vectors)` for operator
    algebra)."""

    ARRAYS = ("values", "vectors", "residuals")
    values: np.ndarray  # [k]
    vectors: np.ndarray  # [k, n]
    converged: bool
    iterations: int  # operator applications
    residuals: np.ndarray  # [k] |A v - lambda v|
    method: str = "lanczos"
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "values": [float(v) for v in self.values],
            "converged": bool(self.converged),
            "iterations": int(self.iterations),
            "residuals": [float(r) for r in self.residuals],
            "method": self.method,
            **{key: value for key, value in self.extra.items() if key in JSON_EXTRAS},
        }


def _pick(theta: torch.Tensor, k: int, which: str) -> torch.Tensor:
    if which == "LA":
        return torch.argsort(theta, descending=True)[:k]
    if which == "SA":
        return torch.argsort(theta)[:k]
    if which == "LM":
        return torch.argsort(theta.abs(), descending=True)[:k]
    raise ProbeError(f"which: expected 'LA', 'SA' or 'LM', got {which!r}")


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


def tridiagonal(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The symmetric tridiagonal T_m of a Lanczos run: alpha on the diagonal, beta[:-1] beside it."""
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
        raise ProbeError(f"start: expected 'auto', 'random' or 'gradient', got {start!r}")
    gen = torch.Generator().manual_seed(seed)
    rand = torch.randn(n, generator=gen, dtype=torch.float64)
    rand = rand / rand.norm()
    gradient = has_gradient(op)
    if start == "gradient" and not gradient:
        raise ProbeError(f"start='gradient': the operator {type(op).__name__} has no gradient() method")
    if start == "random" or not gradient:
        return rand.to(dtype), "random"
    g = op.gradient().double().cpu()
    norm = g.norm()
    if not torch.isfinite(norm) or norm == 0:
        return rand.to(dtype), "random"
    return (g / norm + 0.1 * rand).to(dtype), "gradient"


class _Subspace:
    """An orthonormal basis Q (rows), its images W = A Q (rows), C = Q W^T and the Gram matrix G = W W^T, grown one
    vector at a time.

    Rayleigh-Ritz on span(Q) works for any basis, not only a single Krylov sequence, so restarted and
    confirmation vectors join the same subspace. Residuals |A y - theta y| are formed explicitly from W
    (`residuals`); `screen` estimates them from G and C alone (|r|^2 = s^T G s - theta^2 for an orthonormal Q),
    so the explicit residuals are formed only when the estimate says they may pass. A step reads W once (C's
    new row and column, A being symmetric, and G's) and Q twice (one Gram-Schmidt pass after the three-term
    recurrence, `reorthogonalize`).
    """

    def __init__(self, n: int, capacity: int):
        self.n, self.m = n, 0
        # rows are written before they are read; `empty` commits memory only as rows are written
        self.q = torch.empty(capacity, n, dtype=torch.float64)
        self.w = torch.empty(capacity, n, dtype=torch.float64)
        self.c = torch.zeros(capacity, capacity, dtype=torch.float64)
        self.g = torch.zeros(capacity, capacity, dtype=torch.float64)
        self.sequence = 0  # the row where the current Krylov sequence started (a random vector, not a continuation)

    def orthogonalize(self, v: torch.Tensor, coefficients: torch.Tensor | None = None) -> torch.Tensor:
        """v less its components along Q (classical Gram-Schmidt twice: "twice is enough"); `coefficients`: Q v
        when already known (the first pass then reads Q once)."""
        for _ in range(2):
            coefficients = self.q[: self.m] @ v if coefficients is None else coefficients
            v = v - self.q[: self.m].T @ coefficients
            coefficients = None
        return v

    def continuation(self) -> torch.Tensor:
        """The Lanczos continuation of the last image w_j = A q_j: w_j less its components along Q (the three-term
        recurrence, then classical Gram-Schmidt passes until one keeps at least 1/sqrt(2) of the norm: Daniel,
        Gragg, Kaufman & Stewart 1976, three at most), unnormalized. The coefficients removed are Q w_j: they
        become C's last column exactly (it held the symmetric mirror of its row until now)."""
        j = self.m - 1
        coefficients = torch.zeros(self.m, dtype=torch.float64)
        lo = max(j - 1, 0)
        coefficients[lo:] = self.c[j, lo : j + 1]
        v = self.w[j] - coefficients[lo:] @ self.q[lo : j + 1]
        for _ in range(3):
            before = v.norm()
            d = self.q[: self.m] @ v
            v = v - self.q[: self.m].T @ d
            coefficients += d
            if v.norm() >= 0.7071 * before:
                break
        self.c[: j + 1, j] = coefficients
        return v

    def _grow(self) -> None:
        size = 2 * max(len(self.q), 8)
        for name in ("q", "w"):
            old, new = getattr(self, name), torch.empty(size, self.n, dtype=torch.float64)
            new[: self.m] = old[: self.m]
            setattr(self, name, new)
        for name in ("c", "g"):
            old, new = getattr(self, name), torch.zeros(size, size, dtype=torch.float64)
            new[: self.m, : self.m] = old[: self.m, : self.m]
            setattr(self, name, new)

    def add(self, q: torch.Tensor, w: torch.Tensor) -> None:
        if self.m == len(self.q):
            self._grow()
        j = self.m
        self.q[j], self.w[j] = q, w
        self.m += 1
        both = torch.mm(torch.stack([q, w]), self.w[: j + 1].T)  # one pass over W: W q (C's row), W w (G's column)
        self.c[j, : j + 1] = both[0]
        self.c[:j, j] = both[0, :j]  # (A q_i) . q_j = q_i . (A q_j): A is symmetric
        self.g[: j + 1, j] = both[1]
        self.g[j, :j] = both[1, :j]

    def restart(self, s: torch.Tensor) -> None:
        """Replace the basis by the Ritz vectors Q^T s (columns of s, orthonormal): rows, images, C and G
        transformed exactly (a thick restart keeping only these vectors)."""
        st = s.T.contiguous()
        m, ell = self.m, s.shape[1]
        self.q[:ell] = torch.mm(st, self.q[:m])
        self.w[:ell] = torch.mm(st, self.w[:m])
        for name in ("c", "g"):
            buf = getattr(self, name)
            buf[:ell, :ell] = st @ buf[:m, :m] @ s
        self.m = ell

    def ritz(self, lo: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Ritz values and coefficient vectors of the compression of A onto rows lo: of Q."""
        c = self.c[lo : self.m, lo : self.m]
        return torch.linalg.eigh((c + c.T) / 2)

    def residuals(self, s: torch.Tensor, theta: torch.Tensor, lo: int = 0, deflate: bool = False) -> torch.Tensor:
        """|A y_i - theta_i y_i| for y_i = Q[lo:]^T s[:, i]; with `deflate`, of (I - P) A y_i (P: onto Q[:lo])."""
        st = s.T.contiguous()  # (matmul of a transposed view is ~30x slower here than mm of a contiguous copy)
        r = torch.mm(st, self.w[lo : self.m]) - theta[:, None] * torch.mm(st, self.q[lo : self.m])
        if deflate and lo:
            r = r - torch.mm(torch.mm(r, self.q[:lo].T), self.q[:lo])
        return r.norm(dim=1)

    def screen(self, s: torch.Tensor, theta: torch.Tensor, bound: torch.Tensor, lo: int = 0,
               deflate: bool = False) -> bool:
        """False only if every explicit residual `residuals(s, theta, lo, deflate)` is surely above `bound` for some
        pair: the estimate |r|^2 = s^T G s - theta^2 (- |C[:lo, lo:] s|^2 deflated) with a rounding allowance of
        8 m n eps max diag(G), a worst case for the inner products that form G and C."""
        g = self.g[lo : self.m, lo : self.m]
        est = (s * (g @ s)).sum(0) - theta**2
        if deflate and lo:
            est = est - (self.c[:lo, lo : self.m] @ s).pow(2).sum(0)
        slack = 8 * self.m * self.n * torch.finfo(torch.float64).eps * float(self.g.diagonal()[: self.m].max())
        return bool((est <= bound**2 + slack).all())

    def vectors(self, s: torch.Tensor) -> torch.Tensor:
        return torch.mm(s.T.contiguous(), self.q[: self.m])


def _next_vector(sub: _Subspace, w: torch.Tensor, gen: torch.Generator, fresh: bool,
                 continuation: torch.Tensor | None = None) -> torch.Tensor | None:
    """The next basis vector: w (the Lanczos continuation) or, if `fresh` or w is (numerically) inside the
    subspace (an invariant subspace: the Krylov sequence ended early), a random vector orthogonal to it.
    None when the subspace is the whole space."""
    if not fresh:
        v = sub.continuation() if continuation is None else continuation
        if v.norm() > 1e-10 * max(w.norm(), 1e-300):
            return v / v.norm()
    sub.sequence = sub.m
    for _ in range(3):
        v = sub.orthogonalize(torch.randn(sub.n, generator=gen, dtype=torch.float64))
        if v.norm() > 1e-6:
            return v / v.norm()
    return None


def _explicit_ok(sub: _Subspace, s: torch.Tensor, theta: torch.Tensor, bound: torch.Tensor) -> bool:
    """Every explicit residual |A y_i - theta_i y_i| within its bound: the rigorous test behind `converged`."""
    return bool((sub.residuals(s, theta) <= bound).all())


MISS_PROBABILITY = 1e-3  # the deflated confirmation's bound on missing an eigenvalue (see `_miss_probability`)


@dataclass
class _Check:
    """Where the confirmation sequence starts in the basis, the wanted Ritz values when it started, the products
    spent before it, and whether it runs on the operator deflated by those Ritz vectors alone (`deflated`)."""

    start: int
    values: torch.Tensor
    products: int = 0
    deflated: bool = False


def _filter_sum(alpha: torch.Tensor, beta: torch.Tensor, x: float) -> float:
    """K(x) = sum_l pi_l(x)^2 over the Lanczos polynomials of a tridiagonal (diagonal alpha [j], off-diagonal
    beta [j-1]): beta_i pi_{i+1}(x) = (x - alpha_i) pi_i(x) - beta_{i-1} pi_{i-1}(x), pi_0 = 1. For the start
    vector u of the sequence, 1 / K(mu) = min ||p(B) u||^2 over polynomials of degree < j with p(mu) = 1."""
    a, b = alpha.tolist(), beta.tolist()
    prev, cur, total = 0.0, 1.0, 1.0
    for i in range(len(a) - 1):
        prev, cur = cur, ((x - a[i]) * cur - (b[i - 1] * prev if i else 0.0)) / b[i]
        total += cur * cur
    return total


def _miss_probability(sub: _Subspace, lo: int, theta: torch.Tensor, tau: float, which: str) -> float:
    """An upper bound on the probability that a Krylov sequence from a uniformly random unit start u (rows lo: of
    the basis, orthogonal to rows :lo) of B = A compressed to the complement of rows :lo looks like this one
    although B has an eigenvalue at or beyond tau (>= tau for "LA", <= tau for "SA", |.| >= |tau| for "LM");
    1.0 where the argument does not apply.

    Kuczynski & Wozniakowski 1992's argument, sharpened a posteriori: the sequence's vectors are q_l = pi_l(B) u
    with the Lanczos polynomials pi_l (three-term recurrence of its tridiagonal T), so for any unit eigenvector x
    of B with eigenvalue mu, (u . x)^2 <= 1 / sum_l pi_l(mu)^2 <= 1 / K, K = sum_l pi_l(tau)^2, once every Ritz
    value lies on the near side of tau (then each |pi_l| grows beyond tau). For u uniform on the sphere of
    dimension N, P((u . x)^2 <= s) <= sqrt(2 (N - 1) s / pi) (the Beta(1/2, (N-1)/2) tail).
    """
    m, j, big = sub.m, sub.m - lo, float(theta.abs().max())
    if j < 2 or sub.sequence > lo or big == 0:  # a random vector joined mid-sequence: not one Krylov sequence
        return 1.0
    c = sub.c[lo:m, lo:m]
    alpha, beta = c.diagonal(), (c.diagonal(1) + c.diagonal(-1)) / 2
    if bool((beta <= 1e-8 * big).any()):  # (near) breakdown: rounding, not the polynomial, would make q_l
        return 1.0
    if which == "LA":
        points, inside = [tau], bool(theta.max() < tau)
    elif which == "SA":
        points, inside = [tau], bool(theta.min() > tau)
    else:
        points, inside = [abs(tau), -abs(tau)], bool(theta.abs().max() < abs(tau))
    if not inside or tau == 0:
        return 1.0
    scale = 2 * max(sub.n - lo - 1, 1) / np.pi
    total = sum((scale / _filter_sum(alpha, beta, x)) ** 0.5 for x in points)
    return min(total, 1.0)


def _confirmed(sub: _Subspace, check: _Check, values: torch.Tensor, tol: float, which: str) -> bool | None:
    """True: the confirmation sequence's extremal Ritz pair (of the operator deflated by the earlier basis)
    has converged without changing the wanted values, or (deflated by the wanted Ritz vectors alone) its
    `_miss_probability` is below MISS_PROBABILITY; False: the wanted values moved (start another); None: not yet."""
    if len(values) != len(check.values) or bool(((values - check.values).abs() > tol * values.abs()).any()):
        return False
    if sub.m - check.start < 1:
        return None
    theta, s = sub.ritz(check.start)
    if check.deflated and _miss_probability(sub, check.start, theta, float(check.values[-1]), which) \
            <= MISS_PROBABILITY:
        return True
    i = _pick(theta, 1, which)
    bound = tol * values[-1].abs()
    if not sub.screen(s[:, i], theta[i], bound, check.start, deflate=True):
        return None
    res = sub.residuals(s[:, i], theta[i], check.start, deflate=True)
    return True if float(res[0]) <= float(bound) else None


def lanczos(
    op,
    k: int = 1,
    tol: float = 1e-3,
    max_iter: int | None = None,
    which: str = "LA",
    seed: int = 0,
    size: int | None = None,
    v0: torch.Tensor | None = None,
    start: str = "auto",
) -> Eigen:
    """Top-k eigenpairs of a symmetric operator: Lanczos with full reorthogonalization and a confirmation run.

    Rayleigh-Ritz on a growing orthonormal basis (float64): a Lanczos sequence from the start vector
    (`start`, or `v0`), continued from a random vector orthogonal to the basis whenever it becomes invariant.
    Once the k wanted Ritz pairs (theta_i, y_i) all have residuals r_i = |A y_i - theta_i y_i| <= tol |theta_i|
    (formed explicitly), a confirmation sequence starts from a fresh random vector orthogonal to the basis:
    a Lanczos sequence of the operator deflated by the basis found so far, run until its own extremal Ritz
    pair has a residual <= tol |theta_k|. If that changes a wanted value by more than tol relative (an
    eigenvalue the first sequence had missed, e.g. the second copy of a double eigenvalue), the wanted pairs
    are re-converged and confirmed again. Where the budget cannot reach the whole space (n > max_iter), the
    basis is first restarted to the k wanted Ritz vectors (a thick restart), so the confirmation runs on A
    deflated by them alone, and it may also stop once `_miss_probability` (Kuczynski & Wozniakowski 1992's
    polynomial argument on its tridiagonal) is <= MISS_PROBABILITY = 1e-3.

    `converged=True` guarantees, for the operator as applied: (a) rigorous: each returned theta_i has an
    eigenvalue within r_i = error_bounds[i] <= tol |theta_i| (Parlett, The Symmetric Eigenvalue Problem,
    Thm. 4.5.1), and for "LA" theta_i <= lambda_i, the i-th largest eigenvalue (Cauchy interlacing; >= the
    i-th smallest for "SA"); (b) the values are the top k to that tolerance unless an eigenvector is
    invisible to two independent Krylov sequences, the second from a random start (a probability-zero event
    in exact arithmetic, not observed in the seeded tests); where the bound stopped the confirmation: with
    probability >= 1 - 1e-3 over its random start, A compressed to the complement of the k Ritz vectors it
    started from has no eigenvalue at or beyond theta_k, so lambda_i <= theta_i + |R| (R: their residuals,
    Weyl). It is also True when the basis spans the whole space and (a) holds. Otherwise `max_iter` operator
    applications (default min(n, 200)) were spent. `which`: "LA" largest algebraic, "SA" smallest ("auto" then
    starts from a random vector: the gradient lies near the top eigenvectors), "LM" largest magnitude.
    `iterations` counts operator applications; `extra["confirmation_steps"]` those spent confirming.
    """
    op = as_operator(op, size)
    matvec, n = op.matvec, op.shape[0]
    if not 1 <= k <= n:
        raise ProbeError(f"k: must be between 1 and the operator size {n}, got {k}")
    _pick(torch.zeros(1), 1, which)  # validates `which`
    max_iter = min(n, max_iter or 200)
    deflate = n > max_iter  # the basis cannot reach the whole space: confirm on A deflated by the wanted pairs
    if start == "auto" and which == "SA":  # the gradient start aims at the top of the spectrum
        start = "random"
    v0, used = start_vector(op, n, start, seed, op.dtype) if v0 is None else (v0, "given")
    dtype = v0.dtype
    gen = torch.Generator().manual_seed(seed + 7919)  # restart / confirmation vectors, apart from the start's
    sub = _Subspace(n, min(max_iter, max(2 * k + 8, (1 << 24) // n)))  # up to 128 MiB reserved per buffer
    q: torch.Tensor | None = v0.double() / v0.double().norm()
    check: _Check | None = None
    converged = False
    products = 0
    while q is not None and products < max_iter:
        w = matvec(q.to(dtype)).double()
        products += 1
        sub.add(q, w)
        cont = sub.continuation()  # (also completes C's new column)
        theta, s = sub.ritz()
        idx = _pick(theta, min(k, sub.m), which)
        bound = tol * theta[idx].abs()
        ok = sub.m >= k and sub.screen(s[:, idx], theta[idx], bound)  # the estimate; explicit residuals where
        if ok and check is None:  # a decision rests on them: before a confirmation starts and before returning
            ok = _explicit_ok(sub, s[:, idx], theta[idx], bound)
        state = _confirmed(sub, check, theta[idx], tol, which) if ok and check is not None else None
        if ok and (state or sub.m == n):
            if check is None or _explicit_ok(sub, s[:, idx], theta[idx], bound):
                converged = True
                break
            ok = False
        fresh = ok and (check is None or state is False)  # start (or restart) a confirmation sequence
        if fresh and deflate:  # keep only the wanted Ritz vectors: the confirmation runs on A deflated by them
            sub.restart(s[:, idx])
            theta, s = sub.ritz()
            idx = _pick(theta, k, which)
        check = (_Check(sub.m, theta[idx].clone(), products, deflate) if fresh else check) if ok else None
        q = _next_vector(sub, w, gen, fresh, cont)
    theta, s = sub.ritz()
    idx = _pick(theta, min(k, sub.m), which)
    res = sub.residuals(s[:, idx], theta[idx])
    extra = {"error_bounds": [float(r) for r in res], "start": used,
             "confirmation_steps": products - check.products if converged and check is not None else 0,
             "mode": operator_mode(op)}  # a HessianOperator's network mode ("eval" / "train")
    return Eigen(theta[idx], sub.vectors(s[:, idx]).to(dtype), converged, products, res, "lanczos", extra)


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
    op = as_operator(op, size)
    matvec, n, dtype = op.matvec, op.shape[0], op.dtype
    gen = torch.Generator().manual_seed(seed)
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
