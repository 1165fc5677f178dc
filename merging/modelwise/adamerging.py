"""AdaMerging (Yang et al. 2024, "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR,
eq. 4-7): task-arithmetic coefficients learned by entropy minimisation on unlabeled test inputs.

theta(lambda) = theta_0 + sum_i lambda_i tau_i with tau_i = theta_i - theta_0; task-wise, lambda_i is
one number per task (eq. 4), layer-wise one per task per tensor (eq. 6; per parameter tensor, as
FusionBench's layer-wise implementation). The objective (eq. 5/7) is the sum over tasks t of the mean
Shannon entropy H(softmax f_t(x; theta(lambda))) over a batch of task t's unlabeled test inputs, each
through its own network `models[t]` (its own head). The coefficients start at `init` (0.3), Adam
minimises the objective, and after each step they are clamped to [0, 1] (the paper's code).

Every forward pass is `torch.func.functional_call(models[t], theta(lambda), x)`: theta(lambda) is
recomputed from the base and the task vectors each step, so gradients reach lambda and no copy of a
model is made. The returned state is theta(lambda) at the final coefficients, summed in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from merging.modes import eval_mode
from taxonomy import get as get_info
from taxonomy.errors import BasinError, DataError

State = dict[str, torch.Tensor]
_DEFAULTS = get_info("adamerging_task").defaults()
GRANULARITIES = ("task", "layer")


@dataclass
class AdaMergingResult:
    """The merged state, the learned coefficients [tasks, groups], and the objective at every step."""

    state: State = field(repr=False)
    coefficients: torch.Tensor
    groups: list[str]
    entropies: list[float]

    def to_json(self) -> dict[str, Any]:
        return {"coefficients": self.coefficients.tolist(), "groups": self.groups, "entropies": self.entropies}


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the Shannon entropy (nats) of softmax(logits) over the last axis."""
    logp = torch.log_softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def _state(base: nn.Module | Mapping[str, torch.Tensor]) -> State:
    return dict(base.state_dict() if isinstance(base, nn.Module) else base)


class TaskVectors:
    """theta_0 and the task vectors of the merged tensors (floating ones), and theta(lambda)."""

    def __init__(self, base: Mapping[str, torch.Tensor], models: Sequence[nn.Module], granularity: str) -> None:
        if granularity not in GRANULARITIES:
            raise BasinError(f"adamerging: granularity must be one of {list(GRANULARITIES)}, got {granularity!r}")
        self.base = {k: v.detach() for k, v in base.items()}
        self.names = [k for k, v in self.base.items() if v.is_floating_point()]
        self.taus = []
        for i, m in enumerate(models):
            state = m.state_dict()
            missing = sorted(set(self.base) - set(state))[:3]
            if missing or any(state[k].shape != self.base[k].shape for k in self.names):
                bad = missing or [k for k in self.names if state[k].shape != self.base[k].shape][:3]
                raise BasinError(f"adamerging: model {i} does not match the base at {bad}")
            self.taus.append({k: state[k].detach() - self.base[k] for k in self.names})
        self.groups = ["all"] if granularity == "task" else list(self.names)
        self.group_of = {k: (0 if granularity == "task" else j) for j, k in enumerate(self.names)}

    def merged(self, lam: torch.Tensor) -> State:
        """theta_0 + sum_i lam[i, group(k)] tau_i[k] per tensor k (differentiable in `lam`)."""
        out = dict(self.base)
        for k in self.names:
            g = self.group_of[k]
            out[k] = self.base[k] + sum(lam[i, g].to(self.base[k].dtype) * tau[k] for i, tau in enumerate(self.taus))
        return out

    def final(self, lam: torch.Tensor) -> State:
        """theta(lam) summed in float64 and cast back (no gradient)."""
        out = {k: v.clone() for k, v in self.base.items()}
        for k in self.names:
            g = self.group_of[k]
            total = self.base[k].double() + sum(float(lam[i, g]) * tau[k].double() for i, tau in enumerate(self.taus))
            out[k] = total.to(self.base[k].dtype)
        return out


