"""`slices:` (mergekit): layer ranges, renumbered output layers, per-slice parameters, config layer count."""

from __future__ import annotations

import json

import pytest
import torch

from merging import merge, open_checkpoint
from taxonomy.errors import BasinError


def _all(folder):
    c = open_checkpoint(folder)
    return {n: c.get(n) for n in c.names()}


def test_slices_stack_and_renumber_layers(tmp_path, llama_pair):
    from transformers import AutoModelForCausalLM

    a, b = (str(p) for p in llama_pair)
    recipe = {
        "merge_method": "linear",
        "slices": [
            {"sources": [{"model": a, "layer_range": [0, 2]}, {"model": b, "layer_range": [0, 2]}],
             "parameters": {"weight": 1.0}},
            {"sources": [{"model": a, "layer_range": [1, 3], "parameters": {"weight": 3.0}},
                         {"model": b, "layer_range": [1, 3]}]},
        ],
        "parameters": {"weight": 1.0},
    }
    merge(recipe, tmp_path / "out", progress=False)
    config = json.loads((tmp_path / "out/config.json").read_text())
    assert config["num_hidden_layers"] == 4
    sa, sb, out = _all(a), _all(b), _all(tmp_path / "out")
    w = "mlp.down_proj.weight"
    # output layers 0, 1 <- input layers 0, 1 (equal weights); output 2, 3 <- input 1, 2 (a weighted 3:1)
    for o, i, wa in [(0, 0, 1.0), (1, 1, 1.0), (2, 1, 3.0), (3, 2, 3.0)]:
        src = f"model.layers.{i}.{w}"
        torch.testing.assert_close(out[f"model.layers.{o}.{w}"], (wa * sa[src] + sb[src]) / (wa + 1))
    assert not any(n.startswith("model.layers.4.") for n in out)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 4
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[3, 4, 5]])).logits).all()


def test_slice_errors(tmp_path, llama_pair):
    a, b = (str(p) for p in llama_pair)
    bad_range = {"merge_method": "linear", "slices": [{"sources": [{"model": a, "layer_range": [0, 5]}]}]}
    with pytest.raises(BasinError, match=r"layer_range \[0, 5\].*exceeds its 3 layers"):
        merge(bad_range, tmp_path / "o", progress=False)
    uneven = {"merge_method": "linear", "slices": [{"sources": [{"model": a, "layer_range": [0, 2]},
                                                                {"model": b, "layer_range": [0, 3]}]}]}
    with pytest.raises(BasinError, match="same number of layers"):
        merge(uneven, tmp_path / "o", progress=False)
    with pytest.raises(BasinError, match="layer_range"):
        merge({"merge_method": "linear", "slices": [{"sources": [{"model": a, "layer_range": [2, 1]}]}]},
              tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_frankenmerge_one_source_per_slice_copies_layers(tmp_path, llama_pair):
    """A slice with one source copies its layers (what passthrough stacking does), renumbered."""
    from transformers import AutoModelForCausalLM

    a, b = (str(p) for p in llama_pair)
    recipe = {"merge_method": "linear", "slices": [
        {"sources": [{"model": a, "layer_range": [0, 2]}]},
        {"sources": [{"model": b, "layer_range": [1, 3]}]},
    ]}
    merge(recipe, tmp_path / "out", progress=False)
    sa, sb, out = _all(a), _all(b), _all(tmp_path / "out")
    for o, (src, i) in enumerate([(sa, 0), (sa, 1), (sb, 1), (sb, 2)]):
        for suffix in ("self_attn.q_proj.weight", "input_layernorm.weight"):
            assert torch.equal(out[f"model.layers.{o}.{suffix}"], src[f"model.layers.{i}.{suffix}"])
    assert torch.equal(out["model.embed_tokens.weight"], sa["model.embed_tokens.weight"])  # first slice's
    assert torch.equal(out["lm_head.weight"], sb["lm_head.weight"])  # last slice's
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_hidden_layers == 4
