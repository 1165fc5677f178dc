"""Hessian probes against the dense Hessian (torch.autograd.functional.hessian + eigvalsh)."""

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


@pytest.mark.parametrize("mode", ["double_backward", "forward_over_reverse"])
def test_operator_equals_dense_hessian_over_batches(problem, mode):
    model, loss_fn, x, y, dense, *_ = problem
    op = HessianOperator(model, loss_fn, (x, y), batch_size=7, mode=mode)
    assert torch.allclose(op.dense(), dense, atol=1e-12)
    cached = HessianOperator(model, loss_fn, (x, y), batch_size=7, mode=mode, cache_graph=True)
    assert torch.allclose(cached.dense(), dense, atol=1e-12)


def test_lanczos_top_k_matches_eigvalsh(problem):
    model, loss_fn, x, y, dense, *_ = problem
    ref = torch.linalg.eigvalsh(dense).flip(0)[:3]
    eig = lanczos(HessianOperator(model, loss_fn, (x, y)), k=3, tol=1e-6)
    assert eig.converged
    assert torch.allclose(eig.values, ref, rtol=1e-4)
    for v, lam in zip(eig.vectors, eig.values):
        assert torch.allclose(dense @ v, lam * v, atol=1e-4)
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
    assert torch.allclose(eig.values, ref, rtol=1e-4)


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
    eye = hutchinson_trace(torch.eye(10, dtype=torch.float64), min_samples=5)
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
    assert abs(float(torch.trapezoid(dens.density, dens.grid)) - 1.0) < 1e-6
    assert torch.allclose(dens.weights.sum(1), torch.ones(dens.weights.shape[0], dtype=torch.float64))
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
    assert torch.allclose(via_op.nodes, via_dense.nodes, atol=1e-8)


def test_sharpness_against_brute_force(problem):
    model, loss_fn, x, y, dense, *_ = problem
    base = float(loss_fn(model(x), y))
    eps = epsilon_sharpness(model, loss_fn, (x, y), epsilon=1e-3, steps=20)
    assert eps.value >= 0 and eps.perturbed_loss >= base
    # a second-order upper bound: max over the box of g^T z + z^T H z / 2 is below sum |g||b| + |H|_2 |b|^2 / 2
    asam = adaptive_sharpness(model, loss_fn, (x, y), rho=1e-3, steps=1)
    assert asam.value >= 0
    # for tiny rho, ASAM's first-order value is rho * |T_w g|
    g = HessianOperator(model, loss_fn, (x, y)).gradient()
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    first_order = 1e-3 * float(((w.abs() + 0.01) * g).norm())
    assert abs(asam.value - first_order) <= 0.05 * first_order
