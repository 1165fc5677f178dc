"""Evaluation data for a transformers checkpoint, shaped for the objective its class is measured with.

`load_data(model_or_ref, path, seq_len, max_examples, batch_size, seed) -> TextData` reads, with the checkpoint's
own tokenizer (local files only, never remote code):

- a `.txt` file ("packed text"): tokenised end to end and packed into blocks of `seq_len` tokens (the last, if
  short, padded and masked); for a masked LM each block is wrapped in the tokenizer's special tokens.
- a `.jsonl`/`.csv`/`.parquet` file (`evaluations.data_files`, the `datasets` extra) with a `text` column, and
  optionally `label` ("labelled text", sequence classifiers) or `text_pair` ("text pairs", encoders; for a
  classifier the pair is encoded with the text): one example per row, truncated to `seq_len` tokens, batches
  padded to their longest row. An encoder-decoder seq2seq LM ("text-target pairs") reads `text` (the encoder
  input) and `target` (the decoder output) columns, each tokenised on its own side (`text_target=`) and
  truncated to `seq_len` tokens.

Batches are dicts (`evaluations.model_losses` reads them): `input_ids`, `attention_mask` (and `token_type_ids`
when the model has a token-type table); `labels` (causal LM: the inputs, -100 on padding; classifier: the class
per row; masked LM: the original token at the masked positions, -100 elsewhere; seq2seq LM: the target tokens,
-100 on padding); `pair_*` for an encoder's pairs.

The masked-LM mask is drawn here, once, with the seed: 15% of each example's non-special tokens (at least one),
every one replaced by the mask token (no 80/10/10 split: the loss then measures exactly "recover the hidden
token", with no noise from random replacements), so every point of a path or landscape sees the same mask.
An encoder is measured on pairs (an in-batch contrastive loss needs a positive for each text): plain `.txt` is
refused with a one-line error asking for `text`/`text_pair` rows rather than inventing pairs from adjacent lines;
so is it for a seq2seq LM (it needs `text`/`target` rows).
`max_examples` examples are drawn without replacement (seeded) and kept in file order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from evaluations.data_files import check_suffix, check_text, read_rows
from evaluations.model_losses import CAUSAL, CLASSIFIER, ENCODER, IGNORE, MASKED, SEQ2SEQ, check_causal_lm, model_kind
from taxonomy.errors import DataError

__all__ = ["TextData", "load_data", "max_positions", "check_causal_lm"]
MASK_FRACTION = 0.15
Example = dict[str, list[int] | int]


@dataclass
class TextData:
    """Batches for one model, and what they hold; iterates over (and `len`, `[i]` index) its batches."""

    batches: list[dict[str, torch.Tensor]] = field(repr=False)
    examples: int  # sequences (rows, blocks or pairs)
    tokens: int  # non-padding input tokens, both sides of pairs (and targets), special tokens included
    source: Path
    kind: str  # "packed text", "text rows", "text pairs", "labelled text", "labelled text pairs",
    # "text-target pairs"
    seq_len: int  # tokens per block (packed text) or at most per row: as asked, or `default_seq_len`

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.batches[i]


@dataclass(frozen=True)
class _Target:
    """What the data is for: the checkpoint folder, its config and the objective kind of its class."""

    folder: Path
    config: object
    kind: str


def _target(model_or_ref: object) -> _Target:
    from evaluations.models import config_folder, load_config, model_class

    if isinstance(model_or_ref, nn.Module):
        folder = getattr(model_or_ref, "basin_folder", None)
        if folder is None:
            raise DataError(f"{type(model_or_ref).__name__}: no checkpoint folder to read the tokenizer from (load "
                            "the model with evaluations.models.load_model, or pass the checkpoint reference)")
        config = model_or_ref.config
        return _Target(Path(folder), config, model_kind(type(model_or_ref).__name__, config))
    from merging.io.checkpoint import open_checkpoint

    folder = config_folder(open_checkpoint(model_or_ref), model_or_ref)
    config = load_config(folder)
    return _Target(folder, config, model_kind(model_class(config, folder / "config.json").__name__, config))


def _tokenizer(folder: Path):
    """The checkpoint's own tokenizer; transformers 5 would build an empty one (special tokens only) for a folder
    with no tokenizer files, so their absence is an error here."""
    from transformers import AutoTokenizer

    from merging.plan.vocab import TOKENIZER_MAIN, has_tokenizer

    if not has_tokenizer(folder):
        raise DataError(f"{folder}: no usable tokenizer in the checkpoint folder (none of "
                        f"{', '.join(TOKENIZER_MAIN)})")
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


DEFAULT_SEQ_LEN = 128


def default_seq_len(config) -> int:
    """Tokens per block when none is asked for: 128, or the model's positions where it has fewer."""
    return min(DEFAULT_SEQ_LEN, max_positions(config) or DEFAULT_SEQ_LEN)


