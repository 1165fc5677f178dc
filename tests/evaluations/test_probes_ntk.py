"""Empirical NTK against an explicit per-example Jacobian product; kernel metrics; NTK regression closed form."""

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from evaluations.digits import make_mlp
from evaluations.probes import activation_pattern_distance, empirical_ntk, kernel_alignment, kernel_distance
from evaluations.probes.linearize import kernel_ridge_predict, linearize, ntk_regression


class Tiny(nn.Module):
    """A Linear stack plus a LayerNorm, so the structured method exercises its fallback."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.norm(self.a(x))))


def explicit_ntk(model, x1, x2):
    """K[(i,a),(j,b)] from torch.autograd.functional.jacobian of each example's output w.r.t. all parameters."""
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())

    def jac(xi):
        def f(*ps):
            return functional_call(model, dict(zip(names, ps)), (xi[None],))[0]

        return torch.cat([j.reshape(j.shape[0], -1) for j in torch.autograd.functional.jacobian(f, params)], 1)

    j1 = torch.stack([jac(xi) for xi in x1])  # [n1, C, P]
    j2 = torch.stack([jac(xi) for xi in x2])
    return torch.einsum("iap,jbp->iajb", j1, j2)


@pytest.fixture(scope="module", params=["mlp", "tiny"])
def setting(request):
    model = (make_mlp([4, 6, 5, 3], seed=0) if request.param == "mlp" else Tiny()).double().eval()
    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    x2 = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    return model, x1, x2, explicit_ntk(model, x1, x1), explicit_ntk(model, x1, x2)


@pytest.mark.parametrize("method", ["jacobian", "ntk_vp", "structured"])
def test_every_method_and_kind_equals_explicit_jacobian_product(setting, method):
    model, x1, x2, ref11, ref12 = setting
    for x_b, ref in ((None, ref11), (x2, ref12)):
        n1, c, n2, _ = ref.shape
        full = empirical_ntk(model, x1, x_b, kind="full", method=method, chunk=2)
        assert torch.allclose(full, ref.reshape(n1 * c, n2 * c), atol=1e-10)
        block = empirical_ntk(model, x1, x_b, kind="block", method=method)
        assert torch.allclose(block, torch.stack([ref[:, a, :, a] for a in range(c)]), atol=1e-10)
        trace = empirical_ntk(model, x1, x_b, kind="trace", method=method)
        assert torch.allclose(trace, sum(ref[:, a, :, a] for a in range(c)), atol=1e-10)


def test_parameter_subset(setting):
    model, x1, _, _, _ = setting
    last = [n for n, _ in model.named_parameters()][-2].rsplit(".", 1)[0]
    ks = [empirical_ntk(model, x1, kind="trace", method=m, params=last) for m in ("jacobian", "ntk_vp", "structured")]
    assert torch.allclose(ks[0], ks[1], atol=1e-10) and torch.allclose(ks[0], ks[2], atol=1e-10)


def test_kernel_distance_self_zero_scale_invariant_and_orthogonal():
    k = torch.randn(6, 6, dtype=torch.float64)
    k = k @ k.T
    assert abs(kernel_distance(k, k)) < 1e-12
    assert abs(kernel_distance(k, 7.5 * k)) < 1e-12
    assert abs(kernel_distance(torch.eye(2), torch.tensor([[0.0, 1.0], [1.0, 0.0]])) - 1.0) < 1e-12


def test_alignment_of_label_kernel_is_one():
    y = torch.tensor([0, 1, 2, 1, 0, 2])
    onehot = torch.nn.functional.one_hot(y).double()
    assert abs(kernel_alignment(onehot @ onehot.T, y) - 1.0) < 1e-12


def test_activation_pattern_distance_by_hand():
    a = make_mlp([2, 3, 2], seed=0)
    b = make_mlp([2, 3, 2], seed=0)
    x = torch.randn(10, 2)
    assert activation_pattern_distance(a, b, x) == 0.0
    with torch.no_grad():
        b[0].weight[0].neg_()
        b[0].bias[0].neg_()  # unit 0 flips exactly where its pre-activation is nonzero
    pre = x @ a[0].weight[0] + a[0].bias[0]
    expected = float((pre != 0).float().sum()) / (10 * 3)
    assert abs(activation_pattern_distance(a, b, x) - expected) < 1e-9


def test_ntk_regression_equals_closed_form():
    model = make_mlp([4, 8, 3], seed=1).double()
    gen = torch.Generator().manual_seed(2)
    xtr = torch.randn(12, 4, generator=gen, dtype=torch.float64)
    xte = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    ytr, yte = torch.randint(0, 3, (12,), generator=gen), torch.randint(0, 3, (5,), generator=gen)
    ref_tr, ref_te = explicit_ntk(model, xtr, xtr), explicit_ntk(model, xte, xtr)
    ktr = sum(ref_tr[:, a, :, a] for a in range(3)).numpy()
    kte = sum(ref_te[:, a, :, a] for a in range(3)).numpy()
    import numpy as np

    lam = 1e-3 * ktr.diagonal().mean()
    scores = kte @ np.linalg.inv(ktr + lam * np.eye(12)) @ np.eye(3)[ytr.numpy()]
    expected = float((scores.argmax(1) == yte.numpy()).mean())
    got = ntk_regression(model, xtr, ytr, xte, yte, ridge=1e-3)
    assert got.accuracy == expected
    assert np.allclose(kernel_ridge_predict(torch.from_numpy(ktr), ytr, torch.from_numpy(kte), 3).numpy(), scores)


