"""Paths, path evaluation (batched vs loop vs a hand computation), barriers and curve fitting."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from evaluations.digits import load_digits_all, make_mlp, train_classifier
from evaluations.landscape import (
    BezierCurve,
    PathResult,
    PolygonalChain,
    barrier,
    chain_path,
    evaluate_path,
    fit_curve,
    interpolation_barrier,
    linear_path,
)
from taxonomy.errors import BasinError


@pytest.fixture(scope="module")
def data():
    x, y = load_digits_all()
    return x[:600], y[:600]


@pytest.fixture(scope="module")
def two_mlps(data):
    x, y = data
    a = train_classifier(make_mlp([64, 32, 10], seed=0), x, y, epochs=10, lr=3e-3, batch_size=100, seed=0)
    b = train_classifier(make_mlp([64, 32, 10], seed=1), x, y, epochs=10, lr=3e-3, batch_size=100, seed=1)
    return a, b


def manual_path_losses(widths, a, b, alphas, x, y):
    """Independent reference: load each interpolated state into a fresh model and call it."""
    sa, sb = a.state_dict(), b.state_dict()
    losses, accs = [], []
    for al in alphas:
        m = make_mlp(widths)
        m.load_state_dict({k: (1 - al) * sa[k] + al * sb[k] for k in sa})
        with torch.no_grad():
            out = m(x)
        losses.append(float(nn.functional.cross_entropy(out, y)))
        accs.append(float((out.argmax(1) == y).float().mean()))
    return np.array(losses), np.array(accs)


def test_paths_match_formulas():
    a = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, -2.0]), "n": torch.tensor(3)}
    c = {"w": torch.tensor([8.0, 0.0]), "n": torch.tensor(3)}
    assert torch.allclose(linear_path(a, b)(0.25)["w"], torch.tensor([1.0, 1.0]))
    chain = chain_path([a, b, c])
    assert torch.allclose(chain(0.25)["w"], torch.tensor([2.0, 0.0]))  # halfway along a -> b
    assert torch.allclose(chain(0.75)["w"], torch.tensor([6.0, -1.0]))  # halfway along b -> c
    assert torch.allclose(chain(1.0)["w"], c["w"])
    ctrl = {"w": torch.tensor([10.0, 10.0])}
    t = 0.3
    bez = BezierCurve(a, c, control=ctrl, trainable=["w"])(t)["w"]
    assert torch.allclose(bez, (1 - t) ** 2 * a["w"] + 2 * t * (1 - t) * ctrl["w"] + t**2 * c["w"])
    poly = PolygonalChain(a, c, control=ctrl, trainable=["w"])
    assert torch.allclose(poly(0.25)["w"], torch.tensor([5.0, 6.0]))
    assert torch.allclose(poly(0.75)["w"], torch.tensor([9.0, 5.0]))
    stacked = linear_path(a, b).stacked(torch.tensor([0.0, 0.5, 1.0]))
    assert torch.allclose(stacked["w"], torch.stack([a["w"], torch.tensor([2.0, 0.0]), b["w"]]))
    with pytest.raises(BasinError, match="alpha"):
        linear_path(a, b)(1.5)
    with pytest.raises(BasinError, match="'w'"):
        linear_path(a, {"w": torch.zeros(3), "n": torch.tensor(3)})


def test_barrier_of_model_with_itself_is_zero(two_mlps, data):
    a, _ = two_mlps
    bar = interpolation_barrier(a, a, a, data, alphas=7)
    assert bar.value == pytest.approx(0.0, abs=1e-6)
    assert interpolation_barrier(a, a, a, data, alphas=7, kind="error", form="frankle").value == pytest.approx(0.0)


def test_batched_equals_loop_and_hand_computation(two_mlps, data):
    a, b = two_mlps
    x, y = data
    batched = evaluate_path(a, linear_path(a, b), data, alphas=9, batched=True)
    loop = evaluate_path(a, linear_path(a, b), data, alphas=9, batched=False)
    assert batched.batched and not loop.batched
    ref_loss, ref_acc = manual_path_losses([64, 32, 10], a, b, batched.alphas, x, y)
    np.testing.assert_allclose(batched.loss, loop.loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(batched.loss, ref_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(batched.accuracy, ref_acc, atol=1e-9)
    np.testing.assert_allclose(loop.accuracy, ref_acc, atol=1e-9)
    # a DataLoader of uneven minibatches gives the same example-weighted mean
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=128)
    np.testing.assert_allclose(evaluate_path(a, linear_path(a, b), loader, 9, batched=True).loss, ref_loss, rtol=1e-5)


def test_independent_mlps_have_a_clear_barrier(two_mlps, data):
    a, b = two_mlps
    x, y = data
    result = evaluate_path(a, linear_path(a, b), data, alphas=11)
    loss, _ = manual_path_losses([64, 32, 10], a, b, result.alphas, x, y)
    chord = (1 - result.alphas) * loss[0] + result.alphas * loss[-1]
    expected = float(np.max(loss - chord))
    bar = barrier(result)
    assert bar.value == pytest.approx(expected, rel=1e-5)
    assert bar.value > 0.1
    assert 0 < bar.alpha < 1


def test_convex_problem_has_no_barrier():
    """Multinomial logistic regression with L2 is strictly convex: two seeds reach one optimum, no barrier."""
    x, y = load_digits_all()
    x, y = x[:500], y[:500]
    lam = 1e-2

    def fit(seed):
        torch.manual_seed(seed)
        model = nn.Linear(64, 10)
        nn.init.normal_(model.weight, std=1.0)
        opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=300, tolerance_grad=1e-9, tolerance_change=1e-12,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y) + lam * model.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return model

    a, b = fit(0), fit(1)

    result = evaluate_path(a, linear_path(a, b), (x, y), alphas=11)  # cross-entropy is convex in (W, b)
    assert barrier(result).value < 1e-4
    assert (a.weight - b.weight).abs().max() < 1e-2  # the same optimum from both seeds


def test_barrier_forms_on_hand_made_values():
    r = PathResult(alphas=np.array([0.0, 0.5, 1.0]), loss=np.array([1.0, 4.0, 3.0]),
                   accuracy=np.array([0.9, 0.5, 0.8]))
    assert barrier(r, "loss", "linear").value == pytest.approx(4.0 - 2.0)
    assert barrier(r, "loss", "entezari").value == pytest.approx(2.0)
    assert barrier(r, "loss", "frankle").value == pytest.approx(4.0 - 2.0)
    assert barrier(r, "loss", "linear", relative=True).value == pytest.approx(2.0 / 2.0)
    err = barrier(r, "error", "frankle")
    assert err.value == pytest.approx(0.5 - 0.15) and err.stable is False and err.alpha == 0.5
    r2 = PathResult(alphas=np.array([0.0, 0.25, 1.0]), loss=np.array([1.0, 1.9, 3.0]), accuracy=np.ones(3))
    assert barrier(r2, "loss", "linear").value == pytest.approx(1.9 - 1.5)
    assert barrier(r2, "loss", "frankle").value == pytest.approx(3.0 - 2.0)  # the max is at an endpoint
    assert barrier(r2, "error", "frankle").stable is True
    assert "Entezari" in barrier(r, form="entezari").to_json()["reference"]
    with pytest.raises(BasinError, match="form"):
        barrier(r, form="nope")


def test_fitted_bezier_beats_the_line(two_mlps, data):
    a, b = two_mlps
    line = barrier(evaluate_path(a, linear_path(a, b), data, alphas=11))
    fitted = fit_curve(a, a, b, data, kind="bezier", epochs=20, lr=1e-2, batch_size=100, seed=0)
    curve = barrier(evaluate_path(a, fitted.curve, data, alphas=11))
    assert curve.value < 0.5 * line.value
    assert set(fitted.control) == {k for k, _ in a.named_parameters()}
    state = fitted.state_dict()
    m = make_mlp([64, 32, 10])
    m.load_state_dict(state)  # the control point is a loadable checkpoint
    assert fitted.to_json()["kind"] == "bezier"


def test_chunked_evaluation_matches_hand_computation(two_mlps, data):
    """Chunk boundaries (3 points per chunk over 8 points) in both engines give the hand-computed losses."""
    from evaluations.landscape import evaluate_points

    a, b = two_mlps
    x, y = data
    path = linear_path(a, b)
    alphas = torch.linspace(0, 1, 8, dtype=torch.float64)
    ref_loss, ref_acc = manual_path_losses([64, 32, 10], a, b, alphas.numpy(), x, y)
    for batched in (True, False):
        loss, acc, used = evaluate_points(a, 8, lambda idx: path.stacked(alphas[idx]), data, batched=batched, chunk=3)
        assert used is batched
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        np.testing.assert_allclose(acc, ref_acc, atol=1e-9)


def test_batched_chunks_are_sized_by_real_activation_sizes():
    from evaluations.landscape.evaluate import _widest

    conv = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    assert _widest(conv, torch.randn(5, 1, 8, 8)) == 8 * 8 * 8  # channels x positions, not 8 channels
    mlp = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 2))
    assert _widest(mlp, torch.randn(4, 3)) == 16
    assert _widest(mlp, torch.randn(4, 7)) == 16  # cannot run: falls back to the widest parameter


def test_batched_chunks_stay_under_the_heap_budget(two_mlps, data):
    """Auto-sized vmap chunks keep P * (parameters + 2 * activations) under CHUNK_FLOATS (at least one point a
    chunk), and a path split into several such chunks matches the hand computation."""
    from evaluations.landscape.evaluate import CHUNK_FLOATS, _chunk_size, _widest

    for n_params, rows, widest in [(301_066, 1797, 512), (2410, 1797, 32), (26_122, 256, 128), (2410, 64, 32)]:
        size = _chunk_size(n_params, 441, rows, widest)
        per_point = n_params + 2 * rows * widest
        assert 1 <= size <= 441
        assert size == 1 or size * per_point <= CHUNK_FLOATS  # under the budget
        assert size == 441 or (size + 1) * per_point > CHUNK_FLOATS  # and as large as it allows
    assert _chunk_size(10**7, 441, 1, 1) == 1  # one point over the budget still runs, alone
    a, b = two_mlps
    x, y = data
    n_params = sum(p.numel() for p in a.parameters())
    assert _chunk_size(n_params, 150, len(x), _widest(a, x)) < 150  # several chunks below
    alphas = np.linspace(0, 1, 150)
    res = evaluate_path(a, linear_path(a, b), data, alphas=alphas, batched=True)
    ref_loss, ref_acc = manual_path_losses([64, 32, 10], a, b, alphas, x, y)
    assert res.batched
    np.testing.assert_allclose(res.loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(res.accuracy, ref_acc, atol=1e-9)


SECOND_PASS_FAULTS = """
import resource, sys, torch
from evaluations.digits import make_mlp
from evaluations.landscape import evaluate, random_directions, slice_2d
if sys.argv[1] == "plain":
    evaluate._keep_freed_memory = lambda: None
