"""examples/rebasin_digits.py end to end at tiny sizes (--quick), into a temporary folder."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "rebasin_digits.py"


def test_rebasin_digits_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("basin_example_rebasin_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        module.main(["--quick", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "rebasin_digits.json").read_text())
    assert set(data["experiments"]) == {"mlp_32x3", "mlp_16x3", "rescnn_w4"}
    for exp in data["experiments"].values():
        for rows in exp["curves"].values():
            assert all(len(v) == 25 for v in rows.values())
        naive = exp["curves"]["naive"]
        # the endpoints of every curve are the two trained models themselves
        for rows in exp["curves"].values():
            assert abs(rows["train_loss"][0] - naive["train_loss"][0]) < 1e-5
    mlp = data["experiments"]["mlp_32x3"]
    assert mlp["permuted_model_max_abs_logit_difference"] < 1e-4
    assert mlp["curves"]["weight_matching"]["train_loss"][-1] - mlp["curves"]["naive"]["train_loss"][-1] < 1e-5
