"""Calibration text for language models, and the causal-LM loss on it.

- `load_text_data`: a local `.txt` file tokenised with the checkpoint's own tokenizer (local files only, never
  remote code), packed end to end into blocks of `seq_len` tokens (the last block, if short, padded and masked);
  batches are dicts of `input_ids`, `attention_mask` and `labels` (-100 on padding).
- `causal_lm_loss`: mean next-token cross-entropy over the predicted (non-padding) tokens, summed in float64,
  with perplexity exp(mean) and the next-token error (argmax != next token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from taxonomy.errors import DataError

IGNORE = -100


def _folder(model_or_ref: object) -> Path:
    folder = getattr(model_or_ref, "basin_folder", None)
    if folder is not None:
        return Path(folder)
    from evaluations.models import config_folder
    from merging.io.checkpoint import open_checkpoint

    return config_folder(open_checkpoint(model_or_ref), model_or_ref)


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"{folder}: no usable tokenizer in the checkpoint folder ({first[:200]})") from None


def max_positions(config) -> int | None:
    """The longest sequence the model's position table allows, if its config names one."""
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _config(model_or_ref: object, folder: Path):
    config = getattr(model_or_ref, "config", None)
    if config is not None:
        return config
    from evaluations.models import load_config

    return load_config(folder)


def _read_tokens(path: Path, tokenizer, vocab: int | None) -> list[int]:
    if not path.is_file():
        raise DataError(f"{path}: no such text file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read as UTF-8 text ({err})") from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text.strip() else []
    if not ids:
        raise DataError(f"{path}: no tokens (the file is empty)")
    top = max(ids)
    if vocab is not None and top >= vocab:
        raise DataError(f"{path}: token id {top} is outside the model's vocabulary of {vocab}")
    return list(ids)


def _blocks(ids: list[int], seq_len: int, pad: int) -> list[tuple[list[int], int]]:
    """(block ids padded to seq_len, real length) for consecutive blocks of `ids`."""
    out = []
    for s in range(0, len(ids), seq_len):
        chunk = ids[s : s + seq_len]
        out.append((chunk + [pad] * (seq_len - len(chunk)), len(chunk)))
    return out


def _select(n: int, max_examples: int | None, seed: int) -> list[int]:
    if max_examples is None or max_examples >= n:
        return list(range(n))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:max_examples].tolist())


def _batch(rows: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
    input_ids = torch.tensor([r for r, _ in rows], dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, (_, n) in enumerate(rows):
        mask[i, :n] = 1
    labels = input_ids.masked_fill(mask == 0, IGNORE)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _check_sizes(seq_len: int, max_examples: int | None, batch_size: int, limit: int | None) -> None:
    if seq_len < 2:
        raise DataError(f"seq_len={seq_len}: need at least 2 tokens per block")
    if limit is not None and seq_len > limit:
        raise DataError(f"seq_len={seq_len} exceeds the model's {limit} positions")
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size}: need at least 1")
    if max_examples is not None and max_examples < 1:
        raise DataError(f"max_examples={max_examples}: need at least 1")


def load_text_data(model_or_ref: object, path: str | Path, seq_len: int = 128, max_examples: int | None = None,
                   batch_size: int = 8, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Batches of `seq_len`-token blocks of the `.txt` file `path`, tokenised with the checkpoint's tokenizer.

    `model_or_ref` is a model from `evaluations.models.load_model` or a checkpoint reference; with
    `max_examples`, that many blocks drawn without replacement (seeded), kept in file order."""
    folder = _folder(model_or_ref)
    config = _config(model_or_ref, folder)
    _check_sizes(seq_len, max_examples, batch_size, max_positions(config))
    tokenizer = _tokenizer(folder)
    ids = _read_tokens(Path(path), tokenizer, getattr(config, "vocab_size", None))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    blocks = _blocks(ids, seq_len, pad)
    rows = [blocks[i] for i in _select(len(blocks), max_examples, seed)]
    return [_batch(rows[s : s + batch_size]) for s in range(0, len(rows), batch_size)]


@dataclass(frozen=True)
class LMLoss:
    loss: float  # mean next-token cross-entropy (nats per predicted token)
    perplexity: float  # exp(loss)
    error: float  # fraction of predicted tokens whose argmax is not the next token
    tokens: int  # predicted tokens counted
    examples: int  # sequences

    def to_json(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity, "error": self.error, "tokens": self.tokens,
                "examples": self.examples}


def _batch_sums(model: nn.Module, batch: dict[str, torch.Tensor], device) -> tuple[float, int, int]:
    """(sum of next-token cross-entropy, tokens, wrong argmaxes) on one batch."""
    ids = batch["input_ids"].to(device)
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device)).logits
    target = batch["labels"].to(device)[:, 1:]
    keep = target != IGNORE
    logits = logits[:, :-1][keep]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    ce = F.cross_entropy(logits, target[keep], reduction="none").to(torch.float64).sum()
    wrong = (logits.argmax(-1) != target[keep]).sum()
    return float(ce), int(keep.sum()), int(wrong)


def check_causal_lm(model: nn.Module) -> None:
    """A one-line error unless `model` is a transformers causal LM (a class of AutoModelForCausalLM)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = type(model).__name__
    if name not in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        raise DataError(f"{name} is not a causal language model (an AutoModelForCausalLM class): the text loss "
                        "needs next-token logits; pass --model-factory and module:fn data for other models")


def causal_lm_loss(model: nn.Module, data: list[dict[str, torch.Tensor]]) -> LMLoss:
    """Mean next-token cross-entropy of `model` over every predicted token of `data` (float64 sums)."""
    check_causal_lm(model)
    device = next(model.parameters()).device
    total, tokens, wrong, examples = 0.0, 0, 0, 0
    with torch.no_grad():
        for batch in data:
            ce, n, w = _batch_sums(model, batch, device)
            total, tokens, wrong = total + ce, tokens + n, wrong + w
            examples += len(batch["input_ids"])
    if tokens == 0:
        raise DataError("the data has no predicted tokens (every block is a single token)")
    mean = total / tokens
    return LMLoss(loss=mean, perplexity=math.exp(mean), error=wrong / tokens, tokens=tokens, examples=examples)
