"""Grid sweeps: `weight: {grid: [...]}` gives one output per point, each tensor read once for all points."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from evaluations.cli import main
from merging import merge
from merging.io.safetensors_format import SafetensorsCheckpoint
from merging.recipe.schema import Recipe
from taxonomy.errors import BasinError
from tests.merging.conftest import random_state, write_safetensors


def test_grid_points_product():
    recipe = Recipe.from_dict({"merge_method": "linear", "models": [
        {"model": "a"}, {"model": "b", "parameters": {"weight": {"grid": [0.5, 2.0]}}}],
        "parameters": {"normalize": {"grid": [True, False]}}})
    points = recipe.grid_points()
    assert [v for v, _ in points] == [
        {"normalize": True, "models[1].weight": 0.5}, {"normalize": True, "models[1].weight": 2.0},
        {"normalize": False, "models[1].weight": 0.5}, {"normalize": False, "models[1].weight": 2.0}]
    assert points[3][1].models[1].parameters["weight"] == 2.0 and points[3][1].parameters["normalize"] is False
    assert recipe.models[1].parameters["weight"] == {"grid": [0.5, 2.0]}  # the original is left as it was
    with pytest.raises(BasinError, match="grid"):
        Recipe.from_dict({"merge_method": "linear", "models": ["a"], "parameters": {"weight": {"grid": []}}})
    with pytest.raises(BasinError, match="must be true or false"):
        Recipe.from_dict({"merge_method": "linear", "models": ["a"], "parameters": {"normalize": {"grid": [1]}}})


def test_sweep_outputs_match_single_merges_and_share_reads(tmp_path, monkeypatch):
    states = [random_state(s) for s in range(2)]
    folders = [write_safetensors(s, tmp_path / f"m{i}") for i, s in enumerate(states)]
    grid = [0.0, 1.0, 3.0]
    recipe = {"merge_method": "linear", "models": [
        {"model": str(folders[0])}, {"model": str(folders[1]), "parameters": {"weight": {"grid": grid}}}]}
    reads = []
    real_get = SafetensorsCheckpoint.get
    monkeypatch.setattr(SafetensorsCheckpoint, "get", lambda self, n: reads.append(n) or real_get(self, n))
    report = merge(recipe, tmp_path / "sweep", progress=False)
    assert len(reads) == 2 * len(states[0])  # each input tensor read once for all three points
    index = json.loads((tmp_path / "sweep/sweep.json").read_text())
    assert [p["values"] for p in index] == [{"models[1].weight": w} for w in grid]
    for point, w in zip(report.sweep, grid):
        out = load_file(f"{point['folder']}/model.safetensors")
        expected = (states[0]["layers.1.mlp.weight"] + w * states[1]["layers.1.mlp.weight"]) / (1 + w)
        torch.testing.assert_close(out["layers.1.mlp.weight"], expected)
        single = {"merge_method": "linear", "models": [
            {"model": str(folders[0])}, {"model": str(folders[1]), "parameters": {"weight": w}}]}
        assert merge(single, tmp_path / f"single{w}", progress=False).content_hash == point["content_hash"]
    assert not list(tmp_path.glob(".*tmp*"))


def test_sweep_dry_run_cli(tmp_path, capsys):
    import yaml

    folders = [write_safetensors(random_state(s), tmp_path / f"m{s}") for s in range(2)]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "linear", "models": [str(f) for f in folders],
                                    "parameters": {"weight": {"grid": [[0.0, 1.0], 0.5]}}}))
    assert main(["merge", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "== sweep point p00-weight=_0.0,_1.0_" in out and "== sweep point p01-weight=0.5" in out
    assert "layers.1.mlp.weight  [7x6 float32]  t=0.500  inputs=[0, 1]  weight=[0.5,0.5]" in out
