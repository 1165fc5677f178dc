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
