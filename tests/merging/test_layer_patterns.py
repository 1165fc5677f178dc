"""Issue 17 follow-ups: index-derived per-layer patterns follow a frankenmerge's slices.

Older Qwen2/Qwen3 config.json files have no `layer_types`: transformers derives sliding attention from
`max_window_layers`, so a layer moved to another index would silently change attention type. Qwen-MoE's sparse
layers come from `decoder_sparse_step` (and `mlp_only_layers`) the same way. Each output layer must keep its
source layer's pattern, checked on the model transformers loads from the output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merging.architectures import _qwen_layer_types, derived_list, patch_layers
from merging.pipeline import merge
from taxonomy.errors import BasinError

F, S = "full_attention", "sliding_attention"
_SMALL = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False)
_MOE = dict(_SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, decoder_sparse_step=2)
MODELS = {  # name -> (config class, model class, kwargs)
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_SMALL, use_sliding_window=True, sliding_window=8,
                                                      max_window_layers=2)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_SMALL, head_dim=8, use_sliding_window=True, sliding_window=8,
                                                      max_window_layers=1)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(_MOE, shared_expert_intermediate_size=8,
                                                                use_sliding_window=True, sliding_window=8,
                                                                max_window_layers=3)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(_MOE, head_dim=8)),
}


def _save(folder: Path, name: str, seed: int, old: bool = True, **overrides) -> Path:
    """A tiny random checkpoint; `old`: its config.json without `layer_types` (as older transformers wrote it)."""
    import transformers

    config_cls, model_cls, kwargs = MODELS[name]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**dict(kwargs, **overrides)))
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    if old:
        config.pop("layer_types", None)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _slices(*parts: tuple[Path, int, int]) -> dict:
    return {"merge_method": "passthrough",
            "slices": [{"sources": [{"model": str(m), "layer_range": [lo, hi]}]} for m, lo, hi in parts]}


def _load(folder: Path):
    import transformers

    config = json.loads((folder / "config.json").read_text())
    model, info = getattr(transformers, config["architectures"][0]).from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info
    return model


def _loaded_types(folder: Path) -> list[str]:
    """Each source's attention types as the model transformers loads from it reports them."""
    return list(_load(folder).config.layer_types)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# --- item 1: attention types of older Qwen2/Qwen3 configs (no layer_types) ---------------------------------------
@pytest.mark.parametrize("name", ["qwen2", "qwen3", "qwen2_moe"])
def test_old_config_attention_types_follow_the_slices(tmp_path, name):
    a, b = _save(tmp_path / "a", name, 0), _save(tmp_path / "b", name, 1)
    assert "layer_types" not in json.loads((a / "config.json").read_text())
    ta, tb = _loaded_types(a), _loaded_types(b)
    assert len(set(ta)) == 2  # the fixtures mix sliding and full attention
    merge(_slices((a, 2, 4), (b, 0, 3), (a, 1, 2)), tmp_path / "out", progress=False)
    expected = ta[2:4] + tb[0:3] + ta[1:2]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 6 and config["layer_types"] == expected
    model = _load(tmp_path / "out")
    assert list(model.config.layer_types) == expected
    windows = [layer.self_attn.sliding_window for layer in model.model.layers] if name != "qwen2_moe" else []
    assert windows == [8 if t == S else None for t in expected][:len(windows)]


def test_qwen2_hand_worked_example(tmp_path):
    """max_window_layers 2 over 4 layers: [F, F, S, S]. Layers 2, 3, 0, 1 -> [S, S, F, F]; without the explicit
    list transformers would derive [F, F, S, S] for the output, swapping every layer's attention."""
    a = _save(tmp_path / "a", "qwen2", 0)
    merge(_slices((a, 2, 4), (a, 0, 2)), tmp_path / "out", progress=False)
    assert _loaded_types(tmp_path / "out") == [S, S, F, F]


