"""`basin hessian` and `basin ntk` on a tiny digits MLP."""

import json

import torch
from torch import nn

from evaluations.cli import main
from evaluations.digits import load_digits_split, make_mlp, train_classifier


def test_basin_hessian_matches_dense(tmp_path):
    out = tmp_path / "h.json"
    assert main(["hessian", "--widths", "64,4,10", "--epochs", "1", "-k", "2", "--tol", "1e-6",
                 "--params", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    data = load_digits_split()
    model = train_classifier(make_mlp([64, 4, 10], seed=0), *data.train, epochs=1, seed=0)
    w, b = model[2].weight.detach(), model[2].bias.detach()

    hidden = torch.relu(model[0](data.x_train)).detach()

    def loss(flat):
        return nn.functional.cross_entropy(hidden @ flat[:40].reshape(10, 4).T + flat[40:], data.y_train)

    dense = torch.autograd.functional.hessian(loss, torch.cat([w.reshape(-1), b]))
    top = torch.linalg.eigvalsh(dense).flip(0)[:2]
    assert result["eigen"]["converged"]
    assert torch.allclose(torch.tensor(result["eigen"]["values"], dtype=top.dtype), top, rtol=1e-3)  # float32 model
    assert result["mode"] == "eval" and result["eigen"]["mode"] == "eval"


def _last_layer_hessian() -> torch.Tensor:
    """The dense float64 Hessian of the digits MLP's (64-4-10, one epoch) cross-entropy w.r.t. its last layer."""
    data = load_digits_split()
    model = train_classifier(make_mlp([64, 4, 10], seed=0), *data.train, epochs=1, seed=0)
    hidden = torch.relu(model[0](data.x_train)).detach().double()
    flat = torch.cat([model[2].weight.detach().reshape(-1), model[2].bias.detach()]).double()

    def loss(v):
        return nn.functional.cross_entropy(hidden @ v[:40].reshape(10, 4).T + v[40:], data.y_train)

    return torch.autograd.functional.hessian(loss, flat)


def test_basin_hessian_trace_by_xtrace(tmp_path, capsys):
    # 50 parameters: a 100-product budget sketches the whole space, so XTrace is exact (stderr 0); 20 products
    # estimate it, with XTrace's own error estimate
    exact = float(torch.trace(_last_layer_hessian()))
    for products in (100, 20):
        out = tmp_path / f"x{products}.json"
        assert main(["hessian", "--widths", "64,4,10", "--epochs", "1", "-k", "1", "--params", "2", "--trace",
                     "xtrace", "--trace-products", str(products), "--json", str(out)]) == 0
        trace = json.loads(out.read_text())["trace"]
        assert trace["method"] == "xtrace" and trace["samples"] == min(products // 2, 50)
        assert f"trace (xtrace) {trace['mean']:.6g}" in capsys.readouterr().out
        if products == 100:
            assert trace["stderr"] <= 1e-9 * abs(trace["mean"]) and trace["converged"]  # exact up to rounding
            assert abs(trace["mean"] - exact) <= 1e-5 * abs(exact)  # float32 products
        else:
            assert trace["products"] <= 20 and 0 < trace["stderr"] and abs(trace["mean"] - exact) <= 5 * trace["stderr"]
    assert main(["hessian", "--trace", "exact"]) == 2
    assert "--trace: invalid choice: 'exact'" in capsys.readouterr().err


def test_basin_hessian_mode_and_trace_are_reported(tmp_path, capsys):
    out = tmp_path / "h.json"
    assert main(["hessian", "--widths", "64,4,10", "--epochs", "1", "-k", "1", "--params", "2", "--mode", "train",
                 "--trace", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["trace"]["method"] == "hutchpp"  # a bare --trace: Hutch++, as before
    assert result["mode"] == "train" and result["eigen"]["mode"] == "train" and result["trace"]["mode"] == "train"
    assert result["trace"]["converged"] and result["trace"]["stderr"] <= 0.05 * abs(result["trace"]["mean"])
    assert "train mode" in capsys.readouterr().out
    assert main(["hessian", "--mode", "sideways"]) == 2  # argparse's usage error, as one line
    err = capsys.readouterr().err
    assert "--mode: invalid choice: 'sideways'" in err and len(err.strip().splitlines()) == 1


def test_basin_ntk_runs_and_reports(tmp_path, capsys):
    out = tmp_path / "k.json"
    assert main(["ntk", "--widths", "64,8,10", "--epochs", "1", "-n", "12", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["shape"] == [12, 12] and 0 < result["distance_from_init"] < 1
    assert main(["ntk", "--widths", "64,x"]) == 2
