"""Permutation alignment on MLPs, CNNs with BatchNorm and ResNets: specs, solvers, REPAIR, errors."""

from __future__ import annotations

import inspect
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from evaluations.digits import make_mlp, train_classifier
from merging.alignment import (
    PermutationSpec,
    activation_matching,
    apply_permutation,
    infer_spec,
    invert,
    random_permutation,
    repair,
    reset_bn_stats,
    spec_from_groups,
    weight_matching,
)
from taxonomy.errors import BasinError


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread avoids oversubscription on the shared 2-core machine (30x slower there)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class ConvBN(nn.Module):
    def __init__(self, w: int = 4):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w)
        self.c2, self.b2 = nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(2 * w * 16, 10)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = self.pool(torch.relu(self.b2(self.c2(x))))
        return self.fc(torch.flatten(x, 1))


class TinyResNet(nn.Module):
    def __init__(self, w: int = 4):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w)
        self.a1, self.bn1 = nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w)
        self.a2, self.bn2 = nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w)
        self.down, self.bnd = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * w)
        self.short = nn.Conv2d(w, 2 * w, 1, stride=2, bias=False)
        self.head = nn.Linear(2 * w, 10)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(x + self.bn2(self.a2(torch.relu(self.bn1(self.a1(x))))))
        x = torch.relu(self.bnd(self.down(x)) + self.short(x))
        return self.head(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


FAMILIES = {
    "mlp": (lambda s: make_mlp([64, 12, 10, 10], seed=s), lambda: torch.randn(7, 64)),
    "cnn_bn": (lambda s: (torch.manual_seed(s), _randomize_bn(ConvBN(), s))[1], lambda: torch.randn(5, 1, 8, 8)),
    "resnet": (lambda s: (torch.manual_seed(s), _randomize_bn(TinyResNet(), s))[1], lambda: torch.randn(5, 1, 8, 8)),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_random_permutation_keeps_outputs(family):
    make, data = FAMILIES[family]
    model = make(0).eval()
    spec = infer_spec(model)
    assert spec.sizes, "inference found no permutation"
    perms = random_permutation(spec, seed=3)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    permuted = make(1).eval()
    permuted.load_state_dict(apply_permutation(model.state_dict(), spec, perms))
    x = data()
    torch.testing.assert_close(permuted(x), model(x), atol=1e-5, rtol=1e-5)
    assert not torch.equal(permuted.state_dict()[next(iter(spec.axes))], model.state_dict()[next(iter(spec.axes))])


def test_resnet_spec_shares_the_residual_stream():
    spec = infer_spec(TinyResNet().eval())
    stream = spec.axes["stem.weight"][0]
    assert spec.axes["a2.weight"][0] == stream and spec.axes["bn2.weight"][0] == stream
    assert spec.axes["a1.weight"][0] != stream  # the block's inner channels are free
    assert spec.axes["down.weight"][0] == spec.axes["short.weight"][0]
    assert spec.axes["head.weight"] == (None, spec.axes["down.weight"][0])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_weight_matching_recovers_a_known_permutation(family):
    make, _ = FAMILIES[family]
    model = make(0)
    spec = infer_spec(model)
    perms = random_permutation(spec, seed=5)
    state = model.state_dict()
    permuted = apply_permutation(state, spec, perms)
    result = weight_matching(state, permuted, spec, seed=0)
    assert result.converged
    for g, p in perms.items():
        assert torch.equal(result.perms[g], torch.argsort(p)), g
    back = apply_permutation(permuted, spec, result.perms)
    for name in state:
        assert torch.equal(back[name], state[name]), name
    assert result.to_json()["converged"] is True


def _objective(a: dict, b: dict) -> float:
    return float(sum((a[k].double() * b[k].double()).sum() for k in a if a[k].is_floating_point()))


def test_single_hidden_layer_matches_brute_force():
    a, b = make_mlp([6, 5, 3], seed=0).state_dict(), make_mlp([6, 5, 3], seed=1).state_dict()
    spec = infer_spec(make_mlp([6, 5, 3]))
    best = -np.inf
    for p in itertools.permutations(range(5)):
        idx = torch.tensor(p)
        pb = {"0.weight": b["0.weight"][idx], "0.bias": b["0.bias"][idx], "2.weight": b["2.weight"][:, idx],
              "2.bias": b["2.bias"]}
        best = max(best, _objective(a, pb))
    result = weight_matching(a, b, spec, seed=0)
    assert _objective(a, apply_permutation(b, spec, result.perms)) == pytest.approx(best, rel=1e-9)
    aligned = apply_permutation(b, spec, result.perms)
    permuted_only = [k for k in a if k != "2.bias"]  # the objective counts parameters with a permuted axis
    expected = _objective({k: a[k] for k in permuted_only}, {k: aligned[k] for k in permuted_only})
    assert result.objective[-1] == pytest.approx(expected, rel=1e-5)


def test_two_hidden_layers_against_brute_force():
    widths = [5, 4, 4, 3]
    a, b = make_mlp(widths, seed=2).state_dict(), make_mlp(widths, seed=3).state_dict()
    spec = infer_spec(make_mlp(widths))
    scores = []
    for p1 in itertools.permutations(range(4)):
        for p2 in itertools.permutations(range(4)):
            i1, i2 = torch.tensor(p1), torch.tensor(p2)
            pb = dict(b)
            pb["0.weight"], pb["0.bias"] = b["0.weight"][i1], b["0.bias"][i1]
            pb["2.weight"], pb["2.bias"] = b["2.weight"][i2][:, i1], b["2.bias"][i2]
            pb["4.weight"] = b["4.weight"][:, i2]
            scores.append(_objective(a, pb))
    got = _objective(a, apply_permutation(b, spec, weight_matching(a, b, spec, seed=0).perms))
    assert got <= max(scores) + 1e-9
    assert got >= _objective(a, b) - 1e-9
    # coordinate descent ends in a point no single-group change improves: at least the median
    assert got >= float(np.median(scores))


def test_weight_matching_is_deterministic_given_a_seed():
    a, b = make_mlp([64, 32, 32, 32, 10], seed=0).state_dict(), make_mlp([64, 32, 32, 32, 10], seed=1).state_dict()
    spec = infer_spec(make_mlp([64, 32, 32, 32, 10]))
    r1, r2 = weight_matching(a, b, spec, seed=7), weight_matching(a, b, spec, seed=7)
    assert all(torch.equal(r1.perms[g], r2.perms[g]) for g in spec.groups)
    assert r1.objective == r2.objective
    assert all(y >= x - 1e-9 for x, y in zip(r1.objective, r1.objective[1:]))


def test_declarative_spec_and_its_errors():
    shapes = {"w1": (8, 4), "b1": (8,), "w2": (3, 8)}
    spec = spec_from_groups({"h": {"w1": 0, "b1": 0, "w2": 1}}, shapes)
    assert spec.axes == {"w1": ("h", None), "b1": ("h",), "w2": (None, "h")} and spec.sizes == {"h": 8}
    with pytest.raises(BasinError, match="axis 2 of parameter 'w1'"):
        spec_from_groups({"h": {"w1": 2}}, shapes)
    with pytest.raises(BasinError, match="'w9'"):
        spec_from_groups({"h": {"w9": 0}}, shapes)
    with pytest.raises(BasinError, match="unknown group 'g'"):
        PermutationSpec({"w1": ("g", None)}, {"h": 8})
    state = {"w1": torch.zeros(8, 4), "b1": torch.zeros(8)}
    with pytest.raises(BasinError, match="'w2', which is missing"):
        apply_permutation(state, spec, random_permutation(spec))
    state["w2"] = torch.zeros(3, 8, 1)
    with pytest.raises(BasinError, match="'w2' has 3 axes"):
        apply_permutation(state, spec, random_permutation(spec))
    assert PermutationSpec.from_json(spec.to_json()) == spec


def test_different_architectures_are_refused():
    spec = infer_spec(make_mlp([64, 12, 10]))
    a = make_mlp([64, 12, 10], seed=0).state_dict()
    with pytest.raises(BasinError, match="differ in shape at tensor '0.weight'"):
        weight_matching(a, make_mlp([64, 12, 10], seed=0).state_dict() | {"0.weight": torch.zeros(12, 63)}, spec)
    with pytest.raises(BasinError, match="only one of them"):
        weight_matching(a, make_mlp([64, 12, 12, 10], seed=0).state_dict(), spec)


def test_inference_refuses_what_it_cannot_prove():
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(6, 2)

        def forward(self, x):
            return self.c(torch.cat([self.a(x), self.b(x)], -1))

    with pytest.raises(BasinError, match="cat"):
        infer_spec(Cat())
    with pytest.raises(BasinError, match="GroupNorm"):
        infer_spec(nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(144, 2)))


def test_activation_matching_recovers_a_known_permutation(digits):
    for make, x in ((FAMILIES["mlp"][0], digits.x_train[:200]),
                    (FAMILIES["cnn_bn"][0], digits.x_train[:100].reshape(-1, 1, 8, 8))):
        model = make(0)
        spec = infer_spec(model)
        perms = random_permutation(spec, seed=2)
        other = make(1)
        other.load_state_dict(apply_permutation(model.state_dict(), spec, perms))
        result = activation_matching(model, other, spec, x)
        for g in perms:
            assert torch.equal(result.perms[g], invert(perms)[g]), g
        assert result.method == "activation_matching"


def test_activation_matching_rejects_data_of_the_wrong_shape():
    model = make_mlp([64, 12, 10], seed=0)
    spec = infer_spec(model)
    with pytest.raises(BasinError, match=r"batch of shape \[\(5, 63\)\] does not fit model A"):
        activation_matching(model, make_mlp([64, 12, 10], seed=1), spec, torch.randn(5, 63))


def test_matchers_take_weight_matchings_argument_order_and_reject_the_old_one(digits):
    """(A, B, spec, data) like weight_matching(A, B, spec); the old (A, B, data, spec) order is a TypeError."""
    from merging.alignment import ste_matching

    a, b = make_mlp([64, 12, 10], seed=0), make_mlp([64, 12, 10], seed=1)
    spec = infer_spec(a)
    x, y = digits.x_train[:64], digits.y_train[:64]
    assert list(inspect.signature(activation_matching).parameters)[:4] == ["model_a", "model_b", "spec", "data"]
    assert list(inspect.signature(ste_matching).parameters)[:4] == ["model_a", "model_b", "spec", "data"]
    assert list(inspect.signature(weight_matching).parameters)[:3] == ["state_a", "state_b", "spec"]
    with pytest.raises(TypeError, match=r"activation_matching: spec must be a PermutationSpec, got Tensor "
                                        r"\(spec and data look swapped"):
        activation_matching(a, b, x, spec)
    with pytest.raises(TypeError, match=r"ste_matching: spec must be a PermutationSpec, got tuple \(spec and data"):
        ste_matching(a, b, (x, y), spec, steps=1)
    with pytest.raises(TypeError, match="spec must be a PermutationSpec, got dict$"):
        activation_matching(a, b, {"input_ids": x}, {"not": "a spec"})
    assert activation_matching(a, b, spec, x).perms.keys() == set(spec.groups)


def _loss(model, x, y):
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(x), y))