def test_linearized_model_is_first_order_taylor():
    model = make_mlp([4, 8, 3], seed=1).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    lin = linearize(model)
    assert torch.allclose(lin(x), model(x), atol=1e-12)
    with torch.no_grad():
        for p in lin.weights:
            p.add_(1e-4)
    shifted = make_mlp([4, 8, 3], seed=1).double()
    with torch.no_grad():
        for p in shifted.parameters():
            p.add_(1e-4)
    # f(w + d) - f_lin(w + d) = O(|d|^2)
    assert (shifted(x) - lin(x)).abs().max() < 1e-6 < (shifted(x) - model(x)).abs().max()


class TinyCNN(nn.Module):
    """Conv2d layers with zero, 'same' (asymmetric for an even kernel), strided, dilated and circular padding,
    with and without bias, a LayerNorm (fallback) and a Linear head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 3, 2, padding="same", bias=False)
        self.c3 = nn.Conv2d(3, 4, 3, stride=2, dilation=1, padding=1, padding_mode="circular")
        self.c4 = nn.Conv2d(4, 2, 2, dilation=2)
        self.norm = nn.LayerNorm(2)
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        h = torch.tanh(self.c2(torch.tanh(self.c1(x))))
        h = torch.tanh(self.c4(torch.tanh(self.c3(h))))  # [n, 2, 1, 1] from 6x6 inputs
        return self.head(self.norm(h.flatten(1)))


@pytest.fixture(scope="module")
def cnn():
    model = TinyCNN().double().eval()
    gen = torch.Generator().manual_seed(3)
    x1 = torch.randn(4, 2, 6, 6, generator=gen, dtype=torch.float64)
    x2 = torch.randn(3, 2, 6, 6, generator=gen, dtype=torch.float64)
    return model, x1, x2, explicit_ntk(model, x1, x1), explicit_ntk(model, x1, x2)


@pytest.mark.parametrize("order", ["gram", "factor", "auto"])
def test_structured_conv_rule_equals_explicit_jacobian_product(cnn, order):
    from evaluations.probes.ntk_structured import layer_factors, ntk_structured

    model, x1, x2, ref11, ref12 = cnn
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert set(layer_factors(model, x1, convs, chunk=3)) == set(convs)  # every conv takes the structured rule
    for x_b, ref in ((None, ref11), (x2, ref12)):
        n1, c, n2, _ = ref.shape
        expected = {"full": ref.reshape(n1 * c, n2 * c), "block": torch.stack([ref[:, a, :, a] for a in range(c)]),
                    "trace": sum(ref[:, a, :, a] for a in range(c))}
        for kind, want in expected.items():
            for max_bytes in (2e9, 3e3):  # one block, and many (mirrored when x_b is None)
                got = ntk_structured(model, x1, x_b, kind=kind, chunk=3, max_bytes=max_bytes, order=order)
                assert float((got - want).norm() / want.norm()) < 1e-5, (kind, max_bytes)
                assert torch.allclose(got, want, atol=1e-10)


def test_structured_conv_float32_within_1e5_relative(cnn):
    model, x1, _, ref11, _ = cnn
    n1, c = ref11.shape[:2]
    got = empirical_ntk(copy.deepcopy(model).float(), x1.float(), kind="full", method="structured")
    assert float((got.double() - ref11.reshape(n1 * c, n1 * c)).norm() / ref11.norm()) < 1e-5


def test_linearized_model_trains_like_the_explicit_linear_model():
    """Two SGD steps on f_lin with cross-entropy equal two steps on f_0 + J (w - w_0) with J formed explicitly."""
    model = make_mlp([4, 8, 3], seed=1).double()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=gen)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(flat):
        parts = torch.split(flat, [s.numel() for s in shapes])
        return functional_call(model, {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}, (x,))

    f0 = f(w0).detach()
    jac = torch.autograd.functional.jacobian(f, w0).reshape(6 * 3, -1)  # [n*C, P]
    w = w0.clone()
    onehot = torch.nn.functional.one_hot(y, 3).double()
    for _ in range(2):
        logits = f0 + (jac @ (w - w0)).reshape(6, 3)
        w = w - 0.3 * jac.T @ ((torch.softmax(logits, -1) - onehot) / 6).reshape(-1)
    lin = linearize(model)
    assert [n for n, _ in lin.named_parameters()] == [f"weights.{i}" for i in range(len(names))]
    opt = torch.optim.SGD(lin.parameters(), lr=0.3)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(lin(x), y).backward()
        opt.step()
    got = torch.cat([p.detach().reshape(-1) for p in lin.parameters()])
    assert torch.allclose(got, w, atol=1e-12) and not torch.allclose(w, w0)
