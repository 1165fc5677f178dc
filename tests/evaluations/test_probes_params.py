"""The one parameter-selection rule (regex, names, prefixes, modules, tensors) and its use by every NTK method
and the Hessian operator; a selection that matches nothing is a one-line error naming it."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from evaluations.probes import HessianOperator, empirical_ntk
from evaluations.probes.params import select_params
from taxonomy.errors import BasinError


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(3, 4)
        self.fc10 = nn.Linear(4, 4)
        self.block = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.frozen(self.block(torch.tanh(self.fc10(torch.tanh(self.fc1(x))))))


@pytest.fixture(scope="module")
def net():
    return Net().double()


def test_every_form_of_selection(net):
    assert select_params(net, None) == [n for n, _ in net.named_parameters() if not n.startswith("frozen")]
    assert select_params(net, "fc1") == ["fc1.weight", "fc1.bias"]  # a dotted prefix: not fc10
    assert select_params(net, "fc1.") == ["fc1.weight", "fc1.bias"]
    assert select_params(net, r"fc1\d*") == ["fc1.weight", "fc1.bias", "fc10.weight", "fc10.bias"]
    assert select_params(net, r".*\.bias") == ["fc1.bias", "fc10.bias", "block.0.bias", "block.2.bias"]
    assert select_params(net, r"block\.[02]\.weight") == ["block.0.weight", "block.2.weight"]
    assert select_params(net, ["block.2", "fc1.weight"]) == ["fc1.weight", "block.2.weight", "block.2.bias"]
    assert select_params(net, ("fc10.bias",)) == ["fc10.bias"]
    assert select_params(net, net.block[2]) == ["block.2.weight", "block.2.bias"]
    assert select_params(net, [net.fc1, net.block[0].bias, "fc1"]) == ["fc1.weight", "fc1.bias", "block.0.bias"]
    assert select_params(net, net.fc10.weight) == ["fc10.weight"]


@pytest.mark.parametrize("bad, named", [
    ("nothing", "'nothing'"),
    (["fc1", "fc2"], "'fc2'"),  # every entry must select something
    ("frozen", "'frozen'"),  # not trainable
    ("frozen module", "module 'frozen' (Linear) selects no trainable parameter"),
    (nn.Linear(3, 4), "Linear module is not part of the model"),
    (torch.zeros(3), "tensor of shape (3,) is not part of the model"),
    ("fc1(", "not a valid regular expression"),
    ([], "empty selection"),
    (3, "got int"),
])
def test_a_selection_matching_nothing_is_a_one_line_error_naming_it(net, bad, named):
    bad = net.frozen if isinstance(bad, str) and bad == "frozen module" else bad
    with pytest.raises(BasinError) as err:
        select_params(net, bad)
    assert named in str(err.value) and "\n" not in str(err.value)


def reference_trace_ntk(model, x, names):
    """sum_a J_a(x) J_a(x)^T over the named parameters, from torch.autograd.functional.jacobian per example."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def jac(xi):
        def f(*ps):
            return functional_call(model, {**params, **dict(zip(names, ps))}, (xi[None],))[0]

        parts = torch.autograd.functional.jacobian(f, tuple(params[n] for n in names))
        return torch.cat([j.reshape(j.shape[0], -1) for j in parts], 1)

    j = torch.stack([jac(xi) for xi in x])  # [n, C, P]
    return torch.einsum("iap,jap->ij", j, j)


@pytest.mark.parametrize("method", ["structured", "jacobian", "ntk_vp"])
def test_every_ntk_method_takes_every_form(net, method):
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    forms = {r"fc1\d*": ["fc1.weight", "fc1.bias", "fc10.weight", "fc10.bias"],
             "block.2": ["block.2.weight", "block.2.bias"],
             ("fc1.weight", "block.0"): ["fc1.weight", "block.0.weight", "block.0.bias"],
             "mods": ["fc10.weight", "fc10.bias", "block.2.bias"]}
    for form, names in forms.items():
        sel = [net.fc10, net.block[2].bias] if form == "mods" else list(form) if isinstance(form, tuple) else form
        got = empirical_ntk(net, x, kind="trace", method=method, params=sel)
        want = reference_trace_ntk(net, x, names)
        assert float((got - want).norm() / want.norm()) < 1e-10, form
    with pytest.raises(BasinError, match="'fc2'"):
        empirical_ntk(net, x, kind="trace", method=method, params=["fc1", "fc2"])


def test_hessian_operator_takes_the_same_rule(net):
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0])
    op = HessianOperator(net, nn.CrossEntropyLoss(), (x, y), params=[net.fc10, "block.2.bias"])
    assert op.names == ["fc10.weight", "fc10.bias", "block.2.bias"]
    assert HessianOperator(net, nn.CrossEntropyLoss(), (x, y), params=r".*\.bias").size == 4 + 4 + 4 + 2
    with pytest.raises(BasinError, match="'fc3'"):
        HessianOperator(net, nn.CrossEntropyLoss(), (x, y), params="fc3")