def _check_sizes(seq_len: int, max_examples: int | None, batch_size: int, limit: int | None) -> None:
    if seq_len < 2:
        raise DataError(f"seq_len={seq_len}: need at least 2 tokens per block")
    if limit is not None and seq_len > limit:
        raise DataError(f"seq_len={seq_len} exceeds the model's {limit} positions (ask for at most {limit} tokens "
                        "per block)")
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size}: need at least 1")
    if max_examples is not None and max_examples < 1:
        raise DataError(f"max_examples={max_examples}: need at least 1")


def _check_vocab(path: Path, examples: list[Example], vocab: int | None) -> None:
    keys = ("input_ids", "pair_input_ids", "target_ids")
    top = max((max(e[k]) for e in examples for k in keys if e.get(k)), default=-1)
    if vocab is not None and top >= vocab:
        raise DataError(f"{path}: token id {top} is outside the model's vocabulary of {vocab}")


# --- packed text (.txt) -------------------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"{path}: no such text file")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err})") from None
    check_text(path, raw)
    return raw.decode("utf-8")


def _packed(path: Path, tokenizer, seq_len: int, kind: str) -> list[Example]:
    """Consecutive blocks of the file's tokens; for a masked LM, wrapped in the special tokens to `seq_len`."""
    if kind in (CLASSIFIER, ENCODER, SEQ2SEQ):
        need = {CLASSIFIER: "a sequence classifier is measured on rows with a `label` column",
                ENCODER: "an encoder is measured on rows with `text` and `text_pair` columns (positive pairs)",
                SEQ2SEQ: "a seq2seq LM is measured on rows with `text` (encoder input) and `target` (decoder output) "
                         "columns"}[kind]
        raise DataError(f"{path}: {need}: give a .jsonl/.csv/.parquet file")
    text = _read_text(path)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text.strip() else []
    if not ids:
        raise DataError(f"{path}: no tokens (the file is empty)")
    if kind == CAUSAL:
        return [{"input_ids": ids[s : s + seq_len]} for s in range(0, len(ids), seq_len)]
    prefix, suffix = _specials(tokenizer, text)
    width = seq_len - len(prefix) - len(suffix)
    if width < 1:
        raise DataError(f"seq_len={seq_len}: leaves no room beside the tokenizer's special tokens")
    special = [1] * len(prefix), [1] * len(suffix)
    return [{"input_ids": prefix + ids[s : s + width] + suffix,
             "special": special[0] + [0] * len(ids[s : s + width]) + special[1]} for s in range(0, len(ids), width)]


