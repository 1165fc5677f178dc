"""The real all-MiniLM-L6-v2, resolved by its Hub id from an offline cache, merged with a perturbed copy."""

from __future__ import annotations

import pytest
import torch

from evaluations.cli.demo import SENTENCES, embed, perturbed_copy
from merging import merge
from tests.conftest import MINILM_COMMIT, MINILM_REPO


@pytest.fixture(scope="module")
def reference_embeddings(minilm_dir):
    return embed(minilm_dir, SENTENCES)


def test_linear_merge_by_hub_id(tmp_path, hub_cache, minilm_dir, reference_embeddings):
    noisy = perturbed_copy(minilm_dir, tmp_path / "noisy", scale=0.02, seed=1)
    recipe = {"merge_method": "linear", "models": [
        {"model": MINILM_REPO, "parameters": {"weight": 0.5}}, {"model": str(noisy), "parameters": {"weight": 0.5}}]}
    report = merge(recipe, tmp_path / "out", progress=False)
    cos = (embed(tmp_path / "out", SENTENCES) * reference_embeddings).sum(-1)
    assert cos.min() > 0.99
    card = (tmp_path / "out/README.md").read_text()
    assert MINILM_COMMIT in card and report.content_hash in card
    assert report.inputs[0].revision == MINILM_COMMIT
    # the merged tensors are the average of the two inputs (independent: safetensors + torch)
    from safetensors.torch import load_file

    a, b = load_file(minilm_dir / "model.safetensors"), load_file(noisy / "model.safetensors")
    out = load_file(tmp_path / "out/model.safetensors")
    name = "encoder.layer.2.intermediate.dense.weight"
    torch.testing.assert_close(out[name], (a[name] + b[name]) / 2)


def test_slerp_merge_by_hub_id(tmp_path, hub_cache, minilm_dir, reference_embeddings):
    from safetensors.torch import load_file

    noisy = perturbed_copy(minilm_dir, tmp_path / "noisy", scale=0.02, seed=2)
    original = load_file(minilm_dir / "model.safetensors")
    other = load_file(noisy / "model.safetensors")

    def recipe(t):
        return {"merge_method": "slerp", "base_model": MINILM_REPO, "parameters": {"t": t},
                "models": [{"model": MINILM_REPO}, {"model": str(noisy)}]}

    merge(recipe(0.5), tmp_path / "half", progress=False)
    cos = (embed(tmp_path / "half", SENTENCES) * reference_embeddings).sum(-1)
    assert cos.min() > 0.99
    half = load_file(tmp_path / "half/model.safetensors")
    name = "encoder.layer.4.attention.self.key.weight"
    # strictly between the two: closer to each end than the ends are to each other
    gap = (original[name] - other[name]).norm()
    assert (half[name] - original[name]).norm() < gap and (half[name] - other[name]).norm() < gap
    merge(recipe(0.0), tmp_path / "t0", progress=False)
    t0 = load_file(tmp_path / "t0/model.safetensors")
    assert all(torch.equal(t0[n], original[n]) for n in original)  # t = 0 gives base_model exactly
