"""Model soups (Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned models
improves accuracy without increasing inference time"): the uniform soup and the greedy soup.

Greedy soup (the paper's Algorithm 1): sort the ingredients by their individual held-out score,
best first; start the soup with the best one; then try each next ingredient in turn and keep it
only if the uniform average of the soup plus that ingredient scores at least as well as the soup
without it (ties keep it, "does not drop"). Floating-point tensors are averaged in float32 through a
running sum and cast back to their dtype; integer buffers are taken from the first ingredient.
The soup of the best ingredient alone is that ingredient, so its score is its individual score (not
evaluated again): `score` must be the same held-out metric for single models and for soups.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from taxonomy.errors import BasinError

StateDict = Mapping[str, torch.Tensor]


@dataclass
class SoupResult:
    """Outcome of a greedy soup: which ingredients were kept and every score seen."""

    chosen: list[int]  # indices into the input list, in the order they were added
    order: list[int]  # every index, by decreasing individual score (the order they were tried)
    individual_scores: list[float]  # per input, in input order
    trial_scores: list[float]  # score of the soup with each tried ingredient, aligned with `order`
    score: float  # the final soup's score
    state_dict: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen,
            "order": self.order,
            "individual_scores": self.individual_scores,
            "trial_scores": self.trial_scores,
            "score": self.score,
        }


def _check_compatible(state_dicts: Sequence[StateDict]) -> None:
    if not state_dicts:
        raise BasinError("soup: no state dicts given")
    first = state_dicts[0]
    for i, sd in enumerate(state_dicts[1:], start=1):
        if set(sd) != set(first):
            missing = sorted(set(first) - set(sd))[:5]
            extra = sorted(set(sd) - set(first))[:5]
            raise BasinError(f"soup: model {i} tensor names differ from model 0: missing {missing}, extra {extra}")
        for name, t in sd.items():
            if t.shape != first[name].shape:
                raise BasinError(f"soup: {name}: model {i} has shape {tuple(t.shape)}, "
                                 f"model 0 has {tuple(first[name].shape)}")


class _RunningSoup:
    """A running float32 sum of the kept ingredients; `average(extra)` is the soup with `extra` added."""

    def __init__(self, first: StateDict) -> None:
        self.template = first
        self.sums = {k: v.to(torch.float32, copy=True) for k, v in first.items() if v.is_floating_point()}
        self.count = 1

    def average(self, extra: StateDict | None = None) -> dict[str, torch.Tensor]:
        n = self.count + (extra is not None)
        out: dict[str, torch.Tensor] = {}
        for k, v in self.template.items():
            if k not in self.sums:
                out[k] = v.clone()
                continue
            total = self.sums[k] if extra is None else self.sums[k] + extra[k].to(torch.float32)
            out[k] = (total / n).to(v.dtype)
        return out

    def add(self, sd: StateDict) -> None:
        for k, s in self.sums.items():
            s.add_(sd[k].to(torch.float32))
        self.count += 1


def uniform_soup(state_dicts: Sequence[StateDict]) -> dict[str, torch.Tensor]:
    """The uniform soup: the average of every ingredient (float32 accumulation, cast back per tensor)."""
    _check_compatible(state_dicts)
    soup = _RunningSoup(state_dicts[0])
    for sd in state_dicts[1:]:
        soup.add(sd)
    return soup.average()


def greedy_soup(
    state_dicts: Sequence[StateDict],
    score: Callable[[dict[str, torch.Tensor]], float],
    *,
    individual_scores: Sequence[float] | None = None,
    progress: bool = True,
) -> SoupResult:
    """Wortsman et al.'s greedy soup. `score(state_dict)` returns a held-out metric, higher is better.

    `individual_scores` (the score of each input alone) may be given to save those evaluations;
    otherwise they are computed with `score`. Ties in the individual scores keep the input order.
    """
    _check_compatible(state_dicts)
    if individual_scores is None:
        individual = [float(score(dict(sd))) for sd in tqdm(state_dicts, desc="scoring ingredients",
                                                           disable=not progress)]
    else:
        if len(individual_scores) != len(state_dicts):
            raise BasinError(f"greedy_soup: {len(individual_scores)} individual_scores for "
                             f"{len(state_dicts)} state dicts")
        individual = [float(s) for s in individual_scores]
    order = sorted(range(len(state_dicts)), key=lambda i: -individual[i])
    soup = _RunningSoup(state_dicts[order[0]])
    chosen, best, trials = [order[0]], individual[order[0]], [individual[order[0]]]
    for i in tqdm(order[1:], desc="greedy soup", disable=not progress):
        s = float(score(soup.average(state_dicts[i])))
        trials.append(s)
        if s >= best:
            soup.add(state_dicts[i])
            chosen.append(i)
            best = s
    return SoupResult(chosen=chosen, order=order, individual_scores=individual, trial_scores=trials, score=best,
                      state_dict=soup.average())
