"""Directions (filter normalization, PCA, plane), slices (batched vs loop vs by hand), BatchNorm reset, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from evaluations.digits import load_digits_all, make_mlp
from evaluations.landscape import (
    evaluate_path,
    linear_path,
    pca_directions,
    plane_through,
    random_directions,
    slice_1d,
    slice_2d,
)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_filter_normalization_exact():
    torch.manual_seed(0)
    model = ConvNet()
    d = random_directions(model, normalize="filter", seed=3)
    params = dict(model.named_parameters())
    for name in ("conv.weight", "fc.weight"):
        w, v = params[name].detach(), d[name]
        for i in range(w.shape[0]):  # output channel of the conv, row of the Linear
            assert float(v[i].norm()) == pytest.approx(float(w[i].norm()), rel=1e-6)
        assert (v < 0).any() and (v > 0).any()  # Gaussian, not uniform on [0, 1]
    for name in ("conv.bias", "bn.weight", "bn.bias", "fc.bias", "bn.running_mean", "bn.running_var"):
        assert torch.count_nonzero(d[name]) == 0
    kept = random_directions(model, normalize="filter", seed=3, ignore=None)
    assert torch.equal(kept["fc.bias"], params["fc.bias"].detach())
    assert torch.count_nonzero(kept["bn.running_mean"]) == 0  # buffers never move
    d1, d2 = random_directions(model, n=2, seed=3)
    assert torch.equal(d1["conv.weight"], d["conv.weight"]) and not torch.equal(d1["fc.weight"], d2["fc.weight"])


def test_slices_match_hand_computation():
    x, y = load_digits_all()
    x, y = x[:300], y[:300]
    model = make_mlp([64, 16, 10], seed=0)
    d1, d2 = random_directions(model, n=2, seed=1)
    center = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grid = [-1.0, 0.0, 0.5]
    s2 = slice_2d(model, model, d1, d2, (x, y), alphas=grid, betas=[0.0, 1.0], batched=True)
    s2_loop = slice_2d(model, model, d1, d2, (x, y), alphas=grid, betas=[0.0, 1.0], batched=False)
    ref = np.zeros((2, 3))
    for i, b in enumerate([0.0, 1.0]):
        for j, a in enumerate(grid):
            m = make_mlp([64, 16, 10])
            m.load_state_dict({k: center[k] + a * d1[k] + b * d2[k] for k in center})
            with torch.no_grad():
                ref[i, j] = float(nn.functional.cross_entropy(m(x), y))
    np.testing.assert_allclose(s2.loss, ref, rtol=1e-5)
    np.testing.assert_allclose(s2_loop.loss, ref, rtol=1e-5)
    s1 = slice_1d(model, center, d1, (x, y), alphas=5, span=2.0)
    np.testing.assert_allclose(s1.alphas, [-2, -1, 0, 1, 2])
    np.testing.assert_allclose(s1.loss[[1, 2]], ref[0, [0, 1]], rtol=1e-5)
    assert json.dumps(s2.to_json()) and s2.loss.shape == (2, 3)


def test_pca_directions_recover_a_line():
    end = {"w": torch.zeros(4), "b": torch.zeros(2)}
    u = torch.tensor([1.0, 2.0, 0.0, 0.0, 0.0, 2.0]) / 3.0
    v = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    traj = []
    for t, s in [(3.0, 0.1), (2.0, -0.1), (1.0, -0.1), (0.0, 0.1)]:  # s orthogonal to t, centred
        vec = t * u + s * v
        traj.append({"b": vec[4:], "w": vec[:4]})  # sorted keys: b, w
    p = pca_directions(traj, k=2, final=end)
    flat = torch.cat([p.directions[0]["b"], p.directions[0]["w"]]).double()
    target = torch.cat([u[4:], u[:4]]).double()
    assert abs(float(flat @ target)) == pytest.approx(1.0, abs=1e-6)
    assert sum(p.explained_variance_ratio) == pytest.approx(1.0, abs=1e-6)
    assert p.explained_variance_ratio[0] > 0.99


def test_plane_through_three_points():
    a = {"w": torch.tensor([1.0, 1.0, 0.0])}
    b = {"w": torch.tensor([3.0, 1.0, 0.0])}
    c = {"w": torch.tensor([2.0, 4.0, 0.0])}
    plane = plane_through(a, b, c)
    np.testing.assert_allclose(plane.points, [[0, 0], [2, 0], [1, 3]], atol=1e-6)
    assert torch.allclose(plane.u["w"], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(plane.v["w"], torch.tensor([0.0, 1.0, 0.0]))


def test_batchnorm_reset_matches_batch_statistics():
    torch.manual_seed(0)
    net_a, net_b = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)), None
    net_b = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    res = evaluate_path(net_a, linear_path(net_a, net_b), (x, y), alphas=[0.5], bn_reset_data=(x, y))
    # by hand: at the midpoint, BN uses the mean and unbiased variance of the pre-BN activations over x
    sa, sb = net_a.state_dict(), net_b.state_dict()
    mid = {k: (sa[k] + sb[k]) / 2 if sa[k].is_floating_point() else sa[k] for k in sa}
    h = x @ mid["0.weight"].T + mid["0.bias"]
    mu, var = h.mean(0), h.var(0, unbiased=True)
    z = (h - mu) / torch.sqrt(var + 1e-5) * mid["1.weight"] + mid["1.bias"]
    out = z @ mid["2.weight"].T + mid["2.bias"]
    assert res.loss[0] == pytest.approx(float(nn.functional.cross_entropy(out, y)), rel=1e-5)
    assert not res.batched


def test_cli_barrier_and_landscape(tmp_path, capsys):
    from evaluations.cli import main

    factory = tmp_path / "fac.py"
    factory.write_text(
        "import torch\nfrom evaluations.digits import make_mlp, load_digits_all\n"
        "def model():\n    return make_mlp([64, 8, 10])\n"
        "def data():\n    x, y = load_digits_all()\n    return x[:200], y[:200]\n")
    for i in (0, 1):
        save_file({k: v.contiguous() for k, v in make_mlp([64, 8, 10], seed=i).state_dict().items()},
                  str(tmp_path / f"m{i}.safetensors"))
    rc = main(["barrier", str(tmp_path / "m0.safetensors"), str(tmp_path / "m1.safetensors"),
               "--model-factory", f"{factory}:model", "--data", f"{factory}:data", "--alphas", "5",
               "--out", str(tmp_path / "bar")])
    assert rc == 0
    payload = json.loads((tmp_path / "bar" / "barrier.json").read_text())
    assert len(payload["path"]["loss"]) == 5 and len(payload["barriers"]) == 12
    assert "entezari" in capsys.readouterr().out
    rc = main(["landscape", str(tmp_path / "m0.safetensors"), "--model-factory", f"{factory}:model",
               "--data", f"{factory}:data", "--grid", "3", "--out", str(tmp_path / "land")])
    assert rc == 0
    land = json.loads((tmp_path / "land" / "landscape.json").read_text())
    assert np.array(land["slice_2d"]["loss"]).shape == (3, 3)
    # bad input: a checkpoint that does not fit the model is a clean error (exit 2)
    save_file({"0.weight": torch.zeros(3, 3)}, str(tmp_path / "bad.safetensors"))
    rc = main(["barrier", str(tmp_path / "bad.safetensors"), str(tmp_path / "m1.safetensors"),
               "--model-factory", f"{factory}:model", "--data", f"{factory}:data"])
    assert rc == 2 and "bad.safetensors" in capsys.readouterr().err
