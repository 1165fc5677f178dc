"""`merging.moe.decoder`: basin's own forward pass for `gate_mode: hidden` against transformers' (issue 22).

Tiny random Llama, Mistral, Qwen2 and Qwen3 models (every weight, norms and biases included, drawn at random), GQA,
tied and untied embeddings, the RoPE types the module covers, sliding windows shorter than some prompts: each
decoder layer's input (last token and token mean) equals what transformers computes, through basin's transformers
path (forward pre-hooks on the model class) in float32, and through `from_pretrained(...)` +
`output_hidden_states` (an independent computation) in float32 and bfloat16.
"""

from __future__ import annotations

import json

import pytest
import torch

from merging.io.checkpoint import open_checkpoint, read_config
from merging.moe import decoder, router
from merging.moe.hf_config import read_dense

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 0.5, "high_freq_factor": 2.0,
          "original_max_position_embeddings": 32, "rope_theta": 10000.0}  # wavelengths 6.3, 63, 628: one per band
CASES = {  # name -> (config class, model class, config fields beyond TINY)
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "llama_tied_mha": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, num_key_value_heads=4)),
    "llama_bias": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=True, mlp_bias=True, head_dim=12)),
    "llama_linear": ("LlamaConfig", "LlamaForCausalLM",
                     dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0})),
    "llama_dynamic": ("LlamaConfig", "LlamaForCausalLM",
                      dict(rope_parameters={"rope_type": "dynamic", "factor": 3.0, "rope_theta": 10000.0})),
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters=LLAMA3, max_position_embeddings=64)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=4)),
    "mistral_nowindow": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None, tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=3,
                                                      max_window_layers=1)),
    "qwen2_tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True, rope_theta=1000000.0)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16, use_sliding_window=True, sliding_window=5,
                                                      max_window_layers=2)),
    "qwen3_tied": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=True, head_dim=8)),
}
LENGTHS = (1, 2, 3, 5, 9, 17)  # past every sliding window above, within max_position_embeddings


def _save(case: str, folder) -> None:
    import transformers

    cfg_name, model_name, extra = CASES[case]
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(getattr(transformers, cfg_name)(**TINY | extra))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith("norm.weight") else 0.0
            p.copy_(base + torch.randn(p.shape, generator=g) * (0.1 if base else 0.3))
    model.save_pretrained(folder)


def _prompts() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randint(0, TINY["vocab_size"], (1, t), generator=g) for t in LENGTHS]


def _native(folder, prompts, dtype, average=False):
    ckpt = open_checkpoint(str(folder))
    spec = decoder.spec_of(read_dense(read_config(ckpt)), max(p.shape[1] for p in prompts))
    assert spec is not None
    return decoder.layer_inputs(ckpt.get, spec, prompts, dtype, average=average)


def _reference(folder, prompts, dtype, average=False):
    """hidden_states[:-1] of transformers' own loading and forward pass."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            states = model(input_ids=ids, output_hidden_states=True).hidden_states[:-1]
            out.append(torch.stack([s[0].mean(dim=0) if average else s[0, -1] for s in states]))
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoder")
    out = {}
    for case in CASES:
        _save(case, root / case)
        out[case] = root / case
    # a transformers 4.x config.json (rope_theta and rope_scaling at the top), as Llama 3.1 checkpoints ship it
    _save("llama3", root / "llama3_legacy")
    path = root / "llama3_legacy" / "config.json"
    raw = json.loads(path.read_text())
    rope = raw.pop("rope_parameters")
    raw.update(rope_theta=rope.pop("rope_theta"), rope_scaling=rope, torch_dtype="float32",
               transformers_version="4.44.0")
    raw.pop("dtype", None)
    path.write_text(json.dumps(raw))
    out["llama3_legacy"] = root / "llama3_legacy"
    return out


@pytest.mark.parametrize("case", [*CASES, "llama3_legacy"])
def test_layer_inputs_equal_transformers_float32(folders, case):
    prompts = _prompts()
    ckpt = open_checkpoint(str(folders[case]))
    model = router.base_model(ckpt, torch.float32, "cpu")
    for average in (False, True):
        ours = _native(folders[case], prompts, torch.float32, average)
        hooked = router.layer_inputs(model, prompts, average)
        theirs = _reference(folders[case], prompts, torch.float32, average)
        for a, b, c in zip(ours, hooked, theirs):
            assert a.shape == (TINY["num_hidden_layers"], TINY["hidden_size"]) and a.dtype == torch.float32
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # float32 BLAS rounding differs by CPU
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["llama", "llama_bias", "llama3", "mistral", "qwen2", "qwen3", "qwen3_tied"])
def test_layer_inputs_equal_transformers_bfloat16(folders, case):
    """In bfloat16 every op is bfloat16's (the RoPE frequencies float32, as `from_pretrained` keeps them): the two
    agree to its rounding (in fact bit for bit, the same ops in the same order)."""
    prompts = _prompts()
    for average in (False, True):
        ours = _native(folders[case], prompts, torch.bfloat16, average)
        theirs = _reference(folders[case], prompts, torch.bfloat16, average)
        for a, b in zip(ours, theirs):
            assert a.dtype == b.dtype == torch.bfloat16
            torch.testing.assert_close(a, b)  # bfloat16's tolerance: rtol 1.6e-2


def test_the_last_layer_is_never_read(folders):
    ckpt = open_checkpoint(str(folders["llama"]))
    read: list[str] = []

    def get(name: str) -> torch.Tensor:
        read.append(name)
        return ckpt.get(name)

    spec = decoder.spec_of(read_dense(read_config(ckpt)), 5)
    decoder.layer_inputs(get, spec, _prompts(), torch.float32)
    last = f"model.layers.{TINY['num_hidden_layers'] - 1}."
    assert read and not any(n.startswith(last) for n in read) and len(read) == len(set(read))
    assert "model.layers.0.self_attn.q_proj.weight" in read


def test_configs_outside_the_forward_are_left_to_transformers(folders):
    raw = read_dense(read_config(open_checkpoint(str(folders["llama"]))))
    assert decoder.spec_of(raw, 32) is not None
    dynamic = read_dense(read_config(open_checkpoint(str(folders["llama_dynamic"]))))
    assert decoder.spec_of(dynamic, 32) is not None
    assert decoder.spec_of(dynamic, 33) is None  # dynamic NTK recomputes its frequencies past the trained length
    for change in ({"hidden_act": "gelu"}, {"model_type": "gemma"}, {"rope_parameters": {"rope_type": "yarn"}},
                   {"num_key_value_heads": 3}, {"rope_parameters": dict(raw["rope_parameters"],
                                                                        partial_rotary_factor=0.5)}):
        assert decoder.spec_of({**raw, **change}, 5) is None, change
    qwen = read_dense(read_config(open_checkpoint(str(folders["qwen2"]))))
    assert decoder.spec_of(qwen, 5).windows == (None, 3, 3)
    assert decoder.spec_of({**qwen, "layer_types": ["full_attention", "chunked_attention", "full_attention"]},
                           5) is None
    assert decoder.spec_of({**qwen, "sliding_window": None}, 5) is None  # sliding layers without a window
    assert decoder.spec_of(None, 5) is None