model = make_mlp([64, 512, 512, 10], seed=0).eval()
gen = torch.Generator().manual_seed(0)
x, y = torch.randn(1797, 64, generator=gen), torch.randint(0, 10, (1797,), generator=gen)
d1, d2 = random_directions(model, n=2, seed=0)
for _ in range(2):  # the second pass finds the heap as the first left it
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    slice_2d(model, model, d1, d2, (x, y), alphas=5, batched=True)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc's dynamic mmap threshold")
def test_vmap_chunks_reuse_freed_memory_instead_of_page_faulting_it_again():
    """25 vmap chunks of a 301k-parameter MLP on 1,797 rows (~13 MB of tensors each) in a fresh process: without
    `_keep_freed_memory` malloc hands each chunk's memory back to the kernel and the next chunk faults it in again
    (~3,000 pages a chunk); with it the second pass reuses the heap."""
    import subprocess
    import sys

    def second_pass_faults(mode):
        root = str(Path(__file__).resolve().parents[2])  # this checkout's packages, not an installed copy
        out = subprocess.run([sys.executable, "-c", SECOND_PASS_FAULTS, mode], capture_output=True, text=True,
                             check=True, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root})
        return int(out.stdout.strip().splitlines()[-1])

    assert second_pass_faults("plain") > 25_000
    assert second_pass_faults("keep") < 5_000