def test_no_list_written_when_the_rule_already_agrees(tmp_path):
    """Layers 0-1 then 2-3 again in order (and a model without sliding window): the config is left as it was."""
    a = _save(tmp_path / "a", "qwen2", 0)
    merge(_slices((a, 0, 2), (a, 2, 4)), tmp_path / "out", progress=False)
    assert "layer_types" not in json.loads((tmp_path / "out" / "config.json").read_text())
    c = _save(tmp_path / "c", "qwen2", 0, use_sliding_window=False)
    merge(_slices((c, 0, 3), (c, 1, 4)), tmp_path / "out2", progress=False)
    config = json.loads((tmp_path / "out2" / "config.json").read_text())
    assert "layer_types" not in config and _loaded_types(tmp_path / "out2") == [F] * 6


def test_growing_past_max_window_layers_keeps_full_attention():
    """24 full-attention layers (max_window_layers 28) stacked to 40: transformers would make 28-39 sliding."""
    config = {"model_type": "qwen2", "num_hidden_layers": 24, "use_sliding_window": True, "sliding_window": 8,
              "max_window_layers": 28, "hidden_size": 16, "num_attention_heads": 2}
    patch_layers(config, [(i % 24, None) for i in range(40)])
    assert config["num_hidden_layers"] == 40 and config["layer_types"] == [F] * 40


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "qwen2_moe"])
def test_fallback_rule_matches_transformers(kind):
    """basin's copy of the Qwen rules (used without transformers) equals the installed transformers' derivation."""
    for n in (1, 4, 7):
        for window in (True, False):
            for limit in (0, 1, 3, 28):
                for sliding in (8, None):
                    config = {"model_type": kind, "num_hidden_layers": n, "use_sliding_window": window,
                              "max_window_layers": limit, "sliding_window": sliding}
                    assert _qwen_layer_types(config) == derived_list(config, "layer_types"), config


# --- item 2: MoE sparse layers (decoder_sparse_step, mlp_only_layers) ---------------------------------------------
def _mlp_kinds(model) -> list[str]:
    return ["sparse" if hasattr(layer.mlp, "experts") else "dense" for layer in model.model.layers]


