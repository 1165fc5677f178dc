"""Issue 18, item 1: no command deletes or replaces one of its inputs, the recipe, or a folder holding them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from evaluations.cli import main
from merging import merge
from merging.io.guard import check_output, protected_paths
from taxonomy.errors import BasinError
from tests.merging.conftest import random_state, write_safetensors


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` (links followed) -> its bytes: what must survive a refused command."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def work(tmp_path, monkeypatch):
    """tmp_path/models/m0, m1 and tmp_path/recipe.yaml; the current folder is tmp_path."""
    models = [write_safetensors(random_state(s), tmp_path / "models" / f"m{s}") for s in range(2)]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"merge_method": "linear",
                                                         "models": [str(m) for m in models]}))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _refused(capsys, argv: list[str], root: Path, message: str = "refused") -> None:
    before = _snapshot(root)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert _snapshot(root) == before
    assert not [p for p in root.rglob(".*basin-*")]  # no temporary folder or lock file left


@pytest.mark.parametrize("out", ["models/m0", "models/m0/", "./models/../models/m0", "models", ".", "recipe.yaml",
                                 "models/m1/model.safetensors"])
def test_merge_never_replaces_an_input_or_the_recipe(work, capsys, out):
    _refused(capsys, ["merge", "recipe.yaml", out, "--overwrite", "--no-progress"], work)


def test_symlinks_resolve_before_the_check(work, capsys):
    (work / "link").symlink_to(work / "models")
    (work / "m0link").symlink_to(work / "models" / "m0")
    for out in ("link", "link/m0", "m0link", "m0link/"):
        _refused(capsys, ["merge", "recipe.yaml", out, "--overwrite", "--no-progress"], work)
    assert (work / "m0link").is_symlink()


def test_output_holding_the_current_folder_is_refused(work, capsys, monkeypatch):
    (work / "sub").mkdir()
    monkeypatch.chdir(work / "sub")
    _refused(capsys, ["merge", str(work / "recipe.yaml"), str(work / "sub"), "--overwrite", "--no-progress"], work,
             "current folder")


def test_output_inside_an_input_folder_is_allowed_and_rerun_with_overwrite(work):
    report = merge(work / "recipe.yaml", "models/m0/merged", progress=False)
    again = merge(work / "recipe.yaml", "models/m0/merged", progress=False, overwrite=True)
    assert again.content_hash == report.content_hash
    assert sorted(p.name for p in (work / "models/m0").iterdir()) == ["merged", "model.safetensors"]


def test_sweep_output_guarded(work, capsys):
    recipe = yaml.safe_load((work / "recipe.yaml").read_text())
    recipe["parameters"] = {"weight": {"grid": [0.25, 0.75]}}
    (work / "sweep.yaml").write_text(yaml.safe_dump(recipe))
    for out in ("models", "models/m1"):
        _refused(capsys, ["merge", "sweep.yaml", out, "--overwrite", "--no-progress"], work)
    assert main(["merge", "sweep.yaml", "sweeps", "--no-progress"]) == 0
    assert main(["merge", "sweep.yaml", "sweeps", "--no-progress", "--overwrite"]) == 0
    assert sorted(p.name for p in work.iterdir()) == ["models", "recipe.yaml", "sweep.yaml", "sweeps"]


def test_align_never_replaces_its_input(work, capsys):
    for argv in (["models/m0", "models/m0", "models/m0"], ["models/m0", "models/m1", "models/m1/"],
                 ["models/m0", "models/m1", "models"]):
        _refused(capsys, ["align", *argv, "--overwrite"], work)


def test_lora_adapter_and_its_base_guarded(work, capsys):
    from safetensors.torch import save_file

    adapter = work / "adapter"
    adapter.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({"base_model.model.layers.0.mlp.lora_A.weight": torch.randn(2, 6, generator=g),
               "base_model.model.layers.0.mlp.lora_B.weight": torch.randn(7, 2, generator=g)},
              adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                             "target_modules": ["mlp"]}))
    (work / "lora.yaml").write_text(yaml.safe_dump({"merge_method": "linear", "models": ["models/m0+adapter"]}))
    for out in ("adapter", "models/m0"):
        _refused(capsys, ["merge", "lora.yaml", out, "--overwrite", "--no-progress"], work)


def test_hub_snapshot_and_blobs_guarded(tmp_path):
    from tests.merging.test_hub_cache_layout import lay_out_exact_cache

    source = write_safetensors(random_state(0), tmp_path / "src")
    snapshot = lay_out_exact_cache(tmp_path / "hub", "org/name", source, "a" * 40)
    protect = protected_paths([snapshot])
    repo = snapshot.parent.parent
    for out in (snapshot, repo, repo / "blobs", tmp_path / "hub", next((repo / "blobs").iterdir())):
        with pytest.raises(BasinError, match="refused"):
            check_output(out, protect)
    assert check_output(tmp_path / "out", protect) == (tmp_path / "out").resolve()


def test_rule_needs_no_existing_output(tmp_path):
    """The rule is about paths, not --overwrite: an output that would contain an input is refused even when
    it does not exist yet (it cannot, then, but a symlink or `..` may make it so)."""
    m = write_safetensors(random_state(0), tmp_path / "a" / "m")
    with pytest.raises(BasinError, match="contains"):
        check_output(tmp_path / "a" / "x" / "..", protected_paths([m]))
    assert os.listdir(tmp_path / "a") == ["m"]


def test_report_writers_never_replace_their_inputs(work, capsys):
    """hessian/ntk --json, hessian --density, barrier/landscape --out, bench --out (its cells/ is deleted by
    --no-resume): refused before any work when a file they write is, or holds, one of their inputs."""
    state = work / "s.pt"
    torch.save({}, state)
    cache = work / "res" / "cells"
    cache.mkdir(parents=True)
    (cache / "model.safetensors").write_bytes(b"x")
    m0 = str(work / "models" / "m0")
    (work / "plots").mkdir()
    (work / "plots" / "slice_1d.png").write_bytes(b"an input that happens to be named so")
    cases = [["hessian", "--state", "s.pt", "--json", "s.pt"], ["hessian", "--state", "s.pt", "--density", "./s.pt"],
             ["ntk", "--state", "s.pt", "--json", "s.pt"],
             ["barrier", "models/m0/model.safetensors", m0, "--model-factory", "x:y", "--data", "x:y",
              "--out", "models/m0/model.safetensors"],
             ["landscape", "plots/slice_1d.png", "--model-factory", "x:y", "--data", "x:y", "--out", "plots"],
             ["bench", "digits-tasks", "--out", "res", "--cache", "res/cells", "--no-resume"]]
    for argv in cases:
        _refused(capsys, argv, work)


def test_missing_parent_folders_are_made_and_a_file_parent_is_one_line(work, capsys):
    """As mergekit: `basin merge recipe.yaml new/nested/out` makes the folders; a parent that is a file is a
    one-line error, exit 2, nothing written."""
    assert main(["merge", "recipe.yaml", "new/nested/out"]) == 0
    assert (work / "new" / "nested" / "out" / "model.safetensors").is_file()
    assert not list((work / "new" / "nested").glob(".*"))  # no lock or temporary left beside it
    (work / "plain").write_text("a file")
    capsys.readouterr()
    before = _snapshot(work)
    assert main(["merge", "recipe.yaml", "plain/out"]) == 2
    last = capsys.readouterr().err.split("\r")[-1].strip()  # after the progress bar's erased line
    assert last.startswith("basin merge: error: ") and "a file stands where its folder" in last and "\n" not in last
    assert _snapshot(work) == before
