"""Recipe schema: mergekit's accepted forms, bounded YAML, finite parameters, suggestions, chat templates, card."""

from __future__ import annotations

import json
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml

from merging import merge
from merging.recipe.schema import Recipe
from taxonomy.errors import BasinError, BasinWarning
from tests.merging.lowprec_inputs import make_inputs

BASE = {"merge_method": "task_arithmetic", "base_model": "b", "models": ["a", "c"]}


def _with(**fields):
    return dict(BASE, **fields)


# --- NaN, infinity, ranges (issue 18.5) ------------------------------------------------------------------------
@pytest.mark.parametrize("params", [
    {"weight": float("nan")}, {"weight": float("inf")}, {"weight": float("-inf")}, {"density": float("nan")},
    {"lambda": float("inf")}, {"weight": [0.1, float("nan")]},  # gradient anchor
    {"weight": [{"filter": "mlp", "value": float("nan")}, {"value": 1.0}]},  # filter list
    {"weight": {"grid": [0.5, float("inf")]}},  # sweep
    {"density": [{"filter": "attn", "value": [0.2, float("nan")]}]},  # gradient inside a filter
])
def test_non_finite_parameters_are_refused(params):
    method = "ties" if "density" in params else "task_arithmetic"
    with pytest.raises(BasinError, match="finite"):
        Recipe.from_dict(_with(merge_method=method, parameters=params))


@pytest.mark.parametrize("t", [float("nan"), float("inf"), [0.0, float("nan")]])
def test_slerp_t_nan_refused(t):
    with pytest.raises(BasinError, match="finite"):
        Recipe.from_dict({"merge_method": "slerp", "base_model": "a", "models": ["a", "b"], "parameters": {"t": t}})


@pytest.mark.parametrize("text", ["weight: .nan", "weight: .inf", "weight: -.inf"])
def test_non_finite_from_yaml(text):
    with pytest.raises(BasinError, match="finite"):
        Recipe.from_yaml(f"merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      {text}\n")


def test_yaml12_exponent_is_a_number():
    r = Recipe.from_yaml("merge_method: ram\nbase_model: b\nmodels: [a]\nparameters:\n  epsilon: 1e-4\n")
    assert r.parameters["epsilon"] == 1e-4


def test_models_as_a_string_names_the_type():
    with pytest.raises(BasinError, match="'models' must be a list.*a string 't'"):
        Recipe.from_yaml("merge_method: linear\nmodels: t\n")


