"""The three seed-study examples end to end at tiny sizes (--quick), into a temporary folder.

Each checks that the files are written and that the numbers hang together: values an example measures twice
by different routes agree (the slice at alpha = 0 is the training loss the example computed itself; aligned
models compute the same function as the raw ones), and the table has one row per configuration.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"basin_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def finite(values) -> bool:
    return all(math.isfinite(v) for v in np.asarray(values, float).ravel())


def test_qnn_patches_quick(tmp_path: Path) -> None:
    module = load("qnn_patches")
    result = module.main(["--quick", "--quiet", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "qnn_patches.json").read_text())
    assert (tmp_path / "qnn_patches.png").stat().st_size > 0
    assert [(s["n_patches"], s["depth"]) for s in data["summary"]] == [(1, 1), (2, 1)]
    assert len(data["runs"]) == 4  # 2 patch counts x 1 depth x 2 seeds
    for run in data["runs"]:
        m = run["minimum"]
        assert m["n_params"] == run["n_circuit_params"] == 12 * run["n_patches"] * run["depth"]
        assert len(m["top_eigenvalues"]) == 2 and finite(m["top_eigenvalues"]) and finite([m["trace"]])
        assert m["top_eigenvalues"][0] >= m["top_eigenvalues"][1]
        assert len(m["slice_1d"]) == 5 and np.asarray(m["slice_2d"]).shape == (3, 3)
        # the slice's centre and the probe's loss are the training loss the example computed itself
        assert m["slice_1d"][2] == pytest.approx(run["train_loss"], rel=1e-9)
        assert m["loss"] == pytest.approx(run["train_loss"], rel=1e-9)
        assert 0.0 <= run["test_acc"] <= 1.0
    assert result.to_markdown().count("\n") == 1 + len(data["summary"])


def test_adversarial_flatness_quick(tmp_path: Path) -> None:
    module = load("adversarial_flatness")
    module.main(["--quick", "--quiet", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "adversarial_flatness.json").read_text())
    assert (tmp_path / "adversarial_flatness.png").stat().st_size > 0
    assert [s["method"] for s in data["summary"]] == ["standard", "fgsm", "pgd"]
    for run in data["runs"]:
        m = run["minimum"]
        assert finite(m["top_eigenvalues"]) and finite([m["trace"], m["trace_stderr"]])
        assert all(0.0 <= run[k] <= 1.0 for k in ("clean_acc", "fgsm_acc", "pgd_acc", "train_acc"))
        assert m["slice_1d"][2] == pytest.approx(run["train_loss"], rel=1e-5)
        assert np.asarray(m["slice_2d"])[1, 1] == pytest.approx(run["train_loss"], rel=1e-5)
    # the three methods start from the same weights and batch order but train differently
    assert len({run["train_loss"] for run in data["runs"]}) == 3


def test_sok_geometry_quick(tmp_path: Path) -> None:
    module = load("sok_geometry")
    module.main(["--quick", "--quiet", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "sok_geometry.json").read_text())
    assert (tmp_path / "sok_geometry.png").stat().st_size > 0
    markdown = (tmp_path / "sok_geometry.md").read_text().strip().splitlines()
    assert len(markdown) == 2 + 6
    table = data["table"]
    assert [(t["set"], t["aligned"]) for t in table] == [
        (s, a) for s in ("same init", "different inits", "fine-tunes") for a in (False, True)]
    for raw, aligned in zip(data["sets"][::2], data["sets"][1::2]):
        n = raw["n_models"]
        assert n == 3
        # permuting hidden units does not change what any member computes
        np.testing.assert_allclose(aligned["member_train_loss"], raw["member_train_loss"], rtol=1e-5)
        np.testing.assert_allclose(aligned["determinism"]["function_distance"],
                                   raw["determinism"]["function_distance"], atol=1e-5)
        for row in (raw, aligned):
            matrix = np.asarray(row["connectivity"]["matrix"])
            assert matrix.shape == (n, n) and finite(matrix)
            assert row["mode_convexity"]["value"] == pytest.approx(matrix.max())
            assert sorted(i for basin in row["connectivity"]["basins"] for i in basin) == list(range(n))
            np.testing.assert_allclose(np.diag(np.asarray(row["directedness"]["cosine"])), 1.0, rtol=1e-6)
    different = next(t for t in table if t["set"] == "different inits" and t["aligned"])
    assert different["units_moved"] > 0
