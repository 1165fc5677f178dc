"""The streaming merge end to end: bit-identity, agreement with the in-memory merge, determinism,
dtype, and real transformers checkpoints (tiny Llama sharded, tiny BERT) that load and run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from merging import merge, merge_state_dicts, open_checkpoint
from tests.merging.conftest import random_state, write_safetensors


def _load_all(folder):
    ckpt = open_checkpoint(folder)
    return {n: ckpt.get(n) for n in ckpt.names()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_self_merge_is_bit_identical(tmp_path, dtype):
    folder = write_safetensors(random_state(0, dtype) | {"ids": torch.arange(4)}, tmp_path / "m")
    for k, models in enumerate(([str(folder)], [str(folder), str(folder)])):
        out = tmp_path / f"out{k}"
        merge({"merge_method": "linear", "models": models}, out, progress=False)
        reference = load_file(folder / "model.safetensors")
        merged = load_file(out / "model.safetensors")
        assert merged.keys() == reference.keys()
        assert all(merged[n].dtype == reference[n].dtype and torch.equal(merged[n], reference[n]) for n in reference)


def test_streamed_equals_in_memory_merge(tmp_path):
    states = [random_state(s) for s in range(3)]
    folders = [write_safetensors(s, tmp_path / f"m{i}") for i, s in enumerate(states)]
    weights = [0.2, 0.5, 1.3]
    recipe = {"merge_method": "linear", "seed": 3,
              "models": [{"model": str(f), "parameters": {"weight": w}} for f, w in zip(folders, weights)]}
    merge(recipe, tmp_path / "out", progress=False, shard_size=300)
    streamed = _load_all(tmp_path / "out")
    in_memory = merge_state_dicts("linear", states, params={"weight": weights}, seed=3)
    assert streamed.keys() == in_memory.keys()
    assert all(torch.equal(streamed[n], in_memory[n]) for n in in_memory)
    # and against the formula itself
    expected = sum(w * s["norm.weight"] for w, s in zip(weights, states)) / sum(weights)
    torch.testing.assert_close(streamed["norm.weight"], expected)


def test_same_recipe_and_seed_is_bit_identical(tmp_path):
    folders = [write_safetensors(random_state(s), tmp_path / f"m{s}") for s in range(2)]
    recipe = {"merge_method": "linear", "seed": 11, "models": [str(f) for f in folders],
              "parameters": {"weight": [0.1, 0.9]}}
    r1 = merge(recipe, tmp_path / "o1", progress=False)
    r2 = merge(recipe, tmp_path / "o2", progress=False)
    assert r1.content_hash == r2.content_hash
    assert (tmp_path / "o1/model.safetensors").read_bytes() == (tmp_path / "o2/model.safetensors").read_bytes()


def test_largest_tensors_are_merged_first_into_the_plans_layout(tmp_path, monkeypatch):
    import merging.methods.apply

    merged_order = []
    original = merging.methods.apply.merge_tensor

    def recording(method, name, *args, **kwargs):
        merged_order.append(name)
        return original(method, name, *args, **kwargs)

    monkeypatch.setattr(merging.methods.apply, "merge_tensor", recording)
    states = [random_state(s) for s in range(2)]
    folders = [write_safetensors(s, tmp_path / f"m{i}") for i, s in enumerate(states)]
    merge({"merge_method": "linear", "models": [str(f) for f in folders]}, tmp_path / "out", progress=False)
    sizes = [states[0][n].numel() for n in merged_order]
    assert sorted(merged_order) == sorted(states[0]) and sizes == sorted(sizes, reverse=True)
    assert merged_order[:2] == ["embed_tokens.weight", "lm_head.weight"]  # equal sizes: in the plan's order
    # the file is laid out as planned, whatever the merge order: byte offsets ascend in the plan's order
    from merging.pipeline import load_recipe, open_inputs
    from merging.plan.tensors import build_plan

    recipe = load_recipe({"merge_method": "linear", "models": [str(f) for f in folders]})
    planned = [t.name for t in build_plan(recipe, open_inputs(recipe)).tensors]
    raw = (tmp_path / "out/model.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    by_offset = [n for _, n in sorted((v["data_offsets"][0], n) for n, v in header.items() if n != "__metadata__")]
    assert by_offset == planned != merged_order
    merged = _load_all(tmp_path / "out")
    assert all(torch.equal(merged[n], (states[0][n] + states[1][n]) / 2) for n in states[0])


def test_output_dtype(tmp_path):
    states = [random_state(s) for s in range(2)]
    folders = [write_safetensors(s, tmp_path / f"m{i}") for i, s in enumerate(states)]
    merge({"merge_method": "linear", "models": [str(f) for f in folders], "dtype": "bfloat16"}, tmp_path / "out",
          progress=False)
    out = _load_all(tmp_path / "out")
    expected = ((states[0]["lm_head.weight"] + states[1]["lm_head.weight"]) / 2).to(torch.bfloat16)
    assert out["lm_head.weight"].dtype == torch.bfloat16 and torch.equal(out["lm_head.weight"], expected)


def test_tiny_llama_sharded_merge_loads_and_runs(tmp_path, llama_pair):
    from transformers import AutoModelForCausalLM

    a, b = llama_pair
    recipe = {"merge_method": "linear", "base_model": str(a), "models": [
        {"model": str(a), "parameters": {"weight": [1.0, 0.0]}}, {"model": str(b), "parameters": {"weight": 1.0}}]}
    report = merge(recipe, tmp_path / "out", shard_size="30KB", progress=False)
    out = tmp_path / "out"
    assert len(report.shards) > 1 and (out / "model.safetensors.index.json").exists()
    assert (out / "config.json").exists() and (out / "generation_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ma, mb = (AutoModelForCausalLM.from_pretrained(p).eval() for p in llama_pair)
    # weight gradient [1, 0] over 3 layers: model a's weight is 1, 0.5, 0 at layers 0, 1, 2; b's is 1
    sa, sb, sm = ma.state_dict(), mb.state_dict(), model.state_dict()
    for i, wa in enumerate([1.0, 0.5, 0.0]):
        name = f"model.layers.{i}.mlp.up_proj.weight"
        torch.testing.assert_close(sm[name], (wa * sa[name] + sb[name]) / (wa + 1.0))
    # outside the layers t = 0 (mergekit): a's weight is 1, as at layer 0
    torch.testing.assert_close(sm["lm_head.weight"], (sa["lm_head.weight"] + sb["lm_head.weight"]) / 2)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 3]])).logits
    assert logits.shape == (1, 4, 96) and torch.isfinite(logits).all()
    card = (out / "README.md").read_text()
    assert report.content_hash in card and "merge_method: linear" in card


def test_tiny_bert_merge_loads_and_runs(tmp_path, bert_pair):
    from transformers import AutoModel

    report = merge({"merge_method": "linear", "models": [str(p) for p in bert_pair]}, tmp_path / "out",
                   dtype="float16", progress=False)
    model = AutoModel.from_pretrained(tmp_path / "out").eval()
    assert json.loads((tmp_path / "out/config.json").read_text())["torch_dtype"] == "float16"
    sa, sb = (AutoModel.from_pretrained(p).state_dict() for p in bert_pair)
    name = "encoder.layer.1.attention.self.query.weight"
    torch.testing.assert_close(model.state_dict()[name].float(), ((sa[name] + sb[name]) / 2).half().float())
    with torch.no_grad():
        hidden = model.float()(torch.tensor([[2, 7, 11]])).last_hidden_state
    assert hidden.shape == (1, 3, 32) and torch.isfinite(hidden).all()
    assert report.tensors == len(load_file(tmp_path / "out/model.safetensors"))


def test_align_field_calls_alignment_before_merging(tmp_path, monkeypatch):
    import importlib
    import sys

    from merging.io.checkpoint import StateDictCheckpoint
    from taxonomy.errors import BasinError

    folders = [write_safetensors(random_state(s), tmp_path / f"m{s}") for s in range(2)]
    recipe = {"merge_method": "linear", "models": [str(f) for f in folders], "base_model": str(folders[1]),
              "align": {"method": "weight_matching", "max_iter": 3}}
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "merging.alignment", None)  # as if alignment were not installed
        with pytest.raises(BasinError, match="alignment is not available"):
            merge(recipe, tmp_path / "none", progress=False)
    assert not (tmp_path / "none").exists()
    calls = []

    def fake_align(checkpoints, reference_index, options):  # records the call helper A's function gets
        calls.append((reference_index, options))
        return [StateDictCheckpoint({n: torch.zeros_like(c.get(n)) for n in c.names()}) for c in checkpoints]

    monkeypatch.setattr(importlib.import_module("merging.alignment"), "align_checkpoints", fake_align)
    merge(recipe, tmp_path / "out", progress=False)
    # base_model (listed second in model_refs order: base first) is the reference; options pass through
    assert calls == [(0, {"method": "weight_matching", "max_iter": 3})]
    assert all(torch.count_nonzero(t) == 0 for t in _load_all(tmp_path / "out").values())


def tiny_mlp():
    """Model factory for the alignment test (named in the recipe as module:function)."""
    from evaluations.digits import make_mlp

    return make_mlp([64, 32, 16, 10], seed=0)


def test_weight_matching_then_merge_recovers_a_permuted_copy(tmp_path):
    """A model merged with a hidden-unit permutation of itself: after weight matching, exactly itself."""
    state = {k: v.detach().clone() for k, v in tiny_mlp().state_dict().items()}
    g = torch.Generator().manual_seed(1)
    p1, p2 = torch.randperm(32, generator=g), torch.randperm(16, generator=g)
    permuted = {"0.weight": state["0.weight"][p1], "0.bias": state["0.bias"][p1],
                "2.weight": state["2.weight"][p2][:, p1], "2.bias": state["2.bias"][p2],
                "4.weight": state["4.weight"][:, p2], "4.bias": state["4.bias"]}
    a, b = write_safetensors(state, tmp_path / "a"), write_safetensors(permuted, tmp_path / "b")
    plain = merge({"merge_method": "linear", "models": [str(a), str(b)]}, tmp_path / "plain", progress=False)
    assert plain.tensors == 6
    assert not torch.equal(_load_all(tmp_path / "plain")["0.weight"], state["0.weight"])
    recipe = {"merge_method": "linear", "models": [str(a), str(b)],
              "align": {"method": "weight_matching", "model_factory": "tests.merging.test_engine_stream:tiny_mlp"}}
    merge(recipe, tmp_path / "out", progress=False)
    out = _load_all(tmp_path / "out")
    assert all(torch.equal(out[n], state[n]) for n in state)


def test_tokenizer_source_copies_only_tokenizer_files(tmp_path, bert_pair, minilm_dir):
    recipe = {"merge_method": "linear", "models": [str(p) for p in bert_pair], "tokenizer_source": str(minilm_dir)}
    merge(recipe, tmp_path / "out", progress=False)  # MiniLM's weights differ in shape: never opened
    out = tmp_path / "out"
    assert (out / "vocab.txt").read_bytes() == (minilm_dir / "vocab.txt").read_bytes()
    assert (out / "tokenizer.json").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_size"] == 32  # config from the first model, not from the tokenizer source


def test_chunked_elementwise_merge_matches_formula_and_is_thread_independent():
    from merging.methods.apply import CHUNK_ELEMENTS, full_params, merge_tensor
    from merging.methods.catalog import get_method
    from merging.methods.chunking import set_chunk_workers

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3 * CHUNK_ELEMENTS + 17, generator=g).to(torch.bfloat16) for _ in range(3)]
    base = torch.randn(xs[0].shape, generator=g).to(torch.bfloat16)
    params = {"weight": [0.5, -1.0, 2.0], "normalize": False}
    expected = sum(w * x.float() for w, x in zip(params["weight"], xs))
    outs = []
    for workers in (1, 3):
        old = set_chunk_workers(workers)
        try:
            outs.append(merge_tensor(get_method("linear"), "w", xs, None, params, 0, torch.float32))
        finally:
            set_chunk_workers(old)
    torch.testing.assert_close(outs[0], expected)
    assert torch.equal(outs[0], outs[1])
    method = get_method("task_arithmetic")
    ta = merge_tensor(method, "w", xs, base, full_params(method, {"lambda": 0.5}, 3), 0, torch.float32)
    b = base.float()
    torch.testing.assert_close(ta, b + 0.5 * sum(x.float() - b for x in xs))