@pytest.mark.parametrize("name", ["qwen2_moe", "qwen3_moe"])
@pytest.mark.parametrize("only", [[], [3]])
def test_sparse_layers_follow_the_slices(tmp_path, name, only):
    """decoder_sparse_step 2 (sparse 1, 3): layers 0, 1, 1, 2, 3 are [D, S, S, D, S], which step 2 over five layers
    (sparse 1, 3) cannot say: the output gets decoder_sparse_step 1 and mlp_only_layers = its dense layers."""
    a = _save(tmp_path / "a", name, 0, mlp_only_layers=only)
    merge(_slices((a, 0, 2), (a, 1, 4)), tmp_path / "out", progress=False)
    kinds = _mlp_kinds(_load(a))
    expected = [kinds[i] for i in (0, 1, 1, 2, 3)]
    assert expected == (["dense", "sparse", "sparse", "dense", "sparse"] if not only else
                        ["dense", "sparse", "sparse", "dense", "dense"])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["decoder_sparse_step"] == 1
    assert config["mlp_only_layers"] == [i for i, k in enumerate(expected) if k == "dense"]
    model = _load(tmp_path / "out")
    assert _mlp_kinds(model) == expected
    src, out = _tensors(a), _tensors(tmp_path / "out")
    for i, layer in enumerate((0, 1, 1, 2, 3)):  # every tensor of output layer i is its source layer's
        mine = {k.replace(f"layers.{i}.", "#"): v for k, v in out.items() if f"layers.{i}." in k}
        theirs = {k.replace(f"layers.{layer}.", "#"): v for k, v in src.items() if f"layers.{layer}." in k}
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_sparse_step_kept_when_it_agrees(tmp_path):
    """Layers 0-2 then 1-3 (sources 0, 1, 2, 1, 2, 3: [D, S, D, S, D, S]) is what step 2 gives: config untouched."""
    a = _save(tmp_path / "a", "qwen2_moe", 0)
    merge(_slices((a, 0, 3), (a, 1, 4)), tmp_path / "out", progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["decoder_sparse_step"] == 2 and config["mlp_only_layers"] == []
    assert _mlp_kinds(_load(tmp_path / "out")) == ["dense", "sparse"] * 3


@pytest.mark.parametrize("dry_run", [True, False])
def test_check_loadable_catches_a_sparse_mismatch(tmp_path, monkeypatch, dry_run):
    """Without the explicit pattern, the layer count alone would give transformers the wrong MLPs: refused."""
    import merging.architectures as arch

    monkeypatch.setattr(arch, "_patch_sparse", lambda target, sparse: None)
    a = _save(tmp_path / "a", "qwen2_moe", 0)
    with pytest.raises(BasinError, match=r"would not load in transformers as Qwen2MoeForCausalLM \(5 layers\): "
                                         r"(missing|unexpected) model\.layers\.\d\.mlp"):
        merge(_slices((a, 0, 2), (a, 1, 4)), tmp_path / "out", progress=False, dry_run=dry_run)
    assert not (tmp_path / "out").exists()


def test_without_transformers_the_qwen_rule_is_basin_own(monkeypatch):
    """transformers absent: the Qwen2 derivation still gives each output layer its source layer's type."""
    import merging.architectures as arch

    def absent(config, key):
        raise ImportError("no transformers")

    monkeypatch.setattr(arch, "_transformers_list", absent)
    arch._derived_cached.cache_clear()
    try:
        config = {"model_type": "qwen2", "num_hidden_layers": 4, "use_sliding_window": True, "sliding_window": 8,
                  "max_window_layers": 2}
        patch_layers(config, [(2, None), (3, None), (0, None)])
        assert config["layer_types"] == [S, S, F]
        gpt2 = {"model_type": "gpt2", "n_layer": 4}
        patch_layers(gpt2, [(0, None), (0, None)])
        assert gpt2 == {"model_type": "gpt2", "n_layer": 2}
    finally:
        arch._derived_cached.cache_clear()


def test_smollm3_no_rope_layers_derived_from_the_interval():
    """The same class of rule elsewhere: SmolLM3 derives no_rope_layers from no_rope_layer_interval (4: every
    fourth layer without RoPE); a reordered stack gets the explicit list of its source layers."""
    config = {"model_type": "smollm3", "num_hidden_layers": 8, "no_rope_layer_interval": 4, "hidden_size": 16,
              "num_attention_heads": 2}
    patch_layers(config, [(3, None), (0, None), (7, None), (1, None)])
    assert config["no_rope_layers"] == [0, 1, 0, 1]


def test_llama4_moe_layers_derived_from_the_interleave_step():
    """Llama 4 text: interleave_moe_layer_step 2 -> moe_layers [1, 3]; layers 0, 1, 1, 2, 3 -> MoE at 1, 2, 4
    (the step over five layers would give [1, 3])."""
    config = {"model_type": "llama4_text", "num_hidden_layers": 4, "interleave_moe_layer_step": 2,
              "hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8}
    assert derived_list(config, "moe_layers") == [1, 3]
    patch_layers(config, [(0, None), (1, None), (1, None), (2, None), (3, None)])
    assert config["moe_layers"] == [1, 2, 4] and config["num_hidden_layers"] == 5
    same = {"model_type": "llama4_text", "num_hidden_layers": 4, "interleave_moe_layer_step": 2}
    patch_layers(same, [(0, None), (1, None), (2, None), (3, None), (0, None), (1, None)])
    assert "moe_layers" not in same  # the step already gives [1, 3, 5]


def test_deepseek_dense_prefix_cannot_be_reordered(tmp_path):
    """DeepSeek-V3's dense layers are the first `first_k_dense_replace`, a rule no explicit list can override:
    layers 2-3 (MoE) before 0-1 (dense) is refused by the loadability check, one line, nothing written."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                              num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4,
                              num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=2, q_lora_rank=8,
                              kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=4,
                              max_position_embeddings=64)
    torch.manual_seed(0)
    DeepseekV3ForCausalLM(config).save_pretrained(tmp_path / "a")
    message = r"as DeepseekV3ForCausalLM \(4 layers\): missing model\.layers\.0\.mlp\."
    with pytest.raises(BasinError, match=message) as e:
        merge(_slices((tmp_path / "a", 2, 4), (tmp_path / "a", 0, 2)), tmp_path / "out", progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
