"""Permutation alignment of transformers: tiny BERT and Llama from configs, the real all-MiniLM-L6-v2,
checkpoint alignment for recipes and `basin align`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from merging.alignment import (
    align_checkpoints,
    apply_permutation,
    infer_spec,
    random_permutation,
    spec_from_hf_folder,
    weight_matching,
)
from merging.io.checkpoint import StateDictCheckpoint, open_checkpoint
from taxonomy.errors import BasinError

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(kind: str):
    torch.manual_seed(0)
    common = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24,
                  max_position_embeddings=32)
    if kind == "bert":
        return transformers.BertModel(transformers.BertConfig(**common)).eval()
    if kind == "bert_cls":
        return transformers.BertForSequenceClassification(transformers.BertConfig(**common, num_labels=3)).eval()
    if kind == "llama_gqa":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, num_key_value_heads=2)).eval()
    return transformers.LlamaModel(transformers.LlamaConfig(**common)).eval()


def _outputs(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("kind", ["bert", "bert_cls", "llama_gqa", "llama"])
def test_transformer_permutation_keeps_outputs_and_is_recovered(kind):
    model = tiny(kind)
    spec = infer_spec(model)
    head = kind in ("bert_cls", "llama_gqa")
    assert ("P_res" in spec.sizes) == head  # the residual stream is permuted only when a head reads it
    assert spec.sizes["P_heads_0"] == (2 if kind == "llama_gqa" else 4)
    perms = random_permutation(spec, seed=1)
    permuted = tiny(kind)
    permuted.load_state_dict(apply_permutation(model.state_dict(), spec, perms))
    ids = torch.randint(0, 40, (2, 9))
    torch.testing.assert_close(_outputs(permuted, ids), _outputs(model, ids), atol=1e-5, rtol=1e-5)
    result = weight_matching(model.state_dict(), permuted.state_dict(), spec, seed=0)
    for g, p in perms.items():
        assert torch.equal(result.perms[g], torch.argsort(p)), g


def test_residual_stream_is_shared_through_the_norms():
    spec = infer_spec(tiny("llama_gqa"))
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.1.mlp.up_proj.weight", "lm_head.weight"):
        assert spec.axes[name][1] == "P_res", name
    for name in ("model.layers.0.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight",
                 "model.norm.weight", "model.layers.1.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        assert spec.axes[name][0] == "P_res", name


def test_unknown_transformer_tensors_are_refused():
    with pytest.raises(BasinError, match="model_type 'gpt2'"):
        spec_from_hf_folder_like({"h.0.attn.c_attn.weight": (4, 12)}, {"model_type": "gpt2"})
    shapes = {k: tuple(v.shape) for k, v in tiny("bert").state_dict().items()}
    shapes["encoder.layer.0.attention.self.extra.weight"] = (16, 16)
    with pytest.raises(BasinError, match="extra.weight"):
        spec_from_hf_folder_like(shapes, tiny("bert").config.to_dict())


def spec_from_hf_folder_like(shapes, config):
    from merging.alignment import transformer_spec

    return transformer_spec(shapes, config)


def test_real_minilm_permutation_invariance_and_recovery(minilm_dir):
    model = transformers.AutoModel.from_pretrained(minilm_dir).eval()
    spec = infer_spec(model)
    assert set(spec.sizes) == {f"P_{k}_{i}" for k in ("heads", "ff") for i in range(6)}
    perms = random_permutation(spec, seed=0)
    permuted = transformers.AutoModel.from_pretrained(minilm_dir).eval()
    permuted.load_state_dict(apply_permutation(model.state_dict(), spec, perms))
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        a, b = model(input_ids=ids), permuted(input_ids=ids)
    torch.testing.assert_close(b.last_hidden_state, a.last_hidden_state, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b.pooler_output, a.pooler_output, atol=1e-5, rtol=1e-4)
    # with the residual stream permuted too, the hidden states are permuted the same way
    full = infer_spec(model, residual=True)
    perms = random_permutation(full, seed=1)
    permuted.load_state_dict(apply_permutation(model.state_dict(), full, perms))
    with torch.no_grad():
        c = permuted(input_ids=ids)
    torch.testing.assert_close(c.last_hidden_state, a.last_hidden_state[..., perms["P_res"]], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(c.pooler_output, a.pooler_output, atol=1e-5, rtol=1e-4)


def test_align_checkpoints_recovers_a_permuted_minilm(minilm_dir):
    ref = open_checkpoint(minilm_dir)
    state = {n: ref.get(n) for n in ref.names()}
    spec = spec_from_hf_folder(minilm_dir, {n: tuple(t.shape) for n, t in state.items()})
    perms = random_permutation(spec, seed=4)
    other = StateDictCheckpoint(apply_permutation(state, spec, perms), label="permuted", folder=minilm_dir)
    aligned = align_checkpoints([ref, other], 0, {"seed": 0})
    assert aligned[0] is ref
    for name in state:
        assert torch.equal(aligned[1].get(name), state[name]), name
    with pytest.raises(BasinError, match="reference index 2"):
        align_checkpoints([ref, other], 2, {})


def test_cli_align_writes_b_permuted_onto_a(tmp_path):
    from evaluations.cli import main

    model = tiny("bert")
    spec = infer_spec(model)
    a_dir, b_dir, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    model.save_pretrained(a_dir)
    permuted = tiny("bert")
    permuted.load_state_dict(apply_permutation(model.state_dict(), spec, random_permutation(spec, seed=9)))
    permuted.save_pretrained(b_dir)
    assert main(["align", str(a_dir), str(b_dir), str(out), "--seed", "3"]) == 0
    written, original = load_file(out / "model.safetensors"), load_file(a_dir / "model.safetensors")
    assert written.keys() == original.keys()
    for name in original:
        assert torch.equal(written[name], original[name]), name
    assert (out / "config.json").read_text() == (b_dir / "config.json").read_text()
    assert json.loads((out / "alignment.json").read_text())["converged"] is True
    assert main(["align", str(a_dir), str(b_dir), str(out)]) == 2  # exists, no --overwrite
    assert main(["align", str(a_dir), str(b_dir), str(out), "--overwrite"]) == 0


def test_cli_align_with_a_model_factory(tmp_path):
    from safetensors.torch import save_file

    from evaluations.cli import main
    from evaluations.digits import make_mlp

    factory = tmp_path / "factory.py"
    factory.write_text("from evaluations.digits import make_mlp\n\ndef build():\n    return make_mlp([64, 8, 10])\n"
                       "\ndef data():\n    import torch\n    return torch.randn(50, 64, generator=torch.Generator()"
                       ".manual_seed(0))\n")
    a, b = make_mlp([64, 8, 10], seed=0).state_dict(), make_mlp([64, 8, 10], seed=1).state_dict()
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors")
    for method in ("weight_matching", "activation_matching"):
        out = tmp_path / method
        args = ["align", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), str(out), "--method",
                method, "--model-factory", f"{factory}:build", "--data", f"{factory}:data"]
        assert main(args) == 0
        written = load_file(out / "model.safetensors")
        x = torch.randn(4, 64)
        m_b, m_w = make_mlp([64, 8, 10]), make_mlp([64, 8, 10])
        m_b.load_state_dict(b)
        m_w.load_state_dict(written)
        torch.testing.assert_close(m_w(x), m_b(x))  # same function, permuted units
    bad = ["align", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), str(tmp_path / "x")]
    assert main(bad) == 2  # no config.json and no factory: a clear error, no traceback


@pytest.mark.parametrize("kind", ["bert", "llama_gqa"])
def test_activation_matching_on_transformers(kind):
    from merging.alignment import activation_matching

    model = tiny(kind)
    spec = infer_spec(model)
    perms = random_permutation(spec, seed=2)
    permuted = tiny(kind)
    permuted.load_state_dict(apply_permutation(model.state_dict(), spec, perms))
    ids = torch.randint(0, 40, (8, 12), generator=torch.Generator().manual_seed(0))
    result = activation_matching(model, permuted, spec, {"input_ids": ids})
    for g, p in perms.items():
        assert torch.equal(result.perms[g], torch.argsort(p)), g
    with pytest.raises(BasinError, match="does not fit model A"):
        activation_matching(model, permuted, spec, {"input_ids": torch.randn(8, 12)})


def test_recipe_align_before_a_linear_merge(tmp_path):
    """`align: weight_matching` in a recipe: averaging A with a permuted copy of A gives A back."""
    from merging.pipeline import merge

    model = tiny("bert")
    spec = infer_spec(model)
    model.save_pretrained(tmp_path / "a")
    permuted = tiny("bert")
    permuted.load_state_dict(apply_permutation(model.state_dict(), spec, random_permutation(spec, seed=5)))
    permuted.save_pretrained(tmp_path / "b")
    recipe = {"merge_method": "linear", "dtype": "float32", "align": "weight_matching",
              "models": [{"model": str(tmp_path / m), "parameters": {"weight": 1.0}} for m in ("a", "b")]}
    merge(recipe, tmp_path / "out", progress=False)
    merged = load_file(tmp_path / "out" / "model.safetensors")
    original = load_file(tmp_path / "a" / "model.safetensors")
    for name, tensor in original.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(merged[name], tensor, atol=1e-6, rtol=1e-6)


def test_cli_activation_matching_on_hf_folders(tmp_path):
    """No model factory: the architecture is built from config.json with transformers."""
    from evaluations.cli import main

    model = tiny("bert")
    spec = infer_spec(model)
    model.save_pretrained(tmp_path / "a")
    permuted = tiny("bert")
    permuted.load_state_dict(apply_permutation(model.state_dict(), spec, random_permutation(spec, seed=8)))
    permuted.save_pretrained(tmp_path / "b")
    data = tmp_path / "data.py"
    data.write_text("import torch\n\ndef ids():\n    g = torch.Generator().manual_seed(0)\n"
                    "    return [{'input_ids': torch.randint(0, 40, (8, 12), generator=g)}]\n")
    out = tmp_path / "out"
    assert main(["align", str(tmp_path / "a"), str(tmp_path / "b"), str(out), "--method", "activation_matching",
                 "--data", f"{data}:ids"]) == 0
    written, original = load_file(out / "model.safetensors"), load_file(tmp_path / "a" / "model.safetensors")
    for name in original:
        assert torch.equal(written[name], original[name]), name


def test_factories_returning_the_wrong_type_are_one_line_errors(tmp_path):
    """A config.json naming a non-model transformers class, or a model factory returning a dict: a BasinError
    naming the folder / option, not an AttributeError from deep inside the matching."""
    from merging.alignment.checkpoints import hf_factory, match

    model = tiny("bert")
    model.save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    (tmp_path / "a" / "config.json").write_text(json.dumps({**config, "architectures": ["BertTokenizer"]}))
    with pytest.raises(BasinError, match=r"config.json: architectures \['BertTokenizer'\].*not a transformers model"):
        hf_factory(tmp_path / "a")()
    (tmp_path / "a" / "config.json").write_text(json.dumps({**config, "architectures": ["BertModel"]}))
    assert isinstance(hf_factory(tmp_path / "a")(), transformers.BertModel)
    state = model.state_dict()
    spec = infer_spec(model)
    options = {"method": "activation_matching", "data": {"input_ids": torch.zeros(2, 4, dtype=torch.long)},
               "model_factory": lambda: {"not": "a model"}}
    with pytest.raises(BasinError, match="align: model_factory: returned a dict, not an nn.Module"):
        match(state, state, spec, options)
