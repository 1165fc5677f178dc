"""examples/fort2020_digits.py: the smoke run (--quick) checked against independent recomputations, and its
helpers (pairs task, bootstrap ratio, velocity slope) on hand-worked inputs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluations.probes import kernel_distance
from evaluations.probes.linearize import kernel_ridge_predict
from evaluations.probes.ntk import empirical_ntk, empirical_ntk_result
from evaluations.tracking import train_epochs

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fort2020_digits.py"


@pytest.fixture(scope="module")
def fort():
    spec = importlib.util.spec_from_file_location("basin_example_fort2020_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_pairs_labels_are_the_sum_of_the_two_digits(fort) -> None:
    x = torch.arange(5, dtype=torch.float32)[:, None].repeat(1, 64)  # digit i: every pixel i
    y = torch.tensor([3, 9, 4, 0, 7])
    images, labels = fort._pairs(x, y, 50, np.random.default_rng(1))
    assert images.shape == (50, 128)
    grid = images.reshape(50, 8, 16)
    left, right = grid[:, 0, 0].long(), grid[:, 0, 8].long()
    assert torch.equal(grid[:, :, :8], left[:, None, None].float().expand(50, 8, 8))
    assert torch.equal(labels, (y[left] + y[right]) % 10)
    assert len(set(left.tolist())) > 1 and len(set(right.tolist())) > 1


def test_ratio_ci_hand_worked(fort) -> None:
    numer = [torch.tensor([1, 1, 1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)]
    denom = [torch.tensor([1, 0, 0, 0, 0, 1, 0, 0, 0, 0], dtype=torch.bool)]
    out = fort.ratio_ci(numer, denom, boots=500)
    assert out["ratio"] == 3.0 and out["per_seed"] == [3.0]
    lo, hi = out["ci95"]
    assert lo <= 3.0 <= hi and hi > lo
    assert out["dropped"] > 0  # some resamples miss both denominator errors (p = 0.8^10 each)
    assert fort.ratio_ci(numer, numer, boots=50)["ci95"] == [1.0, 1.0]
    none = fort.ratio_ci(numer, [torch.zeros(10, dtype=torch.bool)], boots=20)
    assert none["ratio"] is None and none["dropped"] == 20 and none["ci95"] == [None, None]


def test_velocity_slope_hand_worked(fort) -> None:
    t = [0.5, 1, 2, 4, 8]
    assert fort.velocity_slope(t, [3.0 / s for s in t]) == pytest.approx(-1.0)
    assert fort.velocity_slope(t, [0.2] * 5) == pytest.approx(0.0, abs=1e-12)
    assert fort.velocity_slope(t, [1, 1, 1, 0, 0]) is None  # one usable record at t >= 2


def test_quick_run_matches_independent_recomputation(fort, tmp_path: Path) -> None:
    fort.main(["--quick", "--quiet", "--jobs", "1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "fort2020_digits.json").read_text())
    assert (tmp_path / "fort2020_digits.png").stat().st_size > 0
    table = (tmp_path / "fort2020_digits.md").read_text().strip().splitlines()
    assert len(table) == 2 + 4 and all(line.count("|") == 5 for line in table)
    main = data["main"]
    setup = fort.Setup(**{k: tuple(v) if isinstance(v, list) else v for k, v in main["setup"].items()})
    train, test = fort.make_task(setup)
    kr_train = (train[0][:setup.kernel_train], train[1][:setup.kernel_train])
    kr_test = (test[0][:setup.kernel_test], test[1][:setup.kernel_test])

    # seed 0 replayed: the initial kernel's regression error, the kernel by dense Jacobians
    model = fort.make_model(setup, 128, seed=0)
    k_train = empirical_ntk(model, kr_train[0], kind="trace", method="jacobian")
    k_test = empirical_ntk(model, kr_test[0], kr_train[0], kind="trace", method="jacobian")
    wrong = kernel_ridge_predict(k_train, kr_train[1], k_test, 10).argmax(1) != kr_test[1]
    recorded = main["kernel_regression_error"]["per_seed"][0][0]
    assert abs(float(wrong.double().mean()) - recorded) <= 1.0 / setup.kernel_test + 1e-12
    assert 0.3 < recorded < 0.95  # the initial kernel is weak on pairs

    # ... and trained to the first record: the velocity is S(K_0, K_1) / dt on the probe set
    probe = test[0][:setup.probe]
    k0 = empirical_ntk(model, probe, kind="trace", method="jacobian")
    opt = torch.optim.SGD(model.parameters(), lr=setup.lr, momentum=setup.momentum)
    t1 = setup.record_times[1]
    train_epochs(model, opt, *train, t1, setup.batch, torch.Generator().manual_seed(0))
    k1 = empirical_ntk(model, probe, kind="trace", method="jacobian")
    velocity = main["velocity"]["per_seed"][0][0]
    assert velocity == pytest.approx(kernel_distance(k0, k1) / t1, rel=1e-3)

    ratio = main["ratio_init_over_epoch3"]
    errors = np.asarray(main["kernel_regression_error"]["per_seed"])
    i3 = list(setup.record_times).index(3)
    assert ratio["ratio"] == pytest.approx(errors[:, 0].mean() / errors[:, i3].mean())
    assert ratio["ci95"][0] <= ratio["ratio"] <= ratio["ci95"][1]
    barriers = np.asarray(main["spawning"]["per_seed"])
    assert barriers.shape == (setup.seeds, len(setup.spawn_times)) and ((0 <= barriers) & (barriers <= 1)).all()
    decay = data["ablations"]["linear_decay"]
    assert decay["setup"]["schedule"] == "linear" and decay["velocity"]["mean"] != main["velocity"]["mean"]
    digits = data["ablations"]["single_digits"]
    assert digits["setup"]["task"] == "digits" and "spawning" not in digits
    assert digits["kernel_regression_error"]["mean"][0] < main["kernel_regression_error"]["mean"][0]
    mlp = data["ablations"]["mlp"]
    assert mlp["setup"]["arch"] == "mlp" and main["setup"]["arch"] == "cnn" and "spawning" not in mlp
    assert mlp["ratio_init_over_epoch3"]["ratio"] is not None


def test_cnn_kernel_is_the_explicit_jacobian_product(fort) -> None:
    """The CNN's trace NTK as the example computes it (basin's structured rule for Conv2d and Linear) equals
    sum_a J_a J_a^T with J built row by row from autograd gradients, in float64."""
    model = fort.make_cnn(128, 4, 8, seed=3).double()
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    params = list(model.parameters())
    out = model(x)
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[i, a], params, retain_graph=True)])
            for i in range(5) for a in range(10)]
    jac = torch.stack(rows).reshape(5, 10, -1)
    explicit = torch.einsum("iap,jap->ij", jac, jac)
    assert fort.make_model(fort.Setup(channels=4, hidden=8), 128, 3).state_dict().keys() == model.state_dict().keys()
    ntk = empirical_ntk_result(model, x, kind="trace")
    assert set(ntk.methods.values()) == {"structured"} and not ntk.fallbacks
    assert torch.allclose(torch.from_numpy(ntk.kernel), explicit, rtol=1e-10, atol=1e-10)
    x2 = x[:3] * 0.5
    out2 = model(x2)
    rows2 = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(out2[i, a], params, retain_graph=True)])
             for i in range(3) for a in range(10)]
    cross = torch.einsum("iap,jap->ij", torch.stack(rows2).reshape(3, 10, -1), jac)
    assert torch.allclose(empirical_ntk(model, x2, x, kind="trace"), cross, rtol=1e-10, atol=1e-10)


def test_linearized_comparison_from_init_replays_plain_training(fort) -> None:
    """--full's comparison from the checkpoint at t = 0 is plain training from the seed's initialization."""
    setup = fort.Setup(epochs=1, n_train=200, n_test=100, kernel_train=50, kernel_test=100, probe=16, seeds=1,
                       channels=4, hidden=16, record_times=(0, 1), spawning=False, linearized_times=(0,))
    _, _, rows = fort.seed_run(setup, 0)
    train, test = fort.make_task(setup)
    model = fort.make_model(setup, 128, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=setup.lr, momentum=setup.momentum)
    train_epochs(model, opt, *train, 1, setup.batch, torch.Generator().manual_seed(1))
    assert [r["t"] for r in rows] == [0]
    assert rows[0]["network_trained_on"] == float(fort.network_wrong(model, test).double().mean())
    assert 0.0 <= rows[0]["linearized_trained_on"] <= 1.0
