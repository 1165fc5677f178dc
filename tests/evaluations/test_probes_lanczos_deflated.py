"""Lanczos's deflated confirmation (operators larger than the product budget) against dense eigvalsh: exact
double and triple eigenvalues, near-degenerate clusters, a flat bulk, all three `which`; and the polynomial
filter bound behind its stopping test, checked on the start vector's true components."""

import numpy as np
import pytest
import torch

from evaluations.probes import lanczos
from evaluations.probes.lanczos import _filter_sum, _miss_probability, _next_vector, _Subspace


def _matrix(ev: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(ev), len(ev), generator=gen, dtype=torch.float64))
    return (q * ev) @ q.T


def _spectrum(kind: str, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 + seed)
    rest = lambda m, lo, hi: lo + (hi - lo) * torch.rand(m, generator=gen, dtype=torch.float64)  # noqa: E731
    head = {"double": [5.0, 5.0, 3.0], "triple": [2.0, 2.0, 2.0, 1.5], "cluster": [1.0, 1 - 1e-7, 1 - 2e-4, 0.99],
            "flat": [0.245, 0.233, 0.223, 0.21, 0.208]}[kind]
    tail = rest(n - len(head), -0.2, 0.95) if kind != "flat" else 0.03 * torch.randn(n - len(head), generator=gen)
    if kind == "double":
        tail = rest(n - 3, -1.0, 1.0)
    ev = torch.cat([torch.tensor(head, dtype=torch.float64), tail.double()])
    return -ev if seed % 2 else ev  # odd seeds: the same spectra mirrored, for "SA" and "LM"


@pytest.mark.parametrize("kind", ["double", "triple", "cluster", "flat"])
def test_deflated_confirmation_converged_values_match_eigvalsh(kind):
    n, tol, runs, converged, confirmed = 300, 1e-3, 0, 0, 0
    for seed in range(4):
        ev = _spectrum(kind, n, seed)
        a = _matrix(ev, seed)
        dense = torch.linalg.eigvalsh(a)
        for which, k in (("LA", 1), ("LA", 3), ("SA", 3), ("LM", 2)):
            if (which == "SA") != bool(seed % 2) and which != "LM":
                continue  # the outliers sit at the end asked for
            eig = lanczos(a, k=k, tol=tol, which=which, seed=seed, max_iter=150)  # n > max_iter: deflated path
            runs += 1
            if not eig.converged:
                continue
            converged += 1
            confirmed += eig.extra["confirmation_steps"] > 0
            ref = {"LA": dense.flip(0), "SA": dense, "LM": dense[dense.abs().argsort(descending=True)]}[which][:k]
            values = torch.from_numpy(eig.values)
            assert bool(((values - ref).abs() <= tol * values.abs()).all()), (kind, seed, which, values, ref)
            for value, bound in zip(eig.values, eig.extra["error_bounds"]):
                assert bound <= tol * abs(value) and float((dense - value).abs().min()) <= bound + 1e-12
    assert runs == 10 and converged >= runs - 1 and confirmed == converged  # (a cluster may need > 150 products)


def test_deflated_confirmation_finds_the_copies_a_single_sequence_cannot_see():
    ev = _spectrum("triple", 300, 0)
    a = _matrix(ev, 0)
    for seed in range(3):
        eig = lanczos(a, k=4, tol=1e-6, seed=seed, max_iter=200)
        assert eig.converged and np.allclose(eig.values, [2.0, 2.0, 2.0, 1.5], atol=1e-5), eig.values


def test_filter_bound_holds_for_the_start_vectors_true_components():
    # B with one eigenvalue 2 above a bulk in [-1, 1] and a start vector with a tiny component eps along its
    # eigenvector: while every Ritz value is below tau, (u . x)^2 <= 1 / K(tau) (what the miss probability rests on)
    n, eps = 200, 1e-4
    ev = torch.cat([torch.tensor([2.0], dtype=torch.float64), torch.linspace(-1, 1, n - 1, dtype=torch.float64)])
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    a, x = (q * ev) @ q.T, q[:, 0]
    u = torch.randn(n, generator=gen, dtype=torch.float64)
    u = u - (u @ x) * x
    u = eps * x + (1 - eps**2) ** 0.5 * u / u.norm()
    sub, v = _Subspace(n, 8), u
    checked = tight = 0
    for _ in range(40):
        sub.add(v, a @ v)
        v = _next_vector(sub, sub.w[sub.m - 1], gen, False)
        theta, _ = sub.ritz()
        c = sub.c[: sub.m, : sub.m]
        alpha, beta = c.diagonal(), (c.diagonal(1) + c.diagonal(-1)) / 2
        for tau in (1.2, 1.5, 1.9):
            if float(theta.max()) < tau and sub.m >= 2:
                bound = 1 / _filter_sum(alpha, beta, tau)
                assert eps**2 <= bound * (1 + 1e-9), (sub.m, tau, bound)
                checked += 1
                tight += bound < 1e3 * eps**2
            else:
                assert _miss_probability(sub, 0, theta, tau, "LA") == 1.0  # a Ritz value at or past tau: no claim
    assert checked >= 20 and tight >= 3  # exercised, and the bound gets within 1e3 of the true component
