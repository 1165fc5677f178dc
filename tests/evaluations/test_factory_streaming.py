"""The --model-factory form of `basin barrier` / `basin landscape` streams its checkpoints (issue 20): A, B (and C)
stay memory-mapped and every point is written into the factory's one model, so peak anonymous memory is about
one model whatever the number of endpoints; a `.pt` needs --allow-pickle and is read with weights_only=True."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from evaluations.cli import main
from evaluations.digits import make_mlp
from evaluations.landscape import evaluate_path, linear_path

ROOT = Path(__file__).resolve().parents[2]
WIDTHS = [6, 5, 4]
FACTORY = f"""
import torch
from evaluations.digits import make_mlp

def model():
    return make_mlp({WIDTHS})

def bn_model():
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.ReLU(), torch.nn.Linear(5, 4))

def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(40, 6, generator=g), torch.randint(0, 4, (40,), generator=g)
"""


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(40, 6, generator=g), torch.randint(0, 4, (40,), generator=g)


@pytest.fixture()
def mlps(tmp_path):
    (tmp_path / "fac.py").write_text(FACTORY)
    states = [make_mlp(WIDTHS, seed=s).state_dict() for s in range(3)]
    for i, s in enumerate(states):
        save_file(s, tmp_path / f"m{i}.safetensors")
    torch.save(states[1], tmp_path / "m1.pt")
    return tmp_path, states


def _module(path: Path):
    from merging.objects import exec_file

    return exec_file(path)


def _hand_loss(state, x, y) -> float:
    model = make_mlp(WIDTHS)
    model.load_state_dict(state)
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(x).double(), y))


def test_factory_barrier_equals_hand_interpolation_and_allows_via(mlps, capsys):
    root, states = mlps
    fac = f"{root}/fac.py"
    x, y = _data()
    assert main(["barrier", f"{root}/m0.safetensors", f"{root}/m1.pt", "--model-factory", f"{fac}:model",
                 "--data", f"{fac}:data", "--alphas", "3", "--allow-pickle", "--out", str(root / "out")]) == 0
    path = json.loads((root / "out" / "barrier.json").read_text())["path"]
    for alpha, loss in zip(path["alphas"], path["loss"]):
        mid = {k: ((1 - alpha) * states[0][k].double() + alpha * states[1][k].double()).float() for k in states[0]}
        assert loss == pytest.approx(_hand_loss(mid, x, y), rel=1e-6)
    assert (path["unit"], path["tokens"]) == ("examples", 40)
    assert main(["barrier", f"{root}/m0.safetensors", f"{root}/m1.pt", "--model-factory", f"{fac}:model",
                 "--data", f"{fac}:data", "--alphas", "3"]) == 2  # a pickle without --allow-pickle
    assert "--allow-pickle" in capsys.readouterr().err
    assert main(["barrier", f"{root}/m0.safetensors", f"{root}/m2.safetensors", "--via", f"{root}/m1.safetensors",
                 "--curve", "polychain", "--model-factory", f"{fac}:model", "--data", f"{fac}:data",
                 "--alphas", "3", "--out", str(root / "via")]) == 0
    via = json.loads((root / "via" / "barrier.json").read_text())["path"]
    assert via["loss"][1] == pytest.approx(_hand_loss(states[1], x, y), rel=1e-6)  # the chain's middle is C


def test_factory_barrier_bn_reset_streams_and_matches_in_memory(mlps):
    """--bn-reset in the streamed form: the same losses as the in-memory evaluator's BatchNorm re-estimation."""
    root, _ = mlps
    fac = f"{root}/fac.py"
    module = _module(root / "fac.py")
    states = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = module.bn_model()
        m.train()
        with torch.no_grad():
            m(torch.randn(16, 6) * (seed + 1))  # non-trivial running statistics
        states.append({k: v.clone() for k, v in m.state_dict().items()})
        save_file(states[-1], root / f"bn{seed}.safetensors")
    assert main(["barrier", f"{root}/bn0.safetensors", f"{root}/bn1.safetensors", "--model-factory",
                 f"{fac}:bn_model", "--data", f"{fac}:data", "--alphas", "3", "--bn-reset", "--out",
                 str(root / "bn")]) == 0
    streamed = json.loads((root / "bn" / "barrier.json").read_text())["path"]["loss"]
    ref = evaluate_path(module.bn_model().eval(), linear_path(*states), _data(), alphas=3, batched=False,
                        bn_reset_data=_data())
    np.testing.assert_allclose(streamed, ref.loss, rtol=1e-5)


def test_factory_landscape_loads_the_center_in_place(mlps):
    """`basin landscape --model-factory`: the center is copied into the model tensor by tensor (no second copy):
    the slice's middle point is the checkpoint's own loss."""
    root, states = mlps
    fac = f"{root}/fac.py"
    assert main(["landscape", f"{root}/m0.safetensors", "--model-factory", f"{fac}:model", "--data", f"{fac}:data",
                 "--grid", "3", "--out", str(root / "land")]) == 0
    s1 = json.loads((root / "land" / "landscape.json").read_text())["slice_1d"]
    assert s1["loss"][1] == pytest.approx(_hand_loss(states[0], *_data()), rel=1e-6)


MEMORY_CHILD = r"""
import json, sys
import torch
from torch import nn
from evaluations.cli import main
from evaluations.landscape import chain_path, evaluate_path
from evaluations.peak_memory import PeakMemory
root, form = sys.argv[1], sys.argv[2]
fac = f"{root}/fac.py"
size = int(open(f"{root}/size").read())
refs = [f"{root}/e{i}.{'pt' if form == 'chain4' else 'safetensors'}" for i in range(4)]
with PeakMemory() as peak:
    if form == "cli2":
        rc = main(["barrier", refs[0], refs[1], "--model-factory", f"{fac}:big", "--data", f"{fac}:small_data",
                   "--alphas", "3"])
        assert rc == 0
    else:  # a chain over 4 endpoints, .pt pickles read memory-mapped, through the library API
        import importlib.util
        spec = importlib.util.spec_from_file_location("fac", fac)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        model = mod.big()
        from evaluations.lm_path import evaluate_weighted_path
        evaluate_weighted_path(model, chain_path(refs), [mod.small_data()], alphas=4, allow_pickle=True)
print(json.dumps({"size": size, "peak": peak.anon_growth}))
"""

BIG = """

def big():
    layers = [torch.nn.Linear(64, 512)] + [torch.nn.Linear(512, 512, bias=False) for _ in range(14)]
    return torch.nn.Sequential(*layers, torch.nn.Linear(512, 4))

def small_data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 64, generator=g), torch.randint(0, 4, (8,), generator=g)
"""


@pytest.mark.parametrize("form", ["cli2", "chain4"])
def test_factory_path_peak_memory_is_about_one_model(tmp_path, form):
    """Peak anonymous memory of the factory form <= 1.3 x one model + 4 MiB, over 2 endpoints (the CLI) and 4
    (a chain of .pt pickles); loading A and B whole, as before, took about 3 x."""
    (tmp_path / "fac.py").write_text(FACTORY + BIG)
    module = _module(tmp_path / "fac.py")
    size = 0
    for i in range(4):
        torch.manual_seed(i)
        state = module.big().state_dict()
        size = sum(t.numel() * t.element_size() for t in state.values())
        save_file(state, tmp_path / f"e{i}.safetensors")
        torch.save(state, tmp_path / f"e{i}.pt")
    (tmp_path / "size").write_text(str(size))
    proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(tmp_path), form], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    mib = 2**20
    assert got["size"] > 14 * mib, got
    assert got["peak"] < 1.3 * got["size"] + 4 * mib, got
