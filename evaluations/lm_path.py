"""The loss of a language model along the straight line between two checkpoints, streamed.

`evaluate_checkpoint_path(model, a, b, data, alphas)` keeps A and B memory-mapped (`open_checkpoint`) and, at each
alpha, writes theta(alpha) = (1 - alpha) A + alpha B (computed in float64, tensor by tensor) into the one live
`model`, then measures `measure_loss` with the model's own objective (`evaluations.model_losses.objective_for`: causal
LM, masked LM, sequence classifier or encoder pairs). The result is a `PathResult` (accuracy = 1 - error), so
`evaluations.landscape.barrier` applies to it unchanged; `perplexity` is None for objectives without one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from evaluations.landscape.evaluate import PathResult, alpha_grid
from evaluations.measure import measure_loss
from evaluations.model_losses import objective_for
from evaluations.models import check_names
from taxonomy.errors import CheckpointError, ProbeError


@dataclass
class LMPathResult(PathResult):
    perplexity: np.ndarray | None = field(default_factory=lambda: np.zeros(0))
    tokens: int = 0
    examples: int = 0

    def to_json(self) -> dict:
        ppl = None if self.perplexity is None else self.perplexity.tolist()
        return {**super().to_json(), "perplexity": ppl, "tokens": self.tokens,
                "examples": self.examples}


def _open(ref: object, label: str):
    from merging.io.checkpoint import open_checkpoint

    return open_checkpoint(ref, label=None if isinstance(ref, (str, Path)) else label)


def write_point(model: nn.Module, a, b, sources: tuple[dict[str, str], dict[str, str]], alpha: float) -> None:
    """Copy (1 - alpha) A + alpha B into `model`'s tensors in place, one tensor at a time (float64 arithmetic);
    integer tensors are taken from A."""
    state = model.state_dict()
    with torch.no_grad():
        for name, t in state.items():
            ta = a.get(sources[0][name])
            if not t.is_floating_point():
                t.copy_(ta)
                continue
            tb = b.get(sources[1][name])
            point = torch.lerp(ta.to(torch.float64), tb.to(torch.float64), alpha)
            if not bool(torch.isfinite(point).all()):
                bad = a if not bool(torch.isfinite(ta).all()) else b
                raise CheckpointError(f"{bad.label}: tensor {name!r} has NaN or infinite values")
            t.copy_(point)


def evaluate_checkpoint_path(model: nn.Module, ckpt_a: object, ckpt_b: object, data: list[dict],
                             alphas: int | Iterable[float] = 25) -> LMPathResult:
    """The objective's loss, perplexity (token objectives) and error of `model` at each alpha on the line A -> B.

    The model's own weights are overwritten (it holds theta(alphas[-1]) on return)."""
    grid = alpha_grid(alphas)
    if ((grid < 0) | (grid > 1)).any() or torch.isnan(grid).any():
        raise CheckpointError(f"alphas={grid.tolist()}: every alpha must lie in [0, 1]")
    objective = objective_for(model)
    a, b = _open(ckpt_a, "A"), _open(ckpt_b, "B")
    sources = (check_names(model, a, a.label), check_names(model, b, b.label))
    losses = []
    for alpha in grid.tolist():
        write_point(model, a, b, sources, alpha)
        losses.append(measure_loss(model, data, objective))
        if not np.isfinite(losses[-1].loss):
            raise ProbeError(f"the loss at alpha={alpha:g} is not finite ({losses[-1].loss}); with --dtype "
                             "float16/bfloat16 try float32")
    return LMPathResult(alphas=grid.numpy(), loss=np.array([r.loss for r in losses]),
                        accuracy=np.array([1.0 - r.error for r in losses]),
                        perplexity=np.array([r.perplexity for r in losses]) if objective.perplexity else None,
                        tokens=losses[0].tokens, examples=losses[0].examples)
