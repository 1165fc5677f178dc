"""Hessian probes against the dense Hessian (torch.autograd.functional.hessian + eigvalsh)."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from evaluations.digits import make_mlp
from evaluations.probes import (
    HessianOperator,
    hutchinson_trace,
    lanczos,
    power_iteration,
    spectral_density,
    top_eigenvalue,
)
from evaluations.probes.sharpness import adaptive_sharpness, epsilon_sharpness, top_to_trace_ratio
from taxonomy.errors import BasinError


@pytest.fixture(scope="module")
def problem():
    model = make_mlp([5, 7, 6, 3], seed=0).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(20, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (20,), generator=gen)
    loss_fn = nn.CrossEntropyLoss()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(v, keep=None):
        parts = torch.split(v, [s.numel() for s in shapes])
        params = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}
        return loss_fn(functional_call(model, params, (x,)), y)

    dense = torch.autograd.functional.hessian(loss_of, flat)
    return model, loss_fn, x, y, dense, names, shapes


@pytest.mark.parametrize("method", ["double_backward", "forward_over_reverse"])
def test_operator_equals_dense_hessian_over_batches(problem, method):
    model, loss_fn, x, y, dense, *_ = problem
    op = HessianOperator(model, loss_fn, (x, y), batch_size=7, method=method)
    assert torch.allclose(op.dense(), dense, atol=1e-12)
    cached = HessianOperator(model, loss_fn, (x, y), batch_size=7, method=method, cache_graph=True)
    assert torch.allclose(cached.dense(), dense, atol=1e-12)


def test_lanczos_top_k_matches_eigvalsh(problem):
    model, loss_fn, x, y, dense, *_ = problem
    ref = torch.linalg.eigvalsh(dense).flip(0)[:3]
    eig = lanczos(HessianOperator(model, loss_fn, (x, y)), k=3, tol=1e-6)
    assert eig.converged
    assert np.allclose(eig.values, ref.numpy(), rtol=1e-4)
    for v, lam in zip(torch.from_numpy(eig.vectors), eig.values):  # eigenvectors as rows
        assert torch.allclose(dense @ v, float(lam) * v, atol=1e-4)
    assert abs(top_eigenvalue(model, loss_fn, (x, y), tol=1e-6) - float(ref[0])) <= 1e-4 * float(ref[0])


def test_lanczos_reports_non_convergence(problem):
    model, loss_fn, x, y, *_ = problem
    eig = lanczos(HessianOperator(model, loss_fn, (x, y)), k=3, tol=1e-12, max_iter=4)
    assert not eig.converged and eig.iterations == 4


def test_power_iteration_agrees(problem):
    model, loss_fn, x, y, dense, *_ = problem
    ev = torch.linalg.eigvalsh(dense)
    ref = ev[ev.abs().argsort(descending=True)][:2]
    eig = power_iteration(HessianOperator(model, loss_fn, (x, y)), k=2, tol=1e-10, max_iter=1000)
    assert eig.converged
    assert np.allclose(eig.values, ref.numpy(), rtol=1e-4)


def test_parameter_subset_is_dense_sub_block(problem):
    model, loss_fn, x, y, dense, names, shapes = problem
    sizes = [s.numel() for s in shapes]
    start = sum(sizes[:2])  # "2." is the second Linear: names 2.weight, 2.bias
    block = dense[start : start + sizes[2] + sizes[3], start : start + sizes[2] + sizes[3]]
    op = HessianOperator(model, loss_fn, (x, y), params="2")
    assert op.names == ["2.weight", "2.bias"]
    assert torch.allclose(op.dense(), block, atol=1e-12)
    eig = lanczos(op, k=1, tol=1e-6)
    assert abs(float(eig.values[0]) - float(torch.linalg.eigvalsh(block)[-1])) <= 1e-4 * float(eig.values[0])


def test_hutchinson_trace_within_its_stderr(problem):
    model, loss_fn, x, y, dense, *_ = problem
    est = hutchinson_trace(dense, rtol=0.02, max_samples=20000)
    assert est.converged and est.stderr <= 0.02 * abs(est.mean)
    assert abs(est.mean - float(dense.trace())) <= 4 * est.stderr
    # through Hessian-vector products: the same Rademacher draws give the same samples as the dense matrix
    via_op = hutchinson_trace(HessianOperator(model, loss_fn, (x, y)), min_samples=20, max_samples=20, seed=5)
    via_dense = hutchinson_trace(dense, min_samples=20, max_samples=20, seed=5)
    assert via_op.samples == 20 and abs(via_op.mean - via_dense.mean) <= 1e-4 * abs(via_dense.mean)
    # exact for the identity: v^T v = n for Rademacher v
    eye = hutchinson_trace(torch.eye(10, dtype=torch.float64), min_samples=5, sketch=0)  # plain Hutchinson
    assert eye.mean == 10.0 and eye.stderr == 0.0 and eye.converged


def test_top_to_trace_ratio_on_a_matrix(problem):
    *_, dense, _, _ = problem
    ratio = top_to_trace_ratio(dense, tol=1e-6, rtol=0.01)
    exact = float(torch.linalg.eigvalsh(dense)[-1] / dense.trace())
    assert abs(ratio["ratio"] - exact) <= 4 * ratio["stderr"] + 1e-4 * exact


def test_spectral_density_integrates_to_one_and_matches_histogram(problem):
    model, loss_fn, x, y, dense, *_ = problem
    ev = torch.linalg.eigvalsh(dense)
    dens = spectral_density(dense, steps=len(dense), runs=40, seed=0)
    assert abs(float(torch.trapezoid(torch.from_numpy(dens.density), torch.from_numpy(dens.grid))) - 1.0) < 1e-6
    assert np.allclose(dens.weights.sum(1), 1.0)
    edges = [-1e9, -1e-3, 1e-3, 0.1, 1e9]
    for lo, hi in zip(edges[:-1], edges[1:]):
        frac = float(((ev >= lo) & (ev < hi)).double().mean())
        assert abs(dens.mass(lo, hi) - frac) < 0.08, (lo, hi)
    # the first moment (1/n) tr(H) from the quadrature, within a few of its standard errors
    # (the Hutchinson variance of one normalized Rademacher probe is 2 * sum_{i != j} H_ij^2 / n^2)
    n = len(dense)
    off = dense - torch.diag(dense.diagonal())
    stderr = float((2 * (off**2).sum() / n**2 / dens.nodes.shape[0]).sqrt())
    assert abs(dens.moment(1) - float(ev.mean())) < 4 * stderr
    # through Hessian-vector products: the same nodes and weights as with the dense matrix
    via_op = spectral_density(HessianOperator(model, loss_fn, (x, y)), steps=20, runs=1, seed=0)
    via_dense = spectral_density(dense, steps=20, runs=1, seed=0)
    assert np.allclose(via_op.nodes, via_dense.nodes, atol=1e-8)


def test_sharpness_against_brute_force(problem):
    model, loss_fn, x, y, dense, *_ = problem
    base = float(loss_fn(model(x), y))
    eps = epsilon_sharpness(model, loss_fn, (x, y), epsilon=1e-3, steps=20)
    assert eps.value >= 0 and eps.perturbed_loss >= base
    # a second-order upper bound: max over the box of g^T z + z^T H z / 2 is below sum |g||b| + |H|_2 |b|^2 / 2
    asam = adaptive_sharpness(model, loss_fn, (x, y), rho=1e-3, steps=1)
    assert asam.value >= 0
    # convergence is reported: None for ASAM's single step; for the ascents, from the last two perturbed losses
    assert asam.steps == 1 and asam.converged is None and len(asam.history) == 1
    assert len(eps.history) == 20 and eps.perturbed_loss == max([base] + eps.history)
    assert eps.converged == (abs(eps.history[-1] - eps.history[-2]) <= 1e-3 * abs(eps.history[-2]))
    several = adaptive_sharpness(model, loss_fn, (x, y), rho=1e-3, steps=5)
    assert several.steps == 5 and several.converged is not None and several.perturbed_loss == several.history[-1]
    # for tiny rho, ASAM's first-order value is rho * |T_w g|
    g = HessianOperator(model, loss_fn, (x, y)).gradient()
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    first_order = 1e-3 * float(((w.abs() + 0.01) * g).norm())
    assert abs(asam.value - first_order) <= 0.05 * first_order


@pytest.mark.parametrize("start", ["gradient", "random"])
def test_lanczos_start_vectors_and_rigorous_error_bounds(problem, start):
    model, loss_fn, x, y, dense, *_ = problem
    ev = torch.linalg.eigvalsh(dense)
    op = HessianOperator(model, loss_fn, (x, y))
    eig = lanczos(op, k=3, tol=1e-5, start=start)
    assert eig.converged and eig.extra["start"] == start and eig.to_json()["start"] == start
    assert np.allclose(eig.values, ev.flip(0)[:3].numpy(), rtol=1e-4)
    # the residual bound is rigorous: an eigenvalue lies within it of each Ritz value
    for value, bound in zip(eig.values, eig.extra["error_bounds"]):
        assert float((ev - value).abs().min()) <= bound + 1e-12
        assert bound <= 1e-5 * abs(float(value))
    # a looser tolerance: fewer products, still within it
    fast = lanczos(op, k=3, tol=1e-4, start=start)
    assert fast.converged and fast.iterations <= eig.iterations
    assert float(((torch.from_numpy(fast.values) - ev.flip(0)[:3]).abs() / ev.flip(0)[:3].abs()).max()) <= 1e-4


def test_gradient_start_vector_is_the_loss_gradient(problem):
    from evaluations.probes.lanczos import start_vector

    model, loss_fn, x, y, dense, *_ = problem
    model.zero_grad()
    loss_fn(model(x), y).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    model.zero_grad()
    op = HessianOperator(model, loss_fn, (x, y))
    assert torch.allclose(op.gradient(), g, atol=1e-12)  # from the cached gradient graph
    assert torch.allclose(HessianOperator(model, loss_fn, (x, y), batch_size=7).gradient(), g, atol=1e-12)
    v, used = start_vector(op, op.size, "auto", seed=0, dtype=torch.float64)
    assert used == "gradient" and abs(float((v - g / g.norm()).norm()) - 0.1) < 1e-12
    assert start_vector(dense, len(dense), "auto", 0, torch.float64)[1] == "random"  # a matrix has no gradient
    with pytest.raises(BasinError, match="gradient"):
        lanczos(dense, k=1, start="gradient")
    with pytest.raises(BasinError, match="start"):
        lanczos(op, k=1, start="sideways")


def test_spectral_density_reports_convergence_iterations_and_stderr():
    from evaluations.probes.lanczos import lanczos_tridiag, tridiagonal
    from evaluations.probes.trace import rademacher

    n = 60
    gen = torch.Generator().manual_seed(4)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    a = q @ torch.diag(torch.linspace(-1.0, 10.0, n, dtype=torch.float64)) @ q.T
    full = spectral_density(a, steps=n, runs=3, seed=2)
    assert full.converged and full.iterations <= 3 * n and full.to_json()["converged"]
    short = spectral_density(a, steps=4, runs=3, seed=2, tol=1e-3)
    assert not short.converged and short.iterations == 12
    # the edge residuals are |A y - theta y| for the extreme Ritz pairs of each run
    draws = torch.Generator().manual_seed(2)
    firsts = []
    for run in range(3):
        v = rademacher(n, draws, torch.float64)
        firsts.append(float(v @ a @ v) / n)  # the quadrature's first moment is v^T A v / n
        alpha, beta, basis = lanczos_tridiag(lambda u: a @ u, v, 4)
        theta, s = torch.linalg.eigh(tridiagonal(alpha, beta))
        for col, end in enumerate((0, len(theta) - 1)):
            ritz = s[:, end] @ basis
            assert abs(float((a @ ritz - theta[end] * ritz).norm()) - float(short.edge_residuals[run, col])) < 1e-9
    want = float(torch.tensor(firsts, dtype=torch.float64).std(unbiased=True) / 3**0.5)
    assert abs(short.moment_stderr - want) < 1e-12
    assert spectral_density(a, steps=4, runs=1).moment_stderr is None
