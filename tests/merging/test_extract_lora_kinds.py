"""extract-lora's module kinds of Llama-shaped decoders from tensor names equal transformers' meta-device build."""

from __future__ import annotations

import json

import pytest

from merging.extraction.modules import _decoder_kinds, _meta_model, module_kinds
from tests.merging.conftest import tiny_family


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen2_tied", "qwen3"])
def test_decoder_kinds_from_names_equal_the_meta_build(family):
    model = tiny_family(family, 0)
    config = dict(json.loads(model.config.to_json_string()), architectures=[type(model).__name__])  # as saved
    names = list(model.state_dict())
    if model.config.tie_word_embeddings:
        names.remove("lm_head.weight")  # as saved
    fast = _decoder_kinds(config, names)
    assert fast is not None
    built = _meta_model(config)
    head = built.get_output_embeddings()
    slow = module_kinds(config)  # no names: the meta build
    assert slow.kinds is not fast.kinds and len(slow.kinds) > len(fast.kinds)
    for name in names:
        module = name.rpartition(".")[0]
        assert fast.kind(module, name, ()) == slow.kind(module, name, ()), name
    assert (fast.source, fast.causal_lm) == (slow.source, slow.causal_lm)
    assert fast.output_embedding == slow.output_embedding == next(n for n, m in built.named_modules() if m is head)


def test_unknown_names_or_classes_fall_back_to_the_build():
    config = dict(json.loads(tiny_family("llama", 0).config.to_json_string()), architectures=["LlamaForCausalLM"])
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"]
    assert _decoder_kinds(config, names) is not None
    assert _decoder_kinds(config, [*names, "model.layers.0.extra.weight"]) is None
    assert _decoder_kinds(config, [*names, f"model.layers.{config['num_hidden_layers']}.mlp.up_proj.weight"]) is None
    assert _decoder_kinds(config, [*names, "model.layers.0.self_attn.q_norm.weight"]) is None  # Qwen3's only
    assert _decoder_kinds(dict(config, architectures=["GPT2LMHeadModel"]), names) is None
    assert module_kinds(config, [*names, "model.layers.0.extra.weight"]).kind(
        "model.layers.0.extra", "model.layers.0.extra.weight", (4, 4)) == "unknown"
