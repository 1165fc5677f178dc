"""Every NTK method and kind against an explicit Jacobian product (float64) on models with in-place operations
(ReLU(inplace=True), F.relu_, residual x += f(x)), GELU, a residual CNN and a batch-first transformer layer."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from evaluations.probes import empirical_ntk
from evaluations.probes.ntk import empirical_ntk_result
from tests.evaluations.test_probes_ntk import explicit_ntk


class InplaceMLP(nn.Module):
    """nn.ReLU(inplace=True) after each hidden Linear: it overwrites the Linear's output."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 5), nn.ReLU(inplace=True),
                                 nn.Linear(5, 3))

    def forward(self, x):
        return self.net(x)


class ResidualGELU(nn.Module):
    """x += f(x) on a Linear's output, then F.relu_ on it, then GELU."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        h += self.b(torch.relu(h))
        F.relu_(h)
        return self.c(F.gelu(h))


class ResidualCNN(nn.Module):
    """A basic residual block: conv, ReLU(inplace), conv, out += identity, ReLU(inplace); a Linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3, padding=1)
        self.c1 = nn.Conv2d(3, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x):
        identity = self.relu(self.stem(x))
        out = self.relu(self.c1(identity))
        out = self.c2(out)
        out += identity
        out = self.relu(out)
        return self.head(out.flatten(1))


class Transformer(nn.Module):
    """nn.TransformerEncoderLayer (batch_first: its eval fast path and fused attention) and a Linear head."""

    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.enc(x).mean(1))


SHAPES = {InplaceMLP: (4,), ResidualGELU: (4,), ResidualCNN: (2, 4, 4), Transformer: (3, 8)}


@pytest.fixture(scope="module", params=list(SHAPES), ids=lambda c: c.__name__)
def case(request):
    torch.manual_seed(0)
    model = request.param().double().eval()
    gen = torch.Generator().manual_seed(1)
    shape = SHAPES[request.param]
    x1 = torch.randn(3, *shape, generator=gen, dtype=torch.float64)
    x2 = torch.randn(2, *shape, generator=gen, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the transformer's nested-tensor notice
        return model, x1, x2, explicit_ntk(model, x1, x1), explicit_ntk(model, x1, x2)


def _expected(ref):
    n1, c, n2, _ = ref.shape
    return {"full": ref.reshape(n1 * c, n2 * c), "block": torch.stack([ref[:, a, :, a] for a in range(c)]),
            "trace": sum(ref[:, a, :, a] for a in range(c))}


@pytest.mark.parametrize("method", ["auto", "structured", "jacobian", "ntk_vp"])
def test_every_method_and_kind_equals_explicit_jacobian_product(case, method):
    model, x1, x2, ref11, ref12 = case
    for x_b, ref in ((None, ref11), (x2, ref12)):
        for kind, want in _expected(ref).items():
            with warnings.catch_warnings():  # no fallback warning: the hooks see through in-place operations
                warnings.filterwarnings("error", message="empirical NTK")
                got = empirical_ntk(model, x1, x_b, kind=kind, method=method, chunk=2)
            assert float((got - want).norm() / want.norm()) < 1e-10, (kind, x_b is None)


def test_structured_takes_every_linear_and_conv_it_can(case):
    model, x1, *_ = case
    res = empirical_ntk_result(model, x1, kind="trace")
    structured = {n for n, m in res.methods.items() if m == "structured"}
    expected = {n for n, _ in model.named_parameters() if not n.startswith("enc.") or ".linear" in n}
    if isinstance(model, Transformer):  # out_proj is never called as a module: the fast path's weights
        assert set(res.fallbacks) == {"enc.self_attn.out_proj"} and "0 times" in res.fallbacks["enc.self_attn.out_proj"]
        expected -= {"enc.norm1.weight", "enc.norm1.bias", "enc.norm2.weight", "enc.norm2.bias"}
    else:
        assert res.fallbacks == {} and not res.fell_back
    assert structured == expected
    assert res.to_json()["methods"] == res.methods and "kernel" not in res.to_json()


class WeightReuse(nn.Module):
    """fc's weight is also used outside fc (functionally), and b shares a's weight: the hooks cannot see either."""

    def __init__(self):
        super().__init__()
        self.fc, self.a, self.b, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        h = self.fc(x)
        h = h + F.linear(torch.tanh(h), self.fc.weight)
        h = self.b(torch.tanh(self.a(h)))
        return self.head(torch.tanh(h))


def test_a_layer_the_hooks_cannot_account_for_falls_back_with_a_warning():
    torch.manual_seed(0)
    model = WeightReuse().double()
    x = torch.randn(4, 4, dtype=torch.float64)
    ref = explicit_ntk(model, x, x)
    with pytest.warns(UserWarning, match="layer 'fc'.*differs from autograd"):
        res = empirical_ntk_result(model, x, kind="full", method="structured")
    assert set(res.fallbacks) == {"fc", "a"}  # b's weight is a's (named once, a.weight); b's bias is exact
    assert res.methods["fc.weight"] == res.methods["a.weight"] == "jacobian"
    assert res.methods["b.bias"] == res.methods["head.weight"] == "structured"
    n, c = ref.shape[:2]
    assert float((torch.from_numpy(res.kernel) - ref.reshape(n * c, n * c)).norm() / ref.norm()) < 1e-10


def _trace(ref):
    return sum(ref[:, a, :, a] for a in range(ref.shape[1]))


def test_ntk_regression_and_tracker_kernels_on_an_inplace_model():
    from evaluations.probes import kernel_distance
    from evaluations.probes.linearize import kernel_ridge_predict, ntk_regression
    from evaluations.tracking import Tracker

    torch.manual_seed(0)
    model = InplaceMLP().double()
    gen = torch.Generator().manual_seed(2)
    xtr = torch.randn(8, 4, generator=gen, dtype=torch.float64)
    xte = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    ytr, yte = torch.randint(0, 3, (8,), generator=gen), torch.randint(0, 3, (5,), generator=gen)
    scores = kernel_ridge_predict(_trace(explicit_ntk(model, xtr, xtr)), ytr, _trace(explicit_ntk(model, xte, xtr)), 3)
    assert ntk_regression(model, xtr, ytr, xte, yte).accuracy == float((scores.argmax(1) == yte).double().mean())

    tracker = Tracker(probe=(xte, yte), hessian=False, barriers=False)
    k0 = _trace(explicit_ntk(model, xte, xte))
    tracker.record(model, 0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5).add_(0.1)
    rec = tracker.record(model, 1)
    expected = kernel_distance(k0, _trace(explicit_ntk(model, xte, xte)))
    assert expected > 1e-3 and abs(rec.kernel_from_init - expected) < 1e-10 and "ntk_fallbacks" not in rec.extra


@pytest.mark.parametrize("make", [InplaceMLP, ResidualCNN], ids=lambda c: c.__name__)
def test_float32_structured_within_1e5_of_the_float64_reference_without_fallback(make):
    torch.manual_seed(0)
    model = make().double().eval()
    x = torch.randn(4, *SHAPES[make], generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    want = _expected(explicit_ntk(model, x, x))["full"]
    res = empirical_ntk_result(model.float(), x.float(), kind="full", method="structured")
    kernel = res.kernel  # float64 holding float32 values: computed in the model's dtype
    assert res.fallbacks == {} and kernel.dtype == np.float64 and np.array_equal(kernel.astype(np.float32), kernel)
    assert float((torch.from_numpy(kernel) - want).norm() / want.norm()) < 1e-5
