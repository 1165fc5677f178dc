"""Fixtures for the merging tests: tiny transformers checkpoints built in the test, random state dicts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def _save(model, folder: Path, shard: str | None = None) -> Path:
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    return folder


def tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def tiny_bert(seed: int):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=80, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=40)
    return BertModel(config).eval()


@pytest.fixture(scope="session")
def llama_pair(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny Llama checkpoints, sharded (20 kB shards), from different seeds."""
    root = tmp_path_factory.mktemp("llama")
    return _save(tiny_llama(0), root / "a", "20KB"), _save(tiny_llama(1), root / "b", "20KB")


@pytest.fixture(scope="session")
def bert_pair(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny BERT checkpoints (single model.safetensors), from different seeds."""
    root = tmp_path_factory.mktemp("bert")
    return _save(tiny_bert(0), root / "a"), _save(tiny_bert(1), root / "b")


def random_state(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {
        "embed_tokens.weight": torch.randn(11, 6, generator=g),
        "norm.weight": torch.randn(6, generator=g),
        "lm_head.weight": torch.randn(11, 6, generator=g),
    }
    for i in range(3):
        state[f"layers.{i}.mlp.weight"] = torch.randn(7, 6, generator=g)
        state[f"layers.{i}.norm.weight"] = torch.randn(6, generator=g)
    return {k: v.to(dtype) for k, v in state.items()}


def write_safetensors(state: dict[str, torch.Tensor], folder: Path) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama base and two "fine-tunes" (base + 1% noise per tensor), plus A/B = base/ft1 names."""
    root = tmp_path_factory.mktemp("family")
    base = tiny_llama(0)
    _save(base, root / "base")
    for k in (1, 2):
        g = torch.Generator().manual_seed(k)
        model = tiny_llama(0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * p.std() * torch.randn(p.shape, generator=g))
        _save(model, root / f"ft{k}")
    return {"BASE": root / "base", "FT1": root / "ft1", "FT2": root / "ft2", "A": root / "ft1", "B": root / "ft2"}


# --- one tiny checkpoint per architecture family (hidden 16, 4 layers, vocab 64) -------------------------------
_SMALL = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=64)
FAMILY_CONFIGS: dict[str, tuple[str, str, dict]] = {  # name -> (config class, model class, config kwargs)
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_SMALL, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_SMALL, tie_word_embeddings=False)),
    # sliding window on layers >= 2: layer_types [full, full, sliding, sliding]
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_SMALL, tie_word_embeddings=False, use_sliding_window=True,
                                                      sliding_window=8, max_window_layers=2)),
    "qwen2_tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(_SMALL, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_SMALL, head_dim=8, tie_word_embeddings=False,
                                                      use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    # layer_types alternate sliding / full
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(_SMALL, head_dim=8, sliding_window=8)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_SMALL, pad_token_id=0, tie_word_embeddings=False)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=64, n_embd=16, n_layer=4, n_head=2, n_positions=64,
                                                    bos_token_id=0, eos_token_id=0)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                             num_hidden_layers=4, num_attention_heads=2,
                                                             max_position_embeddings=64, tie_word_embeddings=False)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(_SMALL, num_local_experts=2, num_experts_per_tok=1,
                                                            tie_word_embeddings=False)),
    "bert": ("BertConfig", "BertModel", dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                             num_attention_heads=2, max_position_embeddings=64)),
    "t5": ("T5Config", "T5ForConditionalGeneration", dict(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=4,
                                                           num_heads=2, decoder_start_token_id=0)),
}


def tiny_family(name: str, seed: int):
    """A tiny random model of the family `name` (see FAMILY_CONFIGS), in eval mode; every tensor (norms and
    biases too) differs between seeds."""
    import transformers

    config_cls, model_cls, kwargs = FAMILY_CONFIGS[name]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape))
    return model


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """`family_dirs(name, n=2)` -> folders of n tiny checkpoints of that family (seeds 0..n-1), each built once."""
    import transformers

    root = tmp_path_factory.mktemp("families")

    def get(name: str, n: int = 2) -> tuple[Path, ...]:
        level = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            for s in range(n):
                if not (root / f"{name}-{s}" / "config.json").exists():
                    _save(tiny_family(name, s), root / f"{name}-{s}")
        finally:
            transformers.logging.set_verbosity(level)
        return tuple(root / f"{name}-{s}" for s in range(n))

    return get


def kernel_off(fn):
    """fn() with the compiled kernels switched off (`merging.methods.kernels.compiled = None`): the torch path."""
    from merging.methods import kernels

    saved, kernels.compiled = kernels.compiled, None
    try:
        return fn()
    finally:
        kernels.compiled = saved
