"""Fisher merging and RegMean against hand-computed and least-squares references."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from evaluations.digits import make_mlp
from merging.modelwise.data_aware import diagonal_fisher, fisher_merge, gram_matrices, regmean_merge
from taxonomy.errors import BasinError


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _linear(seed: int, bias: bool = True, shape=(2, 1)) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(*shape, bias=bias).double()


def squared_error(out, y):
    return ((out - y) ** 2).sum()


def test_fisher_of_a_linear_model_by_hand():
    model = _linear(0)
    x = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [3.0, -2.0]], dtype=torch.float64)
    y = torch.tensor([[0.5], [1.0], [-1.0]], dtype=torch.float64)
    w, b = model.weight.detach()[0], model.bias.detach()[0]
    residual = [float(w @ xi + b - yi) for xi, yi in zip(x, y[:, 0])]  # d/dtheta (f - y)^2 = 2 (f - y) d f
    fisher_w = sum((2 * r * xi) ** 2 for r, xi in zip(residual, x)) / 3
    fisher_b = sum((2 * r) ** 2 for r in residual) / 3
    got = diagonal_fisher(model, (x, y), loss_fn=squared_error)
    torch.testing.assert_close(got["weight"][0], fisher_w)
    torch.testing.assert_close(got["bias"][0], torch.tensor(fisher_b, dtype=torch.float64))


class _Branching(nn.Module):
    """Data-dependent control flow (as transformers' attention-mask checks have): vmap cannot trace it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.lin = nn.Linear(2, 1).double()

    def forward(self, x):
        return self.lin(x) * 2 if bool(x.sum() > 0) else self.lin(x)


def test_fisher_with_data_dependent_control_flow_falls_back_to_one_example_at_a_time():
    model = _Branching()
    x = torch.tensor([[1.0, 2.0], [-1.0, -0.5], [3.0, -2.0]], dtype=torch.float64)
    y = torch.tensor([[0.5], [1.0], [-1.0]], dtype=torch.float64)
    expected = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    for xi, yi in zip(x, y):  # the definition: per-example gradients by autograd, squared, averaged
        model.zero_grad()
        squared_error(model(xi.unsqueeze(0)), yi.unsqueeze(0)).backward()
        for k, v in model.named_parameters():
            expected[k] += v.grad ** 2 / 3
    got = diagonal_fisher(model, [(x[:2], y[:2]), (x[2:], y[2:])], loss_fn=squared_error)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-12, atol=1e-14)


def test_fisher_merge_is_the_fisher_weighted_average():
    m1, m2 = _linear(0), _linear(1)
    x1, y1 = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    x2, y2 = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    merged = fisher_merge([m1, m2], [(x1, y1), (x2, y2)], loss_fn=squared_error, weights=[1.0, 3.0], eps=1e-6)
    for name in ("weight", "bias"):
        f1, f2 = [], []
        for model, x, y, acc in ((m1, x1, y1, f1), (m2, x2, y2, f2)):  # per-example gradients by autograd
            total = torch.zeros_like(getattr(model, name))
            for xi, yi in zip(x, y):
                g = torch.autograd.grad(squared_error(model(xi[None]), yi[None]), getattr(model, name))[0]
                total += g**2
            acc.append(total / len(x) + 1e-6)
        p1, p2 = getattr(m1, name).detach(), getattr(m2, name).detach()
        expected = (1.0 * f1[0] * p1 + 3.0 * f2[0] * p2) / (1.0 * f1[0] + 3.0 * f2[0])
        torch.testing.assert_close(merged[name], expected)


def test_fisher_default_loss_on_a_classifier_and_bad_data(digits):
    models = [make_mlp([64, 8, 10], seed=s) for s in (0, 1)]
    merged = fisher_merge(models, (digits.x_train[:40], digits.y_train[:40]))
    assert merged.keys() == models[0].state_dict().keys()
    lo = torch.minimum(models[0][0].weight, models[1][0].weight)
    hi = torch.maximum(models[0][0].weight, models[1][0].weight)
    assert bool(((merged["0.weight"] >= lo - 1e-6) & (merged["0.weight"] <= hi + 1e-6)).all())  # a convex combination
    with pytest.raises(BasinError, match=r"batch of shape \(4, 63\)"):
        fisher_merge(models, (torch.randn(4, 63), torch.zeros(4, dtype=torch.long)))
    with pytest.raises(BasinError, match="architecture"):
        fisher_merge([models[0], make_mlp([64, 9, 10])], (digits.x_train[:4], digits.y_train[:4]))


