"""The objective each kind of transformers model is measured with (see `evaluations.objective`).

The kind follows the model's class (`model_kind`), and `evaluations.text_data.load_data` builds batches for it:

- causal LM (`*ForCausalLM`): next-token cross-entropy over the predicted (non-padding) tokens (`input_ids`,
  `attention_mask`, `labels` with -100 on padding).
- sequence classification (`*ForSequenceClassification`): cross-entropy of the logits against `labels` (n,).
- masked LM (`*ForMaskedLM`): cross-entropy at the positions masked once, with the seed, when the data was loaded
  (`labels` holds the original token there and -100 elsewhere), so every point of a path sees the same mask.
- an encoder with no head (`BertModel`, the sentence-transformers checkpoints): the in-batch contrastive loss of
  sentence-transformers' MultipleNegativesRankingLoss (van den Oord et al. 2018, InfoNCE; Henderson et al. 2017):
  mean-pooled embeddings of `text` and `text_pair`, cosine similarities times 20, cross-entropy of each row against
  its own pair (the diagonal).
- seq2seq LM (an encoder-decoder `*ForConditionalGeneration`: T5, BART, ...): teacher-forced cross-entropy over
  the non-padding target tokens (`input_ids`, `attention_mask` of the encoder input, `labels` the target with -100
  on padding); the decoder inputs are the labels shifted right after the decoder start token, made by the model's
  own `prepare_decoder_input_ids_from_labels` (what its `labels=` path does), so the loss is the model's own.

Each `predict` returns 2-D outputs and their targets (logits upcast to float32 from float16/bfloat16).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from evaluations.objective import Objective
from taxonomy.errors import DataError

IGNORE = -100
CAUSAL, CLASSIFIER, MASKED, ENCODER = "causal LM", "sequence classifier", "masked LM", "encoder"
SEQ2SEQ = "seq2seq LM"
SCALE = 20.0  # sentence-transformers' MultipleNegativesRankingLoss default scale
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _need(batch: object, keys: tuple[str, ...], what: str) -> None:
    missing = [k for k in keys if not isinstance(batch, dict) or k not in batch]
    if missing:
        raise DataError(f"the batch has no {missing[0]!r}: the {what} objective needs data loaded for that model "
                        "(evaluations.text_data.load_data with the same model)")


def _inputs(model: nn.Module, batch: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    device = model_device(model)
    return {k: batch[prefix + k].to(device) for k in MODEL_INPUTS if prefix + k in batch}


def _float(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def next_token_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits at every predicted position, the next tokens): rows where `labels[:, 1:]` is not -100."""
    _need(batch, ("input_ids", "attention_mask", "labels"), CAUSAL)
    device = model_device(model)
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    target = batch["labels"].to(device)[:, 1:]
    keep = target != IGNORE
    return _float(logits[:, :-1][keep]), target[keep]


def class_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, num_labels) logits of a sequence classifier, and the (n,) labels."""
    _need(batch, ("input_ids", "attention_mask", "labels"), CLASSIFIER)
    try:
        logits = model(**_inputs(model, batch)).logits
    except ValueError as err:  # e.g. a decoder classifier with no pad_token_id and a batch of several rows
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"{type(model).__name__}: {first[:200]}") from None
    return _float(logits), batch["labels"].to(logits.device)


def masked_token_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits at the masked positions, the original tokens there): rows where `labels` is not -100."""
    _need(batch, ("input_ids", "attention_mask", "labels"), MASKED)
    logits = model(**_inputs(model, batch)).logits
    target = batch["labels"].to(logits.device)
    keep = target != IGNORE
    return _float(logits[keep]), target[keep]


def decoder_inputs(model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """The decoder inputs the model's own `labels=` path makes: `labels` shifted right one place, the decoder start
    token first, -100 replaced by the pad token (`prepare_decoder_input_ids_from_labels`, else that shift here)."""
    config = model.config
    try:
        prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
        if prepare is not None:
            return prepare(labels=labels)
        start, pad = config.decoder_start_token_id, config.pad_token_id
        if start is None or pad is None:
            raise ValueError("no decoder_start_token_id or pad_token_id")
    except (ValueError, AttributeError):
        raise DataError(f"{type(model).__name__}: cannot make decoder inputs from the targets: config.json needs "
                        "decoder_start_token_id and pad_token_id") from None
    shifted = labels.new_full(labels.shape, start)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == IGNORE, pad)