def test_recipe_not_utf8(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes("merge_method: linear\nmodels: [caf\u00e9]\n".encode("latin-1"))
    with pytest.raises(BasinError, match=r"r\.yaml: not UTF-8"):
        Recipe.from_yaml(path)


# --- other mergekit tools (issue 17.10) ----------------------------------------------------------------------
def test_multi_document_is_named_mergekit_multi():
    text = "name: one\nmerge_method: linear\nmodels: [a]\n---\nname: two\nmerge_method: linear\nmodels: [one]\n"
    with pytest.raises(BasinError, match="mergekit-multi"):
        Recipe.from_yaml(text)


def test_moe_config_is_named_mergekit_moe():
    text = "base_model: a\ngate_mode: hidden\nexperts:\n  - source_model: b\n    positive_prompts: [x]\n"
    with pytest.raises(BasinError, match="mergekit-moe") as err:
        Recipe.from_yaml(text)
    assert "unknown field" not in str(err.value) and "basin moe" in str(err.value)


# --- alias bomb (issue 18.3) ---------------------------------------------------------------------------------
BOMB = "\n".join(["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
                 + [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)]
                 + ["merge_method: linear", "models: [x]", "name: *a9"]) + "\n"


@pytest.mark.parametrize("where", ["name", "align"])
def test_alias_bomb_fails_fast_with_bounded_memory(tmp_path, where):
    text = BOMB.replace("name: *a9", f"{where}: *a9")
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    tracemalloc.start()  # the peak of this call alone (ru_maxrss would hide growth below an earlier peak)
    start = time.perf_counter()
    try:
        with pytest.raises(BasinError, match="expands to more than"):
            merge(path, tmp_path / "out", progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 2.0
    assert peak < 100 * 2**20  # bytes: < 100 MB
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.yaml"]  # no output, no hidden temporary folder


def test_recursive_anchor_and_deep_nesting_and_size():
    with pytest.raises(BasinError, match="anchor that contains itself"):
        Recipe.from_yaml("merge_method: linear\nmodels: [x]\nname: &n [*n]\n")
    with pytest.raises(BasinError, match="deep"):
        Recipe.from_yaml("merge_method: linear\nmodels: [x]\nname: " + "[" * 200 + "]" * 200 + "\n")
    with pytest.raises(BasinError, match="at most"):
        Recipe.from_yaml("merge_method: linear\nmodels: [x]\n" + "#" * (1 << 20) + "\n")


def test_name_must_be_a_string():
    with pytest.raises(BasinError, match="name must be a string"):
        Recipe.from_dict({"merge_method": "linear", "models": ["x"], "name": ["a", "b"]})


# --- mergekit's model-reference forms, ignored fields (issue 17.7) ---------------------------------------------
@pytest.mark.parametrize("ref, expected", [
    ({"model": {"path": "org/m"}}, "org/m"),
    ({"model": {"path": "org/m", "revision": "v1"}}, "org/m@v1"),
    ({"model": "org/m@v1"}, "org/m@v1"),
    ({"model": {"path": "org/m"}, "lora": {"path": "org/adapter"}}, "org/m+org/adapter"),
    ({"model": "org/m", "lora": "org/adapter@r2"}, "org/m+org/adapter@r2"),
])
def test_model_reference_mappings(ref, expected):
    r = Recipe.from_dict({"merge_method": "task_arithmetic", "base_model": ref,
                          "models": [{"model": ref}, {"model": "x"}]})
    assert r.base_model == expected and r.models[0].model == expected


def test_model_reference_errors():
    with pytest.raises(BasinError, match="unknown field 'lroa'; did you mean 'lora'"):
        Recipe.from_dict({"merge_method": "linear", "models": [{"model": {"model": "a", "lroa": "b"}}]})
    with pytest.raises(BasinError, match="needs 'model'"):
        Recipe.from_dict({"merge_method": "linear", "models": [{"model": {"path": "a"}}]})
    with pytest.warns(BasinWarning, match="override_architecture"):
        Recipe.from_dict({"merge_method": "linear",
                          "models": [{"model": {"model": "a", "override_architecture": "LlamaForCausalLM"}}]})


def test_sce_with_weight_is_accepted_with_a_warning():
    """mergekit's own test_sce_merge sets weight 0.6 / 0.4, which SCE ignores."""
    data = {"merge_method": "sce", "base_model": "c", "parameters": {"select_topk": 0.5}, "dtype": "bfloat16",
            "models": [{"model": "a", "parameters": {"weight": 0.6}}, {"model": "b", "parameters": {"weight": 0.4}}]}
    with pytest.warns(BasinWarning, match="'sce' has no parameter 'weight'; ignored"):
        r = Recipe.from_dict(data)
    assert r.models[0].parameters == {} and r.parameters == {"select_topk": 0.5}


def test_residual_weight_accepted_with_a_warning():
    sl = {"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 2]}],
          "residual_weight": 0.3}
    with pytest.warns(BasinWarning, match="residual_weight: has no effect"):
        r = Recipe.from_dict({"merge_method": "linear", "slices": [sl]})
    assert r.slices[0].residual_weight == 0.3
    assert yaml.safe_load(r.to_yaml())["slices"][0]["residual_weight"] == 0.3
    with pytest.raises(BasinError, match="residual_weight: expected a finite number"):
        Recipe.from_dict({"merge_method": "linear", "slices": [dict(sl, residual_weight=float("nan"))]})


# --- suggestions ranked by similarity (issue 17.8) -----------------------------------------------------------
@pytest.mark.parametrize("data, first", [
    ({"merge_method": "tie", "models": ["a"]}, "'ties'"),
    ({"merge_method": "lineer", "models": ["a"]}, "'linear'"),
    ({"merge_method": "ramplus", "models": ["a"]}, "'ramplus_tl'"),
    ({"merge_method": "linear", "models": ["a"], "tokenizer_sorce": "base"}, "'tokenizer_source'"),
    ({"merge_method": "ties", "base_model": "b", "models": ["a"], "parameters": {"densty": 0.5}}, "'density'"),
])
def test_did_you_mean_ranks_by_similarity(data, first):
    with pytest.raises(BasinError) as err:
        Recipe.from_dict(data)
    assert f"did you mean {first}" in str(err.value)


# --- chat_template (issue 17.7) ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_inputs(tmp_path_factory):
    folders = make_inputs(tmp_path_factory.mktemp("chat"))
    templates = {"base": "{{ 'A' }}{% for m in messages %}{{ m.content }}{% endfor %}",
                 "ft1": "{{ 'B' }}{% for m in messages %}{{ m.content }}{% endfor %}",
                 "ft2": "{{ 'B' }}{% for m in messages %}{{ m.content }}{% endfor %}"}
    for name, folder in folders.items():
        (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 32,
                                                                  "chat_template": templates[name]}))
        (folder / "chat_template.jinja").unlink(missing_ok=True)
    return folders, templates


