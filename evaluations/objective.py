"""What a probe or a path evaluation differentiates: a model's outputs and targets on one batch, and their loss.

Every loss basin measures reduces to a standard loss on 2-D outputs: cross-entropy between (n, C) logits and
(n,) class targets, or mean squared error between (n, k) outputs and targets. An `Objective` maps
(model, batch) to those outputs and targets -- for a causal LM the next-token logits at the predicted
positions, for a classifier its logits -- so the Hessian, GGN and Fisher operators and the path evaluator treat
every model the same way, and the loss's own output Hessian is known (the GGN and Fisher need it).

The weight of a batch is its number of output rows (predicted tokens, examples): the dataset loss is the
row-weighted mean of the batch means.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from taxonomy.errors import ProbeError

LOSSES = ("cross_entropy", "mse")
Predict = Callable[[nn.Module, Any], tuple[torch.Tensor, torch.Tensor]]
Count = Callable[[Any], int]


def standard_loss(kind: str, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean loss over the rows of `outputs` (cross-entropy or squared error, PyTorch's definitions)."""
    if kind == "cross_entropy":
        return F.cross_entropy(outputs, targets)
    if kind == "mse":
        return F.mse_loss(outputs, targets)
    raise ProbeError(f"loss: expected one of {LOSSES}, got {kind!r}")


@dataclass(frozen=True)
class Objective:
    """`predict(model, batch) -> (outputs, targets)`, then the standard `loss` between them.

    `name` says what the model is measured on (it is printed by every command and stored in results); `unit`
    what one output row is (predicted tokens, examples, pairs), and `count(batch)` how many a batch has without
    running the model; `perplexity` whether exp(loss) is reported (a token-level cross-entropy)."""

    name: str
    loss: str
    predict: Predict
    unit: str = "rows"
    perplexity: bool = False
    count: Count | None = None

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ProbeError(f"loss: expected one of {LOSSES}, got {self.loss!r}")

    def batch_loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        """(mean loss over the batch's output rows, number of rows); differentiable."""
        outputs, targets = self.predict(model, batch)
        return standard_loss(self.loss, outputs, targets), int(outputs.shape[0])

    def rows(self, batches: Any) -> int | None:
        """The output rows (in `unit`) of an iterable of batches, counted without the model; None without `count`."""
        return None if self.count is None else sum(int(self.count(b)) for b in batches)


def _xy(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch
    return model(x), y


def _targets(batch: Any) -> int:
    return len(batch[1])


def supervised(loss: str = "cross_entropy") -> Objective:
    """`(x, y)` batches: outputs `model(x)`, targets `y` (the digits MLP, any `module:fn` model)."""
    return Objective(name=f"supervised {loss}", loss=loss, predict=_xy, unit="examples", count=_targets)
