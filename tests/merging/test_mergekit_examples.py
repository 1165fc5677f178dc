"""Acceptance (issue 17): every example recipe of mergekit's documentation (examples/*.yml and
docs/multimerge.md), rewritten here with tiny local checkpoints of the families they name (Llama-2 13B
fine-tunes -> tiny Llamas, Mistral 7B -> tiny Mistrals; 4 layers where the originals have 40, layer
ranges scaled), merged by basin, then loaded by transformers: no missing, unexpected or misshapen keys,
finite logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from merging.pipeline import merge

# {m0}.. are tiny checkpoints of the recipe's family; layer ranges [0, 40] -> [0, 4], [0, 24] + [20, 40] -> 3 + 3
EXAMPLES = {
    "arcee_fusion": ("llama", """
merge_method: arcee_fusion
base_model: {m0}
models: [{{model: {m0}}}, {{model: {m1}}}]
dtype: bfloat16
"""),
    "bio-merge": ("mistral", """
merge_method: ties
base_model: {m0}
models:
  - {{model: {m1}, parameters: {{density: 0.5, weight: 0.5}}}}
  - {{model: {m2}, parameters: {{density: 0.5, weight: 0.5}}}}
parameters: {{normalize: false, int8_mask: true}}
dtype: float16
"""),
    "gradient-slerp": ("llama", """
merge_method: slerp
base_model: {m0}
slices:
  - sources:
      - {{model: {m0}, layer_range: [0, 4]}}
      - {{model: {m1}, layer_range: [0, 4]}}
parameters:
  t:
    - {{filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}}
    - {{filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}}
    - value: 0.5
dtype: float16
"""),
    "linear": ("llama", """
merge_method: linear
models:
  - {{model: {m0}, parameters: {{weight: 1.0}}}}
  - {{model: {m1}, parameters: {{weight: 0.3}}}}
  - {{model: {m2}, parameters: {{weight: 0.5}}}}
dtype: float16
"""),
    "orcamini-platy-44layer": ("llama", """
merge_method: passthrough
slices:
  - sources: [{{model: {m0}, layer_range: [0, 3]}}]
  - sources: [{{model: {m1}, layer_range: [1, 4]}}]
dtype: float16
"""),
    "ties": ("llama", """
merge_method: ties
base_model: {m3}
models:
  - {{model: {m0}, parameters: {{density: [1, 0.7, 0.1], weight: 1.0}}}}
  - {{model: {m1}, parameters: {{density: 0.5, weight: [0, 0.3, 0.7, 1]}}}}
  - model: {m2}
    parameters:
      density: 0.33
      weight: [{{filter: mlp, value: 0.5}}, {{value: 0}}]
parameters: {{normalize: true, int8_mask: true}}
dtype: float16
"""),
}

# docs/multimerge.md: three merges, each later one reading an earlier one's output ({first}, {second})
MULTIMERGE = ("mistral", [
    ("first", """
merge_method: linear
models: [{{model: {m0}}}, {{model: {m1}}}]
parameters: {{weight: 0.5}}
"""),
    ("second", """
merge_method: slerp
base_model: {first}
models: [{{model: {first}}}, {{model: {m2}}}]
parameters: {{t: 0.5}}
"""),
    ("final", """
merge_method: dare_ties
base_model: {m0}
models:
  - {{model: {second}, parameters: {{density: 0.6, weight: 0.5}}}}
  - {{model: {m3}, parameters: {{density: 0.8, weight: 0.5}}}}
"""),
])


def _loads_cleanly(folder: Path, vocab: int) -> None:
    """transformers loads the output with no missing, unexpected or mismatched keys; logits are finite."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, dtype=torch.float32)
    assert not any(info.values()), info
    with torch.no_grad():
        logits = model.eval()(torch.tensor([[1, 5, 9, 3, 7]])).logits
    assert logits.shape == (1, 5, vocab) and torch.isfinite(logits).all()


@pytest.mark.parametrize("example", list(EXAMPLES))
def test_mergekit_example(tmp_path, family_dirs, example):
    family, text = EXAMPLES[example]
    models = {f"m{i}": str(p) for i, p in enumerate(family_dirs(family, 4))}
    recipe = tmp_path / f"{example}.yml"
    recipe.write_text(text.format(**models))
    merge(recipe, tmp_path / "out", progress=False)
    _loads_cleanly(tmp_path / "out", 64)
    if example == "orcamini-platy-44layer":
        from transformers import AutoConfig

        assert AutoConfig.from_pretrained(tmp_path / "out").num_hidden_layers == 6


def test_mergekit_multimerge(tmp_path, family_dirs):
    family, steps = MULTIMERGE
    names = {f"m{i}": str(p) for i, p in enumerate(family_dirs(family, 4))}
    for step, text in steps:
        recipe = tmp_path / f"{step}.yml"
        recipe.write_text(text.format(**names))
        merge(recipe, tmp_path / step, progress=False)
        _loads_cleanly(tmp_path / step, 64)
        names[step] = str(tmp_path / step)
