"""measure_minimum against a dense Hessian and a hand-written loss of a tiny tanh network."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from evaluations.landscape.directions import random_directions
from evaluations.minimum import measure_minimum
from taxonomy.errors import BasinError

SHAPES = {"0.weight": (4, 3), "0.bias": (4,), "2.weight": (3, 4), "2.bias": (3,)}


def tiny() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=g)
    return model, x, y


def unflat(w: torch.Tensor) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for k, shape in SHAPES.items():
        n = math.prod(shape)
        out[k] = w[i : i + n].reshape(shape)
        i += n
    return out


def manual_loss(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of tanh(x W0^T + b0) W2^T + b2, written out (no nn.Module, no functional_call)."""
    p = unflat(w)
    logits = torch.tanh(x @ p["0.weight"].T + p["0.bias"]) @ p["2.weight"].T + p["2.bias"]
    return (torch.logsumexp(logits, dim=1) - logits[torch.arange(len(y)), y]).mean()


def flat(model: nn.Module) -> torch.Tensor:
    state = dict(model.named_parameters())
    return torch.cat([state[k].detach().reshape(-1) for k in SHAPES])


def dense_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.autograd.functional.hessian(lambda w: manual_loss(w, x, y), flat(model))


def test_eigenvalues_gradient_and_loss_match_the_dense_hessian() -> None:
    model, x, y = tiny()
    h = dense_hessian(model, x, y)
    w = flat(model).requires_grad_(True)
    loss = manual_loss(w, x, y)
    (g,) = torch.autograd.grad(loss, w)
    m = measure_minimum(model, (x, y), top_k=3, lanczos_iters=len(h), lanczos_tol=1e-10, hutchinson_samples=4,
                        res_1d=5, res_2d=3)
    exact = torch.linalg.eigvalsh(h).flip(0)[:3]
    assert m.n_params == len(h) == 31
    assert m.lanczos_converged
    torch.testing.assert_close(torch.tensor(m.top_eigenvalues, dtype=torch.float64), exact, rtol=1e-6, atol=1e-9)
    # when the Lanczos probe reports error bounds, they hold against the exact eigenvalues
    for value, bound, true in zip(m.top_eigenvalues, m.lanczos_error_bounds, exact.tolist()):
        assert abs(value - true) <= bound + 1e-9
    assert m.loss == pytest.approx(float(loss.detach()), rel=1e-12)
    assert m.grad_norm == pytest.approx(float(g.norm()), rel=1e-9)


def test_trace_estimate_and_its_standard_error_match_the_dense_hessian() -> None:
    model, x, y = tiny()
    h = dense_hessian(model, x, y)
    n = 800
    m = measure_minimum(model, (x, y), top_k=1, lanczos_iters=5, hutchinson_samples=n, res_1d=3, res_2d=2, seed=3)
    # for Rademacher v, Var[v^T H v] = 2 * sum_{i != j} H_ij^2
    offdiag = h - torch.diag(torch.diagonal(h))
    predicted_stderr = math.sqrt(2 * float((offdiag**2).sum()) / n)
    assert m.trace_samples == n
    assert abs(m.trace - float(torch.trace(h))) <= 4 * predicted_stderr
    assert 0.8 * predicted_stderr <= m.trace_stderr <= 1.25 * predicted_stderr


def test_parameter_subset_gives_the_hessian_sub_block() -> None:
    model, x, y = tiny()
    h = dense_hessian(model, x, y)
    block = h[-15:, -15:]  # 2.weight and 2.bias are the last 15 entries
    m = measure_minimum(model, (x, y), params="2", top_k=2, lanczos_iters=15, lanczos_tol=1e-10,
                        hutchinson_samples=4, res_1d=3, res_2d=2)
    assert m.n_params == 15
    torch.testing.assert_close(torch.tensor(m.top_eigenvalues, dtype=torch.float64),
                               torch.linalg.eigvalsh(block).flip(0)[:2], rtol=1e-6, atol=1e-9)


def test_slices_are_the_loss_along_filter_normalized_directions() -> None:
    model, x, y = tiny()
    m = measure_minimum(model, (x, y), top_k=1, lanczos_iters=5, hutchinson_samples=4, res_1d=7, res_2d=5,
                        span=0.5, seed=11)
    d1, d2 = random_directions(model, n=2, normalize="filter", seed=11)
    v1, v2 = (torch.cat([d[k].reshape(-1) for k in SHAPES]) for d in (d1, d2))
    w = flat(model)
    assert m.alphas_1d == pytest.approx([-0.5 + i / 6 for i in range(7)])
    for a, value in zip(m.alphas_1d, m.slice_1d):
        assert value == pytest.approx(float(manual_loss(w + a * v1, x, y)), rel=1e-10)
    assert m.slice_1d[3] == pytest.approx(m.loss, rel=1e-12)
    for i, b in enumerate(m.alphas_2d):
        for j, a in enumerate(m.alphas_2d):
            assert m.slice_2d[i][j] == pytest.approx(float(manual_loss(w + a * v1 + b * v2, x, y)), rel=1e-10)
    # Li et al.'s filter normalization, with zero directions on biases
    for k in ("0.weight", "2.weight"):
        torch.testing.assert_close(d1[k].norm(dim=1), dict(model.named_parameters())[k].detach().norm(dim=1))
    assert float(d1["0.bias"].abs().sum()) == 0.0


def test_to_json_round_trips() -> None:
    model, x, y = tiny()
    m = measure_minimum(model, (x, y), top_k=2, lanczos_iters=8, hutchinson_samples=3, res_1d=3, res_2d=2)
    back = json.loads(json.dumps(m.to_json()))
    assert back["top_eigenvalues"] == m.top_eigenvalues
    assert len(back["slice_2d"]) == 2 and len(back["slice_2d"][0]) == 2


@pytest.mark.parametrize("kwargs, needle", [
    ({"top_k": 0}, "top_k"),
    ({"top_k": 40}, "top_k=40"),
    ({"hutchinson_samples": 1}, "hutchinson_samples"),
    ({"res_1d": 2}, "res_1d"),
    ({"params": "nope"}, "nope"),
])
def test_bad_arguments_raise_basin_error(kwargs: dict, needle: str) -> None:
    model, x, y = tiny()
    with pytest.raises(BasinError, match=needle):
        measure_minimum(model, (x, y), **kwargs)