def target_token_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(decoder logits at every target token, the target tokens): rows where `labels` is not -100, the decoder
    teacher-forced with the labels shifted right (`decoder_inputs`)."""
    _need(batch, ("input_ids", "attention_mask", "labels"), SEQ2SEQ)
    device = model_device(model)
    labels = batch["labels"].to(device)
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                   decoder_input_ids=decoder_inputs(model, labels)).logits
    keep = labels != IGNORE
    return _float(logits[keep]), labels[keep]


def mean_pooled(model: nn.Module, batch: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
    """Mean of the last hidden states over the non-padding tokens (sentence-transformers' mean pooling), float32."""
    inputs = _inputs(model, batch, prefix)
    hidden = _float(model(**inputs).last_hidden_state)
    mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def pair_similarities(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, n) cosine similarities x 20 between the texts and their pairs, and targets 0..n-1 (the diagonal)."""
    _need(batch, ("input_ids", "attention_mask", "pair_input_ids", "pair_attention_mask"), ENCODER)
    a = F.normalize(mean_pooled(model, batch), dim=-1)
    b = F.normalize(mean_pooled(model, batch, "pair_"), dim=-1)
    return SCALE * a @ b.T, torch.arange(len(a), device=a.device)


def _predicted(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def _masked(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"] != IGNORE).sum())


def _rows(batch: dict[str, torch.Tensor]) -> int:
    return len(batch["input_ids"])


CAUSAL_LM = Objective(name="causal LM next-token cross-entropy", loss="cross_entropy", predict=next_token_logits,
                      unit="predicted tokens", perplexity=True, count=_predicted)
SEQUENCE_CLASSIFICATION = Objective(name="sequence classification cross-entropy", loss="cross_entropy",
                                    predict=class_logits, unit="examples", count=_rows)
MASKED_LM = Objective(name="masked LM cross-entropy (fixed 15% mask)", loss="cross_entropy",
                      predict=masked_token_logits, unit="masked tokens", perplexity=True, count=_masked)
CONTRASTIVE = Objective(name="in-batch contrastive (mean pooling, cosine x 20)", loss="cross_entropy",
                        predict=pair_similarities, unit="pairs", count=_rows)
SEQ2SEQ_LM = Objective(name="seq2seq LM target-token cross-entropy (teacher forcing)", loss="cross_entropy",
                        predict=target_token_logits, unit="target tokens", perplexity=True, count=_masked)
OBJECTIVES = {CAUSAL: CAUSAL_LM, CLASSIFIER: SEQUENCE_CLASSIFICATION, MASKED: MASKED_LM, ENCODER: CONTRASTIVE,
              SEQ2SEQ: SEQ2SEQ_LM}


def _names(mapping: dict) -> set[str]:
    out: set[str] = set()
    for v in mapping.values():
        out.update([v] if isinstance(v, str) else v)
    return out


def model_kind(class_name: str, config: object = None) -> str:
    """CAUSAL, CLASSIFIER, MASKED, ENCODER or SEQ2SEQ for a transformers class name (SEQ2SEQ: a class of
    AutoModelForSeq2SeqLM whose config, when given, is an encoder-decoder); a one-line error otherwise."""
    from transformers.models.auto import modeling_auto as auto

    if class_name in _names(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        return CAUSAL
    if class_name in _names(auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES):
        return CLASSIFIER
    if class_name.endswith("ForMaskedLM") and class_name in _names(auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES):
        return MASKED
    if class_name in _names(auto.MODEL_MAPPING_NAMES) and not getattr(config, "is_encoder_decoder", False):
        return ENCODER
    seq2seq = _names(auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)
    if class_name in seq2seq and getattr(config, "is_encoder_decoder", True):  # not e.g. audio encoder + LM
        return SEQ2SEQ
    raise DataError(f"{class_name}: no text objective for this model class (causal LMs, sequence classifiers, "
                    "masked LMs, encoders without a head and encoder-decoder seq2seq LMs are supported); pass "
                    "--model-factory and module:fn data")


def is_causal_lm(model: nn.Module) -> bool:
    return _kind_or_none(model) == CAUSAL


def _kind_or_none(model: nn.Module) -> str | None:
    try:
        return model_kind(type(model).__name__, getattr(model, "config", None))
    except DataError:
        return None


def objective_for(model: nn.Module) -> Objective:
    """The objective `model`'s class is measured with; a one-line error for a class basin has none for."""
    return OBJECTIVES[model_kind(type(model).__name__, getattr(model, "config", None))]


def check_causal_lm(model: nn.Module) -> None:
    """A one-line error unless `model` is a transformers causal LM (a class of AutoModelForCausalLM)."""
    if not is_causal_lm(model):
        raise DataError(f"{type(model).__name__} is not a causal language model (an AutoModelForCausalLM class): the "
                        "text loss needs next-token logits; pass --model-factory and module:fn data for other models")