def _specials(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after one sequence (e.g. [CLS], [SEP]), read from its
    encoding of the start of `text` (transformers 5 has no build_inputs_with_special_tokens on fast tokenizers)."""
    enc = tokenizer(text.strip()[:64], return_special_tokens_mask=True)
    mask = enc["special_tokens_mask"]
    lead = next((i for i, m in enumerate(mask) if not m), len(mask))
    trail = next((i for i, m in enumerate(reversed(mask)) if not m), 0)
    ids = enc["input_ids"]
    return ids[:lead], ids[len(ids) - trail:]


# --- rows (.jsonl / .csv / .parquet) ------------------------------------------------------------------------------


def _check_columns(path: Path, rows: dict[str, list], kind: str) -> None:
    columns = ", ".join(rows) or "none"
    if "text" not in rows:
        raise DataError(f"{path}: the rows have no 'text' column (columns: {columns})")
    if kind == CLASSIFIER and "label" not in rows:
        raise DataError(f"{path}: a sequence classifier needs a 'label' column (columns: {columns})")
    if kind == ENCODER and "text_pair" not in rows:
        raise DataError(f"{path}: an encoder without a head is measured on pairs: add a 'text_pair' column "
                        f"(columns: {columns})")
    if kind == SEQ2SEQ and "label" in rows:
        raise DataError(f"{path}: column 'label' is only for a sequence classifier, not a seq2seq LM (put the decoder "
                        f"output text in a 'target' column; columns: {columns})")
    if kind == SEQ2SEQ and "target" not in rows:
        raise DataError(f"{path}: a seq2seq LM needs a 'target' column (the decoder output) beside 'text' (columns: "
                        f"{columns})")
    if kind != CLASSIFIER and "label" in rows:
        raise DataError(f"{path}: column 'label' is only for a sequence classifier, not a {kind} (drop it, or "
                        "measure a *ForSequenceClassification checkpoint)")
    if kind in (CAUSAL, SEQ2SEQ) and "text_pair" in rows:
        raise DataError(f"{path}: column 'text_pair' is not used by a {kind} (drop it, or join it into 'text')")


def _texts(path: Path, rows: dict[str, list], column: str) -> list[str]:
    values = rows[column]
    for i, v in enumerate(values):
        if not isinstance(v, str) or not v.strip():
            raise DataError(f"{path}: row {i}: column {column!r} is {'empty' if isinstance(v, str) else repr(v)} "
                            "(expected non-empty text)")
    return values


def _label(path: Path, i: int, value: object, config) -> int:
    """The class index of one `label` value: an int in [0, num_labels) or a name in config.label2id."""
    n = int(getattr(config, "num_labels", 0) or 0)
    names = getattr(config, "label2id", None) or {}
    if isinstance(value, str) and value in names:
        value = names[value]
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{path}: row {i}: label {value!r} is not a class index (an integer, or one of "
                        f"{sorted(names)})")
    if not 0 <= value < n:
        raise DataError(f"{path}: row {i}: label {value} is out of range for the model's num_labels={n}")
    return value


def _encode(tokenizer, texts: list[str], pairs: list[str] | None, seq_len: int, token_types: bool) -> list[Example]:
    enc = tokenizer(texts, text_pair=pairs, truncation=True, max_length=seq_len, return_special_tokens_mask=True)
    out = []
    for i, ids in enumerate(enc["input_ids"]):
        e: Example = {"input_ids": ids, "special": enc["special_tokens_mask"][i]}
        if token_types and "token_type_ids" in enc:
            e["token_type_ids"] = enc["token_type_ids"][i]
        out.append(e)
    return out


def _rows(path: Path, tokenizer, seq_len: int, target: _Target) -> tuple[list[Example], str]:
    """One example per row, for the target's kind; the data kind's name."""
    rows = read_rows(path)
    _check_columns(path, rows, target.kind)
    texts = _texts(path, rows, "text")
    pairs = _texts(path, rows, "text_pair") if "text_pair" in rows else None
    token_types = int(getattr(target.config, "type_vocab_size", 0) or 0) >= 2
    if target.kind == ENCODER:
        examples = _encode(tokenizer, texts, None, seq_len, token_types)
        for e, p in zip(examples, _encode(tokenizer, pairs, None, seq_len, token_types)):
            e.update({"pair_" + k: v for k, v in p.items() if k != "special"})
        return examples, "text pairs"
    if target.kind == SEQ2SEQ:
        examples = _encode(tokenizer, texts, None, seq_len, token_types)
        enc = tokenizer(text_target=_texts(path, rows, "target"), truncation=True, max_length=seq_len)
        for e, ids in zip(examples, enc["input_ids"]):
            e["target_ids"] = ids
        return examples, "text-target pairs"
    examples = _encode(tokenizer, texts, pairs, seq_len, token_types)
    if target.kind == CLASSIFIER:
        for i, (e, value) in enumerate(zip(examples, rows["label"])):
            e["label"] = _label(path, i, value, target.config)
        return examples, "labelled text pairs" if pairs else "labelled text"
    return examples, "text pairs" if pairs else "text rows"


# --- selection, mask, batches ------------------------------------------------------------------------------------


def _select(n: int, max_examples: int | None, seed: int) -> list[int]:
    if max_examples is None or max_examples >= n:
        return list(range(n))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:max_examples].tolist())


def _mask(path: Path, examples: list[Example], tokenizer, seed: int) -> None:
    """Replace 15% (at least one) of each example's non-special tokens by the mask token, drawn with `seed`;
    `labels` keeps the original token there and -100 elsewhere."""
    if tokenizer.mask_token_id is None:
        raise DataError(f"{path}: the checkpoint's tokenizer has no mask token (a masked LM needs one)")
    g = torch.Generator().manual_seed(seed)
    masked = 0
    for e in examples:
        ids = list(e["input_ids"])
        free = [t for t, s in enumerate(e["special"]) if not s]
        k = max(1, int(MASK_FRACTION * len(free) + 0.5)) if free else 0
        labels = [IGNORE] * len(ids)
        for j in torch.randperm(len(free), generator=g)[:k].tolist():
            labels[free[j]], ids[free[j]] = ids[free[j]], tokenizer.mask_token_id
        e["input_ids"], e["labels"] = ids, labels
        masked += k
    if masked == 0:
        raise DataError(f"{path}: no maskable tokens (every example holds only special tokens)")


def _pad(seqs: list[list[int]], width: int, value: int) -> torch.Tensor:
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def _side(examples: list[Example], prefix: str, pad: int, width: int | None) -> dict[str, torch.Tensor]:
    ids = [e[prefix + "input_ids"] for e in examples]
    width = width or max(map(len, ids))
    out = {prefix + "input_ids": _pad(ids, width, pad),
           prefix + "attention_mask": _pad([[1] * len(s) for s in ids], width, 0)}
    if prefix + "token_type_ids" in examples[0]:
        out[prefix + "token_type_ids"] = _pad([e[prefix + "token_type_ids"] for e in examples], width, 0)
    return out


def _collate(examples: list[Example], kind: str, pad: int, width: int | None) -> dict[str, torch.Tensor]:
    batch = _side(examples, "", pad, width)
    if kind == CAUSAL:
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE)
    elif kind == MASKED:
        batch["labels"] = _pad([e["labels"] for e in examples], batch["input_ids"].shape[1], IGNORE)
    elif kind == CLASSIFIER:
        batch["labels"] = torch.tensor([e["label"] for e in examples], dtype=torch.long)
    elif kind == SEQ2SEQ:
        targets = [e["target_ids"] for e in examples]
        batch["labels"] = _pad(targets, max(map(len, targets)), IGNORE)
    else:
        batch.update(_side(examples, "pair_", pad, width))
    return batch


def _spans(n: int, batch_size: int, kind: str) -> list[tuple[int, int]]:
    """(start, stop) of each batch; for pairs a last batch of one is joined to the one before (an in-batch
    contrastive loss over a single pair is 0 whatever the model)."""
    spans = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if kind == ENCODER and len(spans) > 1 and spans[-1][1] - spans[-1][0] == 1:
        spans[-2:] = [(spans[-2][0], n)]
    return spans


def _check_pairs(path: Path, kind: str, n: int, batch_size: int) -> None:
    if kind == ENCODER and (batch_size < 2 or n < 2):
        raise DataError(f"{path}: the in-batch contrastive loss needs at least 2 pairs per batch (got "
                        f"batch_size={batch_size}, {n} pairs)")


def load_data(model_or_ref: object, path: str | Path, *, seq_len: int | None = None, max_examples: int | None = None,
              batch_size: int = 8, seed: int = 0) -> TextData:
    """Batches of the data file `path` for the model of `model_or_ref` (a model from
    `evaluations.models.load_model` or a checkpoint reference); see the module docstring."""
    path = Path(path)
    target = _target(model_or_ref)
    seq_len = default_seq_len(target.config) if seq_len is None else seq_len
    _check_sizes(seq_len, max_examples, batch_size, max_positions(target.config))
    packed = check_suffix(path) == ".txt"
    tokenizer = _tokenizer(target.folder)
    examples, kind = (_packed(path, tokenizer, seq_len, target.kind), "packed text") if packed else \
        _rows(path, tokenizer, seq_len, target)
    _check_vocab(path, examples, getattr(target.config, "vocab_size", None))
    examples = [examples[i] for i in _select(len(examples), max_examples, seed)]
    _check_pairs(path, target.kind, len(examples), batch_size)
    if target.kind == MASKED:
        _mask(path, examples, tokenizer, seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if target.kind == CLASSIFIER and getattr(target.config, "pad_token_id", None) is not None:
        pad = target.config.pad_token_id  # decoder classifiers find each row's last token by this id
    width = seq_len if packed else None
    batches = [_collate(examples[a:b], target.kind, pad, width) for a, b in _spans(len(examples), batch_size,
                                                                                     target.kind)]
    tokens = sum(len(e["input_ids"]) + len(e.get("pair_input_ids", [])) + len(e.get("target_ids", []))
                 for e in examples)
    return TextData(batches=batches, examples=len(examples), tokens=tokens, source=path, kind=kind,
                    seq_len=seq_len)

