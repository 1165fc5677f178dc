"""Tiny checkpoints of every kind `evaluations.model_losses` measures, each saved with a tokenizer, and data files.

Causal LMs (Llama, GPT-2) and a Llama classifier use a word-level tokenizer over WORDS; the BERTs (masked LM,
classifier, bare encoder) the real all-MiniLM-L6-v2 WordPiece tokenizer (vocabulary 30522, [CLS]/[SEP]/[MASK])."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

WORDS = ["<unk>", "<s>", "</s>", "apple", "banana", "cherry", "date", "elder", "fig", "grape"]
BERT_TOKENIZER = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"]
NUM_LABELS = 3


def _word_tokenizer():
    from tests.merging.test_vocab_llama import word_tokenizer

    return word_tokenizer(WORDS)


def _llama(cls_name: str = "LlamaForCausalLM"):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                   num_labels=NUM_LABELS, pad_token_id=0)
    return getattr(transformers, cls_name)(cfg)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=len(WORDS), n_embd=16, n_layer=2, n_head=2, n_positions=24,
                                      bos_token_id=1, eos_token_id=2))


def _bert(cls_name: str):
    import transformers

    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=40, num_labels=NUM_LABELS)
    return getattr(transformers, cls_name)(cfg)


KINDS = {
    "llama": lambda: _llama(), "gpt2": _gpt2, "llama_cls": lambda: _llama("LlamaForSequenceClassification"),
    "bert_mlm": lambda: _bert("BertForMaskedLM"), "bert_cls": lambda: _bert("BertForSequenceClassification"),
    "bert": lambda: _bert("BertModel"),
}


@pytest.fixture(scope="session")
def kind_ckpts(tmp_path_factory, minilm_dir) -> dict[str, Path]:
    """name -> a checkpoint folder (config.json, model.safetensors, tokenizer files), seed 0 for each."""
    root = tmp_path_factory.mktemp("kinds")
    out = {}
    for name, build in KINDS.items():
        torch.manual_seed(0)
        folder = root / name
        build().eval().save_pretrained(folder, safe_serialization=True)
        if name.startswith("bert"):
            for f in BERT_TOKENIZER:
                shutil.copyfile(minilm_dir / f, folder / f)
        else:
            _word_tokenizer().save_pretrained(folder)
        out[name] = folder
    return out
