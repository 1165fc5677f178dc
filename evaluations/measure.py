"""The loss of a model on data, and the one line every command prints about what it measured.

`measure_loss(model, data, objective=None)`: the objective's row losses summed in float64 over every batch (the
row-weighted mean of the batch means), in eval mode and without gradients; accuracy = the fraction of rows whose
argmax is the target (cross-entropy objectives: next token, masked token, class, own pair), perplexity =
exp(mean loss) for token-level objectives. `describe(model, objective, data)` names the model class, dtype and
device, the loss, and the examples and tokens of the data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from evaluations.objective import Objective
from taxonomy.errors import DataError


@dataclass(frozen=True)
class LossReport:
    objective: str
    loss: float  # mean over the output rows
    perplexity: float | None  # exp(loss), token-level objectives only
    accuracy: float | None  # fraction of rows whose argmax is the target (cross-entropy only)
    rows: int  # output rows counted (predicted tokens, masked tokens, examples, pairs)
    unit: str  # what a row is
    examples: int  # sequences (or (x, y) examples)

    @property
    def error(self) -> float:
        """1 - accuracy (NaN for a squared-error objective)."""
        return math.nan if self.accuracy is None else 1.0 - self.accuracy

    @property
    def tokens(self) -> int:
        """The rows counted, when they are tokens (a token-level objective), else 0."""
        return self.rows if "token" in self.unit else 0

    def to_json(self) -> dict:
        return {"objective": self.objective, "loss": self.loss, "perplexity": self.perplexity,
                "accuracy": self.accuracy, "error": None if self.accuracy is None else self.error,
                "rows": self.rows, "unit": self.unit, "examples": self.examples}


def _examples(batch: object) -> int:
    if isinstance(batch, dict):
        return len(batch["input_ids"])
    return len(batch[0])


def _sums(objective: Objective, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """(float64 sum of the row losses, rows right) for one batch; `standard_loss` is their mean."""
    if objective.loss == "cross_entropy":
        loss = F.cross_entropy(outputs, targets, reduction="none")
        right = int((outputs.argmax(-1) == targets).sum())
    else:
        loss = F.mse_loss(outputs, targets, reduction="none").reshape(len(outputs), -1).mean(-1)
        right = 0
    return float(loss.to(torch.float64).sum()), right


def measure_loss(model: nn.Module, data, objective: Objective | None = None) -> LossReport:
    """The mean loss of `model` over every output row of `data` (see the module docstring)."""
    from merging.modes import eval_mode

    if objective is None:
        from evaluations.model_losses import objective_for

        objective = objective_for(model)
    total, rows, right, examples = 0.0, 0, 0, 0
    with torch.no_grad(), eval_mode(model):
        for batch in data:
            outputs, targets = objective.predict(model, batch)
            s, r = _sums(objective, outputs, targets)
            total, rows, right, examples = total + s, rows + len(outputs), right + r, examples + _examples(batch)
    if rows == 0:
        raise DataError(f"the data has no {objective.unit} to measure {objective.name} on (e.g. every block is a "
                        "single token)")
    mean = total / rows
    return LossReport(objective=objective.name, loss=mean, perplexity=math.exp(mean) if objective.perplexity else None,
                      accuracy=right / rows if objective.loss == "cross_entropy" else None, rows=rows,
                      unit=objective.unit, examples=examples)


def describe(model: nn.Module, objective: Objective, data) -> str:
    """One line: model class (dtype, device); the loss; the data's source, kind, examples and tokens."""
    p = next(model.parameters(), None)
    where = f" ({str(p.dtype).removeprefix('torch.')}, {p.device})" if p is not None else ""
    examples, tokens = getattr(data, "examples", None), getattr(data, "tokens", None)
    if examples is None:
        examples = sum(_examples(b) for b in data)
    size = f"{examples} examples" + (f", {tokens} tokens" if tokens is not None else "")
    source = f"{data.source} ({data.kind}): " if hasattr(data, "source") else ""
    return f"model {type(model).__name__}{where}; loss {objective.name}; data {source}{size}"
