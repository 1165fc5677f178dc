"""`basin merge` refuses model-level methods (data, unlabeled test inputs) with one line naming where they run."""

from __future__ import annotations

import pytest

from evaluations.cli import main


@pytest.mark.parametrize("method, needs", [("adamerging_task", "a base model and unlabeled test inputs"),
                                           ("adamerging_layer", "a base model and unlabeled test inputs"),
                                           ("regmean_plusplus", "data"), ("regmean", "data"), ("fisher", "data")])
def test_basin_merge_refuses_model_level_methods(tmp_path, capsys, method, needs):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: {method}\nmodels:\n  - model: a\n  - model: b\n")
    assert main(["merge", str(recipe), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"needs {needs}:" in err
    assert "merge_models" in err and "basin bench" in err
    assert not (tmp_path / "out").exists()
