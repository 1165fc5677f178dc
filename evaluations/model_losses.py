"""The objective each kind of transformers model is measured with (see `evaluations.objective`).

- causal LM (`*ForCausalLM`): next-token cross-entropy over the predicted (non-padding) tokens of batches
  from `evaluations.text_data` (`input_ids`, `attention_mask`, `labels` with -100 on padding).
"""

from __future__ import annotations

import torch
from torch import nn

from evaluations.objective import Objective
from taxonomy.errors import DataError

IGNORE = -100


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def next_token_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits at every predicted position, the next tokens): rows where `labels[:, 1:]` is not -100."""
    device = model_device(model)
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    target = batch["labels"].to(device)[:, 1:]
    keep = target != IGNORE
    out = logits[:, :-1][keep]
    if out.dtype in (torch.float16, torch.bfloat16):
        out = out.float()
    return out, target[keep]


CAUSAL_LM = Objective(name="causal LM next-token cross-entropy", loss="cross_entropy", predict=next_token_logits)


def is_causal_lm(model: nn.Module) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def objective_for(model: nn.Module) -> Objective:
    """The objective `model`'s class is measured with; a one-line error for a class basin has none for."""
    if is_causal_lm(model):
        return CAUSAL_LM
    raise DataError(f"{type(model).__name__}: no text objective for this model class (causal LMs are supported); "
                    "pass --model-factory and module:fn data")
