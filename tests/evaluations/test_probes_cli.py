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


def test_basin_hessian_mode_and_trace_are_reported(tmp_path, capsys):
    out = tmp_path / "h.json"
    assert main(["hessian", "--widths", "64,4,10", "--epochs", "1", "-k", "1", "--params", "2", "--mode", "train",
                 "--trace", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
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
