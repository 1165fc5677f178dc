"""Recipes (mergekit schema): parsing, checks without I/O, gradients, filters, precedence, plan depth t."""

from __future__ import annotations

import pytest
import torch

from merging.io.checkpoint import StateDictCheckpoint
from merging.plan.tensors import build_plan
from merging.recipe.schema import Recipe, evaluate_setting
from taxonomy.errors import BasinError
from tests.merging.conftest import random_state


def test_gradient_is_piecewise_linear_over_depth():
    # hand-worked: anchors at t = 0, 0.5, 1 for [0.2, 0.8, 0.4]
    g = [0.2, 0.8, 0.4]
    assert evaluate_setting(g, "x", 0.0) == pytest.approx(0.2)
    assert evaluate_setting(g, "x", 0.25) == pytest.approx(0.5)
    assert evaluate_setting(g, "x", 0.75) == pytest.approx(0.6)
    assert evaluate_setting(g, "x", 1.0) == pytest.approx(0.4)
    assert evaluate_setting([0.7], "x", 0.3) == 0.7
    assert evaluate_setting(0.3, "x", 0.9) == 0.3


def test_filters_first_match_then_default():
    setting = [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": 0.9}, {"value": 0.5}]
    assert evaluate_setting(setting, "model.layers.1.self_attn.q_proj.weight", 0.5) == pytest.approx(0.5)
    assert evaluate_setting(setting, "model.layers.1.self_attn.q_proj.weight", 0.2) == pytest.approx(0.2)
    assert evaluate_setting(setting, "model.layers.1.mlp.up_proj.weight", 0.2) == 0.9
    assert evaluate_setting(setting, "model.norm.weight", 0.2) == 0.5
    assert evaluate_setting([{"filter": "mlp", "value": 1}], "norm", 0.0) is None


def _ckpts():
    return {"a": StateDictCheckpoint(random_state(0), "a"), "b": StateDictCheckpoint(random_state(1), "b")}


def test_plan_depth_and_precedence():
    recipe = Recipe.from_dict({
        "merge_method": "linear",
        "models": [
            {"model": "a", "parameters": {"weight": [{"filter": "mlp", "value": [1.0, 3.0]}]}},
            {"model": "b"},
        ],
        "parameters": {"weight": 2.0, "normalize": False},
    })
    plan = build_plan(recipe, _ckpts())
    by_name = {tp.name: tp for tp in plan.tensors}
    # 3 layers: t = 0, 0.5, 1; outside the layers (embeddings, final norm, lm_head) t = 0 (mergekit's planner)
    assert [by_name[f"layers.{i}.mlp.weight"].t for i in range(3)] == [0.0, 0.5, 1.0]
    assert by_name["embed_tokens.weight"].t == by_name["lm_head.weight"].t == by_name["norm.weight"].t == 0.0
    # model a's filter applies to mlp tensors (gradient 1 -> 3); elsewhere the global 2.0; model b: global 2.0
    assert [by_name[f"layers.{i}.mlp.weight"].params["weight"] for i in range(3)] == [[1.0, 2.0], [2.0, 2.0],
                                                                                      [3.0, 2.0]]
    assert by_name["layers.1.norm.weight"].params["weight"] == [2.0, 2.0]
    assert by_name["layers.1.norm.weight"].params["normalize"] is False


@pytest.mark.parametrize("data, message", [
    ({"merge_method": "linaer", "models": ["a"]}, "linaer"),
    ({"merge_method": "linear", "models": [{"model": "a", "parameters": {"wieght": 1}}]}, "no parameter 'wieght'"),
    ({"merge_method": "linear", "models": [{"model": "a", "parameters": {"normalize": True}}]}, "global parameter"),
    ({"merge_method": "linear", "models": ["a"], "parameters": {"weight": []}}, "non-empty list"),
    ({"merge_method": "linear", "models": ["a"], "parameters": {"normalize": "maybe"}}, "must be true or false"),
    ({"merge_method": "linear", "models": ["a"], "dtype": "float8"}, "dtype must be one of"),
    ({"merge_method": "linear", "models": ["a"], "modules": {}}, "multi-module"),
    ({"merge_method": "linear", "models": ["a"], "tokenizer": {"source": "union"}, "tokenizer_source": "base"},
     "either tokenizer_source or a tokenizer: block"),
    ({"merge_method": "linear", "models": ["a"], "tokenizer": {"pad_to_multiple_of": 0}}, "pad_to_multiple_of"),
    ({"merge_method": "linear", "models": ["a"], "tokenizer": {"tokens": {"<x>": {"source": {"kind": "one"}}}}},
     r"tokens\['<x>'\].source"),
    ({"merge_method": "linear", "models": ["a"], "tokenizer": {"tokens": {"<x>": {"source": "c"}}}},
     "names model 'c', which is not one of the merged models"),
    ({"merge_method": "linear", "models": ["a"], "tokenizer": {"tokens": {"<x>": {"source": {
        "kind": "model_token", "model": "a"}}}}}, "exactly one of token or token_id"),
    ({"merge_method": "linear", "models": ["a"], "tokenizer": {"sauce": "union"}}, r"unknown field\(s\) \['sauce'\]"),
    ({"merge_method": "linear", "models": ["a"], "tokenizer_source": 3}, "tokenizer_source must be"),
    ({"merge_method": "linear", "models": ["a"], "allow_mixed_architectures": "yes"}, "allow_mixed_architectures"),
    ({"merge_method": "linear", "models": ["a"], "chat_template": "x"}, "chat_template"),
    ({"merge_method": "linear", "models": ["a"], "mystery": 1}, "unknown field 'mystery'"),
    ({"merge_method": "linear"}, "exactly one of 'models' or 'slices'"),
    ({"models": ["a"]}, "missing field 'merge_method'"),
    ({"merge_method": "linear", "models": ["a"], "seed": "x"}, "seed must be an integer"),
    ({"merge_method": "linear", "models": ["a"], "align": 3}, "align"),
])
def test_recipe_errors_name_the_field(data, message):
    with pytest.raises(BasinError, match=message):
        Recipe.from_dict(data)


def test_plan_errors_names_and_shapes():
    recipe = Recipe.from_dict({"merge_method": "linear", "models": ["a", "b"]})
    a = random_state(0)
    b = dict(random_state(1))
    b.pop("layers.2.mlp.weight")
    with pytest.raises(BasinError, match=r"b lacks \['layers.2.mlp.weight'\]"):
        build_plan(recipe, {"a": StateDictCheckpoint(a, "a"), "b": StateDictCheckpoint(b, "b")})
    b = random_state(1) | {"lm_head.weight": torch.zeros(12, 6)}
    with pytest.raises(BasinError, match=r"shapes differ between a and b: \['lm_head.weight"):
        build_plan(recipe, {"a": StateDictCheckpoint(a, "a"), "b": StateDictCheckpoint(b, "b")})


def test_yaml_round_trip(tmp_path):
    text = """
models:
  - model: org/a@v1
    parameters: {weight: [0.1, 0.9]}
  - model: ./b
merge_method: linear
dtype: bfloat16
seed: 7
"""
    path = tmp_path / "r.yaml"
    path.write_text(text)
    recipe = Recipe.from_yaml(path)
    assert recipe.models[0].model == "org/a@v1" and recipe.seed == 7 and recipe.dtype == "bfloat16"
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    with pytest.raises(BasinError, match="no such recipe file"):
        Recipe.from_yaml(tmp_path / "missing.yaml")


def _slerp_reference(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of two flattened vectors (Shoemake), in float64."""
    import math

    x, y = a.double().reshape(-1), b.double().reshape(-1)
    omega = math.acos(float(torch.dot(x, y) / (x.norm() * y.norm())))
    out = (math.sin((1 - t) * omega) * x + math.sin(t * omega) * y) / math.sin(omega)
    return out.reshape(a.shape)


@pytest.mark.parametrize("method", ["nuslerp", "multislerp"])
def test_optional_base_not_listed_under_models_is_the_base(tmp_path, llama_family, method):
    """nuslerp / multislerp with a base_model that is not among `models:` use it as their base
    (task vectors), without merging it as a model."""
    from merging import merge, open_checkpoint

    base, ft1, ft2 = (str(llama_family[k]) for k in ("BASE", "FT1", "FT2"))
    recipe = {"merge_method": method, "base_model": base,
              "models": [{"model": ft1, "parameters": {"weight": 1.0}}, {"model": ft2, "parameters": {"weight": 3.0}}]}
    report = merge(recipe, tmp_path / "out", progress=False)
    assert report.plan.inputs[0] == base
    assert all(tp.base is not None and tp.base[0] == 0 for tp in report.plan.tensors)
    assert all([i for i, _ in tp.sources] == [1, 2] for tp in report.plan.tensors)
    if method != "nuslerp":
        return
    name = "model.layers.1.self_attn.v_proj.weight"
    sb, s1, s2, so = (open_checkpoint(p).get(name).double() for p in (base, ft1, ft2, tmp_path / "out"))
    expected = sb + _slerp_reference(0.75, s1 - sb, s2 - sb)
    torch.testing.assert_close(so, expected.float().double(), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(so, _slerp_reference(0.75, s1, s2).float().double(), atol=1e-6)  # not base-free