@pytest.mark.parametrize("value, expect", [("auto", "ft1"), ("chatml", "chatml"), ("literal", "literal")])
def test_chat_template_written_into_tokenizer_config(chat_inputs, tmp_path, value, expect):
    from merging.output.chat_templates import NAMED

    folders, templates = chat_inputs
    literal = "{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}"
    recipe = {"merge_method": "ties", "base_model": str(folders["base"]), "parameters": {"density": 0.5},
              "models": [str(folders["ft1"]), str(folders["ft2"])],
              "chat_template": literal if value == "literal" else value}
    merge(recipe, tmp_path / "out", progress=False)
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    want = {"ft1": templates["ft1"], "chatml": NAMED["chatml"], "literal": literal}[expect]
    assert config["chat_template"] == want and config["model_max_length"] == 32


@pytest.mark.parametrize("bad, message", [("chatmll", "did you mean 'chatml'"), ("{x}", "not a chat template"),
                                          (3, "expected 'auto'")])
def test_chat_template_errors(bad, message):
    with pytest.raises(BasinError, match=message):
        Recipe.from_dict({"merge_method": "linear", "models": ["a"], "chat_template": bad})


# --- model card: front matter, determinism (issues 17.9, 18.9) ------------------------------------------------
def test_model_card_front_matter_and_reruns_byte_identical(chat_inputs, tmp_path):
    folders, _ = chat_inputs
    recipe = {"merge_method": "ties", "base_model": str(folders["base"]), "parameters": {"density": 0.5},
              "models": [str(folders["ft1"]), str(folders["ft2"])], "chat_template": "auto"}
    merge(recipe, tmp_path / "one", progress=False)
    merge(recipe, tmp_path / "two", progress=False)
    one = {p.name: p.read_bytes() for p in (tmp_path / "one").iterdir()}
    two = {p.name: p.read_bytes() for p in (tmp_path / "two").iterdir()}
    assert one == two and "README.md" in one and len(one) >= 4
    card = one["README.md"].decode()
    front = yaml.safe_load(card.split("---")[1])
    assert front["tags"] == ["merge", "basin"] and front["library_name"] == "transformers"
    assert "`ties` merge method" in card and "https://github.com/" not in card and "](" not in card


def test_model_card_base_model_lists_hub_inputs():
    from merging.output.model_card import InputRecord, model_card

    r = Recipe.from_dict({"merge_method": "linear", "models": ["org/a@main", "./local"]})
    card = model_card(r, [InputRecord("org/a@main", "org/a", "abc"), InputRecord("./local", None, None)],
                      "h", {"basin": "1"}, "t")
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == ["org/a"]


def test_warnings_print_one_line_through_the_cli(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "r.yaml"
    path.write_text("merge_method: sce\nbase_model: c\nmodels:\n  - model: a\n    parameters: {weight: 0.5}\n"
                    "  - model: b\n")
    out = subprocess.run([sys.executable, "-m", "evaluations.cli", "merge", str(path), "--dry-run"],
                         capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert out.returncode == 2  # a, b, c do not exist
    lines = out.stderr.strip().splitlines()
    assert lines[0].startswith("basin merge: warning: ") and "ignored" in lines[0]
    assert lines[-1].startswith("basin merge: error: ") and "Traceback" not in out.stderr
