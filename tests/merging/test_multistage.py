"""Multi-stage recipes (mergekit-multi): a 3-stage file equals its stages run by hand; reruns run only what changed;
cycles, unknown names and bad files are errors before any read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

import merging.multistage as multistage
from merging.multistage import merge_stages
from merging.pipeline import merge
from merging.recipe.schema import Recipe
from merging.recipe.stages import load_stages, order
from taxonomy.errors import BasinError


def _tensors(folder: Path) -> dict:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _file(tmp_path: Path, family: dict, weight2: float = 0.3) -> Path:
    text = f"""
name: first
merge_method: linear
models:
  - model: {family['FT1']}
    parameters: {{weight: 0.5}}
  - model: {family['FT2']}
    parameters: {{weight: 0.5}}
---
name: second
merge_method: task_arithmetic
base_model: {family['BASE']}
models:
  - model: first
    parameters: {{weight: {weight2}}}
---
merge_method: slerp
base_model: first
models:
  - model: first
  - model: second
parameters: {{t: 0.4}}
"""
    path = tmp_path / "multi.yaml"
    path.write_text(text)
    return path


def test_three_stages_equal_running_them_by_hand_then_rerun_nothing(tmp_path, llama_family, monkeypatch):
    path = _file(tmp_path, llama_family)
    report = merge_stages(path, tmp_path / "out", progress=False)
    assert [s["name"] for s in report.stages] == ["first", "second", "final merge (unnamed)"]
    assert report.ran == ["first", "second", "final merge (unnamed)"]
    stages = load_stages(path)
    by_hand = tmp_path / "hand"
    by_hand.mkdir()
    merge(stages[0].recipe, by_hand / "first", progress=False)
    second = Recipe.from_dict({**stages[1].recipe.to_dict(), "models": [
        {"model": str(by_hand / "first"), "parameters": {"weight": 0.3}}]})
    merge(second, by_hand / "second", progress=False)
    final = Recipe.from_dict({**stages[2].recipe.to_dict(), "base_model": str(by_hand / "first"),
                              "models": [{"model": str(by_hand / "first")}, {"model": str(by_hand / "second")}]})
    merge(final, by_hand / "final", progress=False)
    for a, b in [("out.stages/first", "hand/first"), ("out.stages/second", "hand/second"), ("out", "hand/final")]:
        ta, tb = _tensors(tmp_path / a), _tensors(tmp_path / b)
        assert ta.keys() == tb.keys() and all(ta[k].equal(tb[k]) for k in ta)
    state = json.loads((tmp_path / "out.stages" / "stages.json").read_text())
    assert set(state) >= {"first", "second", "<output>"}

    calls = []
    monkeypatch.setattr(multistage, "merge", lambda *a, **k: calls.append(a))
    again = merge_stages(path, tmp_path / "out", progress=False)
    assert calls == [] and again.ran == []


def test_changing_stage_two_reruns_two_and_three_only(tmp_path, llama_family, monkeypatch):
    path = _file(tmp_path, llama_family)
    merge_stages(path, tmp_path / "out", progress=False)
    before = _tensors(tmp_path / "out")
    _file(tmp_path, llama_family, weight2=0.6)
    ran = []
    real = multistage.merge

    def spy(recipe, out, **kw):
        ran.append(Path(out).name)
        return real(recipe, out, **kw)

    monkeypatch.setattr(multistage, "merge", spy)
    report = merge_stages(path, tmp_path / "out", progress=False)
    assert ran == ["second", "out"] and report.ran == ["second", "final merge (unnamed)"]
    assert any(not before[k].equal(v) for k, v in _tensors(tmp_path / "out").items())
    # an intermediate deleted on disk runs again, with its dependants only if its bytes changed (they do not)
    import shutil

    shutil.rmtree(tmp_path / "out.stages" / "first")
    ran.clear()
    assert merge_stages(path, tmp_path / "out", progress=False).ran == ["first"] and ran == ["first"]


def test_stage_option_runs_only_what_it_needs(tmp_path, llama_family):
    path = _file(tmp_path, llama_family)
    report = merge_stages(path, tmp_path / "just_first", stage="first", intermediate_dir=tmp_path / "inter",
                          progress=False)
    assert report.ran == ["first"] and (tmp_path / "just_first" / "config.json").is_file()
    assert not (tmp_path / "inter" / "second").exists()
    with pytest.raises(BasinError, match=r"unknown stage 'frist'; did you mean 'first'"):
        merge_stages(path, tmp_path / "x", stage="frist")


def test_existing_output_not_written_by_this_recipe_is_refused(tmp_path, llama_family):
    path = _file(tmp_path, llama_family)
    (tmp_path / "out").mkdir()
    with pytest.raises(BasinError, match="output folder exists"):
        merge_stages(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out.stages" / "first").exists()


@pytest.mark.parametrize("text,message", [
    ("name: a\nmerge_method: linear\nmodels: [b]\n---\nname: b\nmerge_method: linear\nmodels: [a]\n",
     r"stages form a cycle: a -> b -> a"),
    ("name: a\nmerge_method: linear\nmodels: [a]\n---\nmerge_method: linear\nmodels: [a]\n", "uses itself"),
    ("name: a\nmerge_method: linear\nmodels: [nowhere]\n---\nmerge_method: linear\nmodels: [a]\n",
     r"model 'nowhere' is neither a stage of this file \(stages: a\)"),
    ("name: a\nmerge_method: linear\nmodels: [x]\n---\nname: a\nmerge_method: linear\nmodels: [a]\n",
     "a second stage named 'a'"),
    ("merge_method: linear\nmodels: [x]\n---\nmerge_method: linear\nmodels: [y]\n", "a second document without a name"),
    ("name: ../up\nmerge_method: linear\nmodels: [x]\n---\nmerge_method: linear\nmodels: [y]\n", "folder name"),
    ("name: a\nmerge_method: lineer\nmodels: [x]\n---\nmerge_method: linear\nmodels: [a]\n", "lineer"),
])
def test_bad_files_fail_before_any_read(tmp_path, monkeypatch, text, message):
    path = tmp_path / "m.yaml"
    path.write_text(text)
    monkeypatch.setattr(multistage, "merge", lambda *a, **k: pytest.fail("merge called"))
    monkeypatch.setattr("merging.io.checkpoint.open_checkpoint", lambda *a, **k: pytest.fail("opened"))
    with pytest.raises(BasinError, match=message):
        merge_stages(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_order_puts_dependencies_first_whatever_the_file_order():
    text = ("name: c\nmerge_method: linear\nmodels: [b, a+/adapters/x]\n---\nname: a\nmerge_method: linear\n"
            "models: [m1]\n---\nname: b\nmerge_method: linear\nmodels: [{model: {model: {path: a}}}]\n")
    stages = load_stages(text)
    assert [s.name for s in order(stages)] == ["a", "b", "c"]
    assert [s.name for s in order(stages, "b")] == ["a", "b"]
    assert stages[0].depends == ["a", "b"]


def test_cli_multi_stage(tmp_path, llama_family, capsys):
    from evaluations.cli import main

    path = _file(tmp_path, llama_family)
    assert main(["merge", str(path), str(tmp_path / "out"), "--no-progress"]) == 0
    assert "3 of 3 stage(s) merged" in capsys.readouterr().out
    assert main(["merge", str(path), str(tmp_path / "out"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "0 of 3 stage(s) merged" in out and "stage second: up to date" in out
    single = tmp_path / "one.yaml"
    single.write_text(f"merge_method: linear\nmodels: [{llama_family['FT1']}]\n")
    assert main(["merge", str(single), str(tmp_path / "o1"), "--stage", "x"]) == 2
    assert "multi-stage" in capsys.readouterr().err