def test_regmean_equals_least_squares_on_the_concatenated_problems():
    m1, m2 = _linear(0, bias=False, shape=(4, 3)), _linear(1, bias=False, shape=(4, 3))
    x1, x2 = torch.randn(20, 4, dtype=torch.float64), torch.randn(15, 4, dtype=torch.float64)
    merged = regmean_merge([m1, m2], [x1, x2], alpha=1.0)
    with torch.no_grad():
        targets = torch.cat([m1(x1), m2(x2)])
    solution = torch.linalg.lstsq(torch.cat([x1, x2]), targets).solution.T
    torch.testing.assert_close(merged["weight"], solution)


def test_regmean_off_diagonal_scaling_biases_and_other_layers():
    models = [make_mlp([6, 5, 3], seed=s).double() for s in (0, 1)]
    data = [torch.randn(30, 6, dtype=torch.float64), torch.randn(30, 6, dtype=torch.float64)]
    merged = regmean_merge(models, data, alpha=0.5)
    grams = [gram_matrices(m, d) for m, d in zip(models, data)]
    with torch.no_grad():
        g = [d.T @ d for d in data]  # first layer inputs are the data themselves
    torch.testing.assert_close(grams[0]["0"], g[0])
    scaled = [0.5 * gi + 0.5 * torch.diag(torch.diag(gi)) for gi in g]
    # the merged weight solves (sum G~) W^T = sum G~ W_i^T
    lhs = (scaled[0] + scaled[1]) @ merged["0.weight"].T
    rhs = scaled[0] @ models[0][0].weight.detach().T + scaled[1] @ models[1][0].weight.detach().T
    torch.testing.assert_close(lhs, rhs)
    torch.testing.assert_close(merged["0.bias"], (models[0][0].bias + models[1][0].bias).detach() / 2)
    with pytest.raises(BasinError, match="alpha"):
        regmean_merge(models, data, alpha=2.0)


def test_taxonomy_entries():
    import taxonomy
    from taxonomy.core import Family, Kind

    for name in ("weight_matching", "activation_matching", "repair"):
        info = taxonomy.get(name)
        assert info.family == Family.PERMUTATION_ALIGNMENT and info.kind == Kind.MODELWISE
        assert not info.needs_shared_init
    for name in ("fisher", "regmean"):
        info = taxonomy.get(name)
        assert info.family == Family.INTERPOLATION and info.category == "importance-weighted averaging"
        assert info.needs_data and info.kind == Kind.MODELWISE


def test_fisher_records_no_graph_through_tensors_outside_its_parameters():
    """A head hidden from named_parameters() (the bench's HeadedBody) still requires grad: the Fisher sums must not
    chain an autograd graph through it (it held a model's worth of memory per example)."""

    class Hidden(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(4)
            self.body = nn.Linear(2, 3).double()
            self._head = (nn.Linear(3, 1).double(),)  # not registered

        def forward(self, x):
            return self._head[0](torch.tanh(self.body(x)))

    model = Hidden()
    x = torch.tensor([[1.0, 2.0], [-1.0, -0.5], [3.0, -2.0]], dtype=torch.float64)
    y = torch.tensor([[0.5], [1.0], [-1.0]], dtype=torch.float64)
    got = diagonal_fisher(model, (x, y), loss_fn=squared_error)
    assert all(v.grad_fn is None and not v.requires_grad for v in got.values())
    expected = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    for xi, yi in zip(x, y):
        model.zero_grad()
        squared_error(model(xi.unsqueeze(0)), yi.unsqueeze(0)).backward()
        for k, v in model.named_parameters():
            expected[k] += v.grad ** 2 / 3
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-12, atol=1e-14)