def _rows(inputs: Any) -> int:
    if isinstance(inputs, torch.Tensor):
        return len(inputs)
    if isinstance(inputs, Mapping) and inputs:
        sizes = {len(v) for v in inputs.values() if isinstance(v, torch.Tensor)}
        if len(sizes) == 1:
            return sizes.pop()
    raise DataError("adamerging: each task's unlabeled inputs must be a tensor or a dict of tensors with one "
                    f"leading size, got {type(inputs).__name__}")


def _take(inputs: Any, idx: torch.Tensor) -> tuple[tuple, dict]:
    if isinstance(inputs, torch.Tensor):
        return (inputs[idx],), {}
    return (), {k: (v[idx] if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


def entropy_objective(vectors: TaskVectors, models: Sequence[nn.Module],
                      batches: Sequence[tuple[tuple, dict]]) -> Callable[[torch.Tensor], torch.Tensor]:
    """lam -> sum over tasks t of the mean prediction entropy of models[t] at theta(lam) on batches[t]."""
    from torch.func import functional_call

    def objective(lam: torch.Tensor) -> torch.Tensor:
        params = vectors.merged(lam)
        total = 0
        for model, (args, kwargs) in zip(models, batches):
            out = functional_call(model, params, args, kwargs)
            total = total + prediction_entropy(getattr(out, "logits", out))
        return total

    return objective


def _check(models: Sequence[nn.Module], inputs: Sequence[Any], steps: int, batch_size: int) -> list[int]:
    if not models:
        raise BasinError("adamerging: no models given")
    if len(inputs) != len(models):
        raise BasinError(f"adamerging: {len(inputs)} sets of unlabeled inputs for {len(models)} models "
                         "(one per task, in the models' order)")
    if steps < 0 or batch_size < 1:
        raise BasinError(f"adamerging: steps must be >= 0 and batch_size >= 1, got {steps} and {batch_size}")
    rows = [_rows(x) for x in inputs]
    if min(rows) == 0:
        raise DataError(f"adamerging: task {rows.index(0)} has no unlabeled inputs")
    return rows


def adamerging(base: nn.Module | Mapping[str, torch.Tensor], models: Sequence[nn.Module], inputs: Sequence[Any],
               granularity: str = "task", init: float = _DEFAULTS["init"], lr: float = _DEFAULTS["lr"],
               steps: int = _DEFAULTS["steps"], batch_size: int = _DEFAULTS["batch_size"],
               clamp: bool = _DEFAULTS["clamp"], seed: int = 0) -> AdaMergingResult:
    """Learn the coefficients (see the module docstring); `inputs[t]` are task t's unlabeled test inputs."""
    rows = _check(models, inputs, int(steps), int(batch_size))
    vectors = TaskVectors(_state(base), models, granularity)
    dtype = vectors.base[vectors.names[0]].dtype if vectors.names else torch.float32
    lam = torch.full((len(models), len(vectors.groups)), float(init), dtype=dtype, requires_grad=True)
    optimizer = torch.optim.Adam([lam], lr=float(lr))
    gen = torch.Generator().manual_seed(int(seed))
    entropies: list[float] = []
    with ExitStack() as stack:
        for m in models:
            stack.enter_context(eval_mode(m))
        for _ in range(int(steps)):
            batches = [_take(x, torch.randint(n, (min(int(batch_size), n),), generator=gen))
                       for x, n in zip(inputs, rows)]
            optimizer.zero_grad()
            loss = entropy_objective(vectors, models, batches)(lam)
            loss.backward()
            optimizer.step()
            if clamp:
                with torch.no_grad():
                    lam.clamp_(0.0, 1.0)
            entropies.append(float(loss.detach()))
    final = lam.detach().clone()
    return AdaMergingResult(vectors.final(final), final, vectors.groups, entropies)