def _midpoint(widths, a, b, spec, perms):
    mid = make_mlp(widths)
    pb = apply_permutation(b.state_dict(), spec, perms)
    mid.load_state_dict({k: (v + pb[k]) / 2 for k, v in a.state_dict().items()})
    aligned_b = make_mlp(widths)
    aligned_b.load_state_dict(pb)
    return mid, aligned_b


def test_repair_restores_unit_statistics_and_lowers_the_loss(digits):
    widths = [64, 32, 32, 10]
    x, y = digits.train
    a = train_classifier(make_mlp(widths, seed=0), x, y, epochs=8, seed=0)
    b = train_classifier(make_mlp(widths, seed=1), x, y, epochs=8, seed=1)
    spec = infer_spec(a)
    perms = weight_matching(a.state_dict(), b.state_dict(), spec).perms
    mid, aligned_b = _midpoint(widths, a, b, spec, perms)
    before = _loss(mid, x, y)
    repair(mid, a, aligned_b, x, alpha=0.5)
    assert _loss(mid, x, y) < before
    # independent check at the second hidden layer: mean/std equal the endpoints' average
    with torch.no_grad():
        def pre(model):
            h = torch.relu(model[0](x))
            return model[2](h)
        goal_mean = (pre(a).mean(0) + pre(aligned_b).mean(0)) / 2
        goal_std = (pre(a).std(0, unbiased=False) + pre(aligned_b).std(0, unbiased=False)) / 2
        torch.testing.assert_close(pre(mid).mean(0), goal_mean, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(pre(mid).std(0, unbiased=False), goal_std, atol=1e-4, rtol=1e-3)
    with pytest.raises(BasinError, match="alpha"):
        repair(mid, a, aligned_b, x, alpha=1.5)


def test_reset_bn_stats_matches_the_batch_statistics():
    torch.manual_seed(0)
    model = _randomize_bn(ConvBN(), 0)
    x = torch.randn(64, 1, 8, 8)
    reset_bn_stats(model, [x[:32], x[32:]])
    with torch.no_grad():
        h = model.c1(x)
    torch.testing.assert_close(model.b1.running_mean, h.mean((0, 2, 3)), atol=1e-5, rtol=1e-5)
    var = h.var((0, 2, 3), unbiased=True)  # each batch's unbiased variance, averaged over two equal batches
    halves = [model.c1(x[:32]).var((0, 2, 3)), model.c1(x[32:]).var((0, 2, 3))]
    torch.testing.assert_close(model.b1.running_var, (halves[0] + halves[1]).detach() / 2, atol=1e-4, rtol=1e-4)
    assert var.shape == model.b1.running_var.shape
    with pytest.raises(BasinError, match="no BatchNorm"):
        reset_bn_stats(make_mlp([4, 3]), torch.randn(2, 4))


def test_align_n_models_to_one_reference():
    from merging.alignment import align_states

    widths = [64, 12, 10, 10]
    ref = make_mlp(widths, seed=0).state_dict()
    spec = infer_spec(make_mlp(widths))
    copies = [apply_permutation(ref, spec, random_permutation(spec, seed=s)) for s in (1, 2, 3)]
    aligned, results = align_states([copies[0], ref, copies[1], copies[2]], 1, spec, {"seed": 0})
    assert len(results) == 3
    for state in aligned:
        for name in ref:
            assert torch.equal(state[name], ref[name]), name


def test_ste_matching_recovers_a_copy_and_beats_naive_averaging(digits):
    from merging.alignment import ste_matching

    widths = [64, 32, 32, 10]
    x, y = digits.train
    a = train_classifier(make_mlp(widths, seed=0), x, y, epochs=6, seed=0)
    spec = infer_spec(a)
    perms = random_permutation(spec, seed=1)
    copy = make_mlp(widths)
    copy.load_state_dict(apply_permutation(a.state_dict(), spec, perms))
    result = ste_matching(a, copy, spec, (x[:256], y[:256]), steps=3)
    for g, p in perms.items():
        assert torch.equal(result.perms[g], torch.argsort(p)), g
    b = train_classifier(make_mlp(widths, seed=1), x, y, epochs=6, seed=1)
    result = ste_matching(a, b, spec, [(x[:512], y[:512]), (x[512:1024], y[512:1024])], steps=10, lr=1e-2)
    naive, _ = _midpoint(widths, a, b, spec, {g: torch.arange(n) for g, n in spec.sizes.items()})
    ste_mid, _ = _midpoint(widths, a, b, spec, result.perms)
    assert _loss(ste_mid, x, y) < _loss(naive, x, y)
    assert result.method == "ste" and len(result.objective) == 10
