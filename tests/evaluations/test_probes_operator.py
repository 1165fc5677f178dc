"""The LinearOperator protocol: probes on DenseOperator against eigvalsh / trace / histogram, HessianOperator
through scipy's eigsh, the ProbeResult base type and its JSON keys."""

import json

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import eigsh
from torch import nn
from torch.func import functional_call

from evaluations.digits import make_mlp
from evaluations.probes import (
    CallableOperator,
    DenseOperator,
    Density,
    Eigen,
    Estimate,
    HessianOperator,
    LinearOperator,
    ProbeResult,
    Sharpness,
    as_operator,
    epsilon_sharpness,
    hutchinson_trace,
    lanczos,
    power_iteration,
    spectral_density,
    top_to_trace_ratio,
)
from taxonomy.errors import ProbeError


def _symmetric(n: int, dtype: torch.dtype, seed: int = 0, rank: int | None = None) -> torch.Tensor:
    """A symmetric matrix with a spread spectrum (a few outliers, a bulk around 0), or PSD of `rank`."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    if rank is None:
        ev = torch.cat([torch.tensor([40.0, 25.0, 12.0]), torch.randn(n - 3, generator=gen, dtype=torch.float64)])
    else:
        ev = torch.zeros(n, dtype=torch.float64)
        ev[:rank] = torch.linspace(1.0, 9.0, rank, dtype=torch.float64)
    return ((q * ev) @ q.T).to(dtype)


class _Scaled:
    """A protocol operator that is no `Operator` subclass: 3 * A (duck typing is enough)."""

    def __init__(self, a: torch.Tensor):
        self.a, self.shape, self.dtype, self.device = a, tuple(a.shape), a.dtype, a.device

    def matvec(self, v):
        return 3 * (self.a @ v)

    def matmat(self, vs):
        return 3 * (vs @ self.a.T)

    def to_scipy(self):
        raise NotImplementedError


@pytest.mark.parametrize("n,dtype", [(30, torch.float64), (50, torch.float32), (12, torch.float64)])
@pytest.mark.parametrize("which", ["LA", "SA"])
def test_lanczos_on_a_dense_operator_equals_eigvalsh(n, dtype, which):
    a = _symmetric(n, dtype, seed=n)
    op = DenseOperator(a)
    assert isinstance(op, LinearOperator) and op.shape == (n, n) and op.dtype == dtype
    tol = 1e-6 if dtype == torch.float64 else 1e-4
    eig = lanczos(op, k=3, tol=tol, which=which)
    ev = torch.linalg.eigvalsh(a.double())
    want = ev.flip(0)[:3] if which == "LA" else ev[:3]
    assert eig.converged
    bounds = torch.tensor(eig.extra["error_bounds"], dtype=torch.float64)
    assert ((torch.from_numpy(eig.values) - want).abs() <= bounds + 1e-5 * want.abs()).all()
    # the same run as with the raw matrix (which the probes wrap in a DenseOperator)
    assert np.array_equal(lanczos(a, k=3, tol=tol, which=which).values, eig.values)


def test_a_duck_typed_operator_and_a_callable_work_through_the_protocol():
    a = _symmetric(20, torch.float64, seed=3)
    top = float(torch.linalg.eigvalsh(a)[-1])
    assert isinstance(_Scaled(a), LinearOperator)
    assert lanczos(_Scaled(a), k=1, tol=1e-8).values[0] == pytest.approx(3 * top, rel=1e-7)
    fn = CallableOperator(lambda v: a @ v, 20, dtype=torch.float64)
    assert lanczos(fn, k=1, tol=1e-8).values[0] == pytest.approx(top, rel=1e-7)
    assert lanczos(lambda v: a @ v.double(), k=1, tol=1e-6, size=20).values[0] == pytest.approx(top, rel=1e-5)
    assert power_iteration(DenseOperator(a), k=1, tol=1e-10, max_iter=2000).values[0] == pytest.approx(top, rel=1e-4)
    rows = torch.randn(4, 20, dtype=torch.float64)
    assert torch.allclose(fn.matmat(rows), rows @ a.T) and torch.allclose(DenseOperator(a).matmat(rows), rows @ a.T)


@pytest.mark.parametrize("n,dtype", [(40, torch.float64), (64, torch.float32)])
def test_trace_on_a_dense_operator(n, dtype):
    # rank <= sketch: Hutch++'s low-rank part captures the whole range, so the estimate is the trace exactly
    low = _symmetric(n, dtype, seed=1, rank=5)
    est = hutchinson_trace(DenseOperator(low), sketch=8)
    exact = float(low.double().trace())
    assert est.mean == pytest.approx(exact, rel=1e-5 if dtype == torch.float32 else 1e-10)
    # full rank: within a few standard errors, converged to 5% relative standard error
    full = _symmetric(n, dtype, seed=2) + 2 * torch.eye(n, dtype=dtype)
    est = hutchinson_trace(DenseOperator(full), rtol=0.05, max_samples=400)
    assert est.converged and abs(est.mean - float(full.double().trace())) <= 4 * est.stderr + 1e-6


def test_density_on_a_dense_operator_matches_the_histogram():
    a = _symmetric(20, torch.float64, seed=5)
    ev = torch.linalg.eigvalsh(a)
    dens = spectral_density(DenseOperator(a), steps=20, runs=60, seed=0)
    assert dens.converged and dens.iterations == 60 * 20
    # a full Krylov space: every run's nodes are the eigenvalues
    assert np.allclose(np.sort(dens.nodes, 1), ev.expand(60, 20).numpy(), atol=1e-8)
    assert abs(float(torch.trapezoid(torch.from_numpy(dens.density), torch.from_numpy(dens.grid))) - 1.0) < 1e-6
    for lo, hi in [(-1e9, 0.0), (0.0, 10.0), (10.0, 1e9)]:
        frac = float(((ev >= lo) & (ev < hi)).double().mean())
        assert abs(dens.mass(lo, hi) - frac) < 0.06, (lo, hi)
    assert dens.moment(1) == pytest.approx(float(ev.mean()), abs=4 * dens.moment_stderr)


def _mlp_problem():
    model = make_mlp([4, 6, 3], seed=0).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 4, generator=gen, dtype=torch.float64)
    return model, nn.CrossEntropyLoss(), x, torch.randint(0, 3, (16,), generator=gen)


def _cnn_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, 2)).double()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 1, 5, 5, generator=gen, dtype=torch.float64)
    return model, nn.MSELoss(), x, torch.randn(6, 2, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("make", [_mlp_problem, _cnn_problem])
def test_hessian_to_scipy_eigsh_equals_lanczos(make):
    model, loss_fn, x, y = make()
    op = HessianOperator(model, loss_fn, (x, y))
    assert isinstance(op, LinearOperator) and op.shape == (op.size, op.size)
    sp = op.to_scipy()
    assert sp.shape == op.shape and sp.dtype == np.float64
    vals = np.sort(eigsh(sp, k=3, which="LA", ncv=20, tol=1e-12)[0])[::-1]
    eig = lanczos(op, k=3, tol=1e-8)
    assert eig.converged
    assert np.allclose(eig.values, vals, rtol=1e-6, atol=1e-9)
    cols = np.random.default_rng(0).standard_normal((op.size, 3))  # scipy's matmat: columns
    assert np.allclose(sp.matmat(cols), op.dense().numpy() @ cols, atol=1e-10)


def test_hessian_gradient_at_a_point_equals_autograd():
    model, loss_fn, x, y = _mlp_problem()
    op = HessianOperator(model, loss_fn, (x, y), batch_size=5)
    w = op.flat_params() + 0.01 * torch.randn(op.size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    leaf = w.clone().requires_grad_(True)
    loss = loss_fn(functional_call(model, op.unflatten(leaf), (x,)), y)
    (want,) = torch.autograd.grad(loss, leaf)
    assert torch.allclose(op.gradient(w), want, atol=1e-12)
    assert torch.allclose(op.gradient(), op.gradient(op.flat_params()), atol=1e-14)


def test_a_matrix_reports_no_mode_and_its_json_serializes():
    # regression: getattr(tensor, "mode") is torch.Tensor.mode (a method), which reached the results' JSON
    a = _symmetric(16, torch.float64, seed=7)
    results = [lanczos(a), hutchinson_trace(a), spectral_density(a, steps=8, runs=2, points=10)]
    for result in results:
        doc = result.to_json()
        assert doc.get("mode", doc.get("extra", {}).get("mode")) is None
        json.dumps(doc)
    assert top_to_trace_ratio(a)["mode"] is None and json.dumps(top_to_trace_ratio(a))


def test_bad_operators_are_one_line_probe_errors():
    with pytest.raises(ProbeError, match="square matrix"):
        lanczos(torch.zeros(3, 4))
    with pytest.raises(ProbeError, match="size="):
        hutchinson_trace(lambda v: v)
    with pytest.raises(ProbeError, match="does not match"):
        spectral_density(torch.eye(5), size=6)
    with pytest.raises(ProbeError, match="expected a LinearOperator"):
        as_operator("matrix")
    with pytest.raises(ProbeError, match=r"expected \[k, 5\] rows"):
        DenseOperator(torch.eye(5)).matmat(torch.zeros(5))
    with pytest.raises(ProbeError, match="size"):
        CallableOperator(lambda v: v, 0)


def test_results_share_the_probe_result_base_and_keep_their_json_keys():
    a = _symmetric(16, torch.float64, seed=9)
    model, loss_fn, x, y = _mlp_problem()
    eig, est = lanczos(a, k=2), hutchinson_trace(a)
    dens, sharp = spectral_density(a, steps=8, runs=2, points=10), epsilon_sharpness(model, loss_fn, (x, y), steps=2)
    for result, cls in [(eig, Eigen), (est, Estimate), (dens, Density), (sharp, Sharpness)]:
        assert isinstance(result, cls) and isinstance(result, ProbeResult)
        assert isinstance(result.iterations, int) and result.converged in (True, False, None)
    assert est.iterations == est.products and sharp.iterations == sharp.steps == 2
    assert list(eig.to_json()) == ["values", "converged", "iterations", "residuals", "method", "error_bounds",
                                   "start", "confirmation_steps", "mode"]
    assert list(est.to_json()) == ["mean", "stderr", "samples", "converged", "products", "sketch", "mode", "ci95"]
    assert list(dens.to_json()) == ["grid", "density", "sigma", "steps", "nodes", "weights", "converged",
                                    "iterations", "edge_residuals", "moment_stderr", "mode"]
    assert list(sharp.to_json()) == ["value", "loss", "perturbed_loss", "kind", "steps", "converged", "history",
                                     "mode"]
