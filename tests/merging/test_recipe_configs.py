"""mergekit's documented example configs (tests/configs/, rewritten for tiny local Llamas) run unchanged:
the output loads with transformers and runs; elementwise methods also match their formula."""

from __future__ import annotations

from pathlib import Path
from string import Template

import pytest
import torch

from merging import merge, open_checkpoint
from merging.methods import registered_names
from merging.recipe import Recipe

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def _load(folder):
    c = open_checkpoint(folder)
    return {n: c.get(n).float() for n in c.names()}


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_documented_config_runs(config, tmp_path, llama_family):
    from transformers import AutoModelForCausalLM

    text = Template(config.read_text()).substitute({k: str(v) for k, v in llama_family.items()})
    recipe = Recipe.from_yaml(text)
    assert recipe.merge_method in registered_names()
    report = merge(recipe, tmp_path / "out", progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").float().eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()
    assert report.tensors == len(open_checkpoint(tmp_path / "out").names())
    out = _load(tmp_path / "out")
    s = {k: _load(v) for k, v in llama_family.items()}
    name = "model.layers.1.self_attn.v_proj.weight"
    if config.stem == "linear":
        torch.testing.assert_close(out[name], ((s["A"][name] + 0.5 * s["B"][name]) / 1.5).half().float())
    if config.stem == "task_arithmetic":
        base = s["BASE"][name]
        expected = base + 0.8 * ((s["FT1"][name] - base) - 0.5 * (s["FT2"][name] - base))
        torch.testing.assert_close(out[name], expected)
