"""Tracker and spawn on a tiny MLP and a slice of digits; barriers against a hand-written Frankle barrier."""

import copy

import pytest
import torch

from evaluations.digits import load_digits_split, make_mlp
from evaluations.tracking import Tracker, spawn, train_epochs
from taxonomy.errors import BasinError


def manual_error_barrier(a, b, x, y, alphas):
    """max over evenly spaced alphas of the error of (1 - alpha) w_a + alpha w_b, minus the endpoints' mean."""
    errors = []
    for alpha in torch.linspace(0, 1, alphas, dtype=torch.float64).tolist():
        mid = copy.deepcopy(a)
        with torch.no_grad():
            for pm, pa, pb in zip(mid.parameters(), a.parameters(), b.parameters()):
                pm.copy_((1 - alpha) * pa + alpha * pb)
            errors.append(float((mid(x).argmax(-1) != y).double().mean()))
    return max(errors) - 0.5 * (errors[0] + errors[-1])


@pytest.fixture(scope="module")
def digits():
    data = load_digits_split()
    return (data.x_train[:80], data.y_train[:80]), (data.x_test[:40], data.y_test[:40])


def test_tracker_records_every_probe(tmp_path, digits):
    train, test = digits
    model = make_mlp([64, 16, 10], seed=0)
    tracker = Tracker(probe=test, train=train, test=test, checkpoint_dir=str(tmp_path))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    first = tracker.record(model, 0)
    train_epochs(model, opt, *train, 1, 16, gen)
    second = tracker.record(model, 1)
    assert first.weight_from_init == 0.0 and abs(first.kernel_from_init) < 1e-12
    w0 = torch.cat([p.detach().reshape(-1) for p in make_mlp([64, 16, 10], seed=0).parameters()])
    w1 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert abs(second.weight_from_init - float((w1 - w0).norm())) < 1e-5
    assert second.kernel_velocity is not None and second.kernel_velocity > 0
    assert second.top_eigenvalue_converged and second.top_eigenvalue > 0
    assert 0 <= second.ntk_accuracy <= 1 and second.barrier_to_prev is not None
    assert len(list(tmp_path.glob("*.pt"))) == 2 and len(tracker.to_json()["records"]) == 2


def _run(tracker, train, epochs):
    model = make_mlp([64, 16, 10], seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    done, models = 0.0, []
    for t in epochs:
        train_epochs(model, opt, *train, t - done, 16, gen)
        done = t
        tracker.record(model, t)
        models.append(copy.deepcopy(model).eval())
    return models


def test_barriers_to_all_earlier_checkpoints_match_hand_computation(digits):
    train, test = digits
    epochs = [0, 0.5, 1, 2]
    tracker = Tracker(probe=test, hessian=False, barrier_alphas=7)
    models = _run(tracker, train, epochs)
    for i, rec in enumerate(tracker.records):
        assert set(rec.barriers_to_earlier) == {f"{e:g}" for e in epochs[:i]}
        for j in range(i):
            want = manual_error_barrier(models[j], models[i], *test, alphas=7)
            assert abs(rec.barriers_to_earlier[f"{epochs[j]:g}"] - want) < 1e-9
        if i:
            assert rec.barrier_to_prev == rec.barriers_to_earlier[f"{epochs[i - 1]:g}"]
    got_epochs, matrix = tracker.barrier_matrix()
    assert got_epochs == epochs and all(matrix[i][i] == 0.0 for i in range(4))
    assert matrix[0][3] == matrix[3][0] == tracker.records[3].barriers_to_earlier["0"]
    assert tracker.to_json()["barrier_matrix"]["barriers"] == matrix


def test_barriers_to_a_selected_set_and_to_prev_only(digits):
    train, test = digits
    epochs = [0, 0.5, 1, 2]
    chosen = Tracker(probe=test, hessian=False, barrier_alphas=5, barrier_to=[0, 1])
    models = _run(chosen, train, epochs)
    assert [set(r.barriers_to_earlier) for r in chosen.records] == [set(), {"0"}, {"0"}, {"0", "1"}]
    # the previous checkpoint's barrier is still measured, outside the selected set
    assert abs(chosen.records[2].barrier_to_prev - manual_error_barrier(models[1], models[2], *test, 5)) < 1e-9
    prev = Tracker(probe=test, hessian=False, barrier_alphas=5, barrier_to="prev")
    _run(prev, train, epochs)
    assert [set(r.barriers_to_earlier) for r in prev.records] == [set(), {"0"}, {"0.5"}, {"1"}]
    assert len(prev._snapshots) == 1
    with pytest.raises(BasinError, match="barrier_to"):
        Tracker(probe=test, barrier_to="everything")


def test_spawn_children_differ_and_barrier_is_frankle_form():
    data = load_digits_split()
    train = (data.x_train[:120], data.y_train[:120])
    test = (data.x_test[:60], data.y_test[:60])
    result = spawn(lambda: make_mlp([64, 16, 10], seed=0), train, test, spawn_epoch=0.5, total_epochs=2,
                   batch_size=32, alphas=5)
    a, b = result.children
    assert not torch.equal(a[0].weight, b[0].weight)
    assert abs(result.barrier - manual_error_barrier(a, b, *test, alphas=5)) < 1e-9
    assert len(result.child_errors) == 2
    assert set(result.to_json()) == {"spawn_epoch", "barrier", "child_errors"}
