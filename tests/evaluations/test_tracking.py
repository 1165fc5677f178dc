"""Tracker and spawn smoke tests on a tiny MLP and a slice of digits."""

import torch

from evaluations.digits import load_digits_split, make_mlp
from evaluations.tracking import Tracker, spawn, train_epochs


def test_tracker_records_every_probe(tmp_path):
    data = load_digits_split()
    train = (data.x_train[:80], data.y_train[:80])
    test = (data.x_test[:40], data.y_test[:40])
    model = make_mlp([64, 16, 10], seed=0)
    tracker = Tracker(probe=test, train=train, test=test, checkpoint_dir=str(tmp_path))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    first = tracker.record(model, 0)
    train_epochs(model, opt, *train, 1, 16, gen)
    second = tracker.record(model, 1)
    assert first.weight_from_init == 0.0 and abs(first.kernel_from_init) < 1e-12
    w0 = torch.cat([p.reshape(-1) for p in make_mlp([64, 16, 10], seed=0).parameters()])
    w1 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert abs(second.weight_from_init - float((w1 - w0).norm())) < 1e-5
    assert second.kernel_velocity is not None and second.kernel_velocity > 0
    assert second.top_eigenvalue_converged and second.top_eigenvalue > 0
    assert 0 <= second.ntk_accuracy <= 1 and second.barrier_to_prev is not None
    assert len(list(tmp_path.glob("*.pt"))) == 2 and len(tracker.to_json()["records"]) == 2


def test_spawn_children_differ_and_barrier_is_frankle_form():
    data = load_digits_split()
    train = (data.x_train[:120], data.y_train[:120])
    test = (data.x_test[:60], data.y_test[:60])
    result = spawn(lambda: make_mlp([64, 16, 10], seed=0), train, test, spawn_epoch=0.5, total_epochs=2,
                   batch_size=32, alphas=5)
    a, b = result.children
    assert not torch.equal(a[0].weight, b[0].weight)
    assert result.barrier >= -1e-9 and len(result.child_errors) == 2
    assert set(result.to_json()) == {"spawn_epoch", "barrier", "child_errors"}
