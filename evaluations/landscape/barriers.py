"""Barriers along a path, each form named with its reference.

For values v(alpha) (loss, or error = 1 - accuracy) along a path with endpoints v(0), v(1):

- form="linear": the chord barrier max_alpha [v(alpha) - ((1 - alpha) v(0) + alpha v(1))], with its argmax.
- form="entezari": Entezari et al. 2022, "The Role of Permutation Invariance in Linear Mode Connectivity of
  Neural Networks", Definition 2.1: B = sup_alpha [L(alpha t1 + (1 - alpha) t2)] - [alpha L(t1) + (1 - alpha)
  L(t2)]. Numerically the chord form above (the sup taken over the evaluated alphas); kept as its own name
  so a result states which paper's definition it reports.
- form="frankle": Frankle et al. 2020, "Linear Mode Connectivity and the Lottery Ticket Hypothesis",
  Sec. 2 instability: max_alpha v(alpha) - mean(v(0), v(1)) (they use test error; a network is "stable"
  when this is below 2%).
- relative=True divides any form by the endpoints' mean (v(0) + v(1)) / 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evaluations.landscape.evaluate import PathResult, evaluate_path
from evaluations.landscape.paths import linear_path
from evaluations.results import fields_json
from taxonomy.errors import BasinError

REFERENCES = {
    "linear": "chord barrier: max_a [v(a) - ((1-a) v(0) + a v(1))]",
    "entezari": "Entezari et al. 2022, The Role of Permutation Invariance in Linear Mode Connectivity of "
                "Neural Networks, Definition 2.1",
    "frankle": "Frankle et al. 2020, Linear Mode Connectivity and the Lottery Ticket Hypothesis, Sec. 2 "
               "(instability: max_a v(a) - mean(v(0), v(1)); stable below 2% error)",
}
FRANKLE_STABLE = 0.02


@dataclass(frozen=True)
class Barrier:
    value: float
    alpha: float  # where the maximum is reached
    kind: str  # "loss" or "error"
    form: str
    relative: bool
    reference: str
    endpoints: tuple[float, float]
    stable: bool | None = None  # Frankle et al.'s criterion (error barrier below 2%), for form="frankle"

    def to_json(self) -> dict:
        return fields_json(self)


def barrier_values(alphas: np.ndarray, values: np.ndarray, form: str = "linear") -> np.ndarray:
    """Per-alpha excess whose maximum is the barrier of `form`."""
    alphas, values = np.asarray(alphas, float), np.asarray(values, float)
    if form in ("linear", "entezari"):
        return values - ((1 - alphas) * values[0] + alphas * values[-1])
    if form == "frankle":
        return values - 0.5 * (values[0] + values[-1])
    raise BasinError(f"form={form!r}: choose from {sorted(REFERENCES)}")


def barrier(result: PathResult, kind: str = "loss", form: str = "linear", relative: bool = False) -> Barrier:
    """The barrier of `form` on the loss or error along an evaluated path."""
    if kind not in ("loss", "error"):
        raise BasinError(f"kind={kind!r}: choose 'loss' or 'error'")
    values = np.asarray(result.loss if kind == "loss" else result.error, float)
    if np.isnan(values).any():
        raise BasinError(f"kind={kind!r}: the path has NaN {kind} values (no accuracy for this task?)")
    excess = barrier_values(result.alphas, values, form)
    i = int(np.argmax(excess))
    value = float(excess[i])
    if relative:
        mean = 0.5 * (values[0] + values[-1])
        value = float(value / mean) if mean != 0 else (0.0 if value == 0 else float("inf"))
    stable = None
    if form == "frankle" and kind == "error":
        stable = float(excess[i]) < FRANKLE_STABLE
    return Barrier(value=value, alpha=float(result.alphas[i]), kind=kind, form=form, relative=relative,
                   reference=REFERENCES[form], endpoints=(float(values[0]), float(values[-1])), stable=stable)


def interpolation_barrier(model, a, b, data, alphas=25, kind: str = "loss", form: str = "linear",
                          relative: bool = False, **evaluate_kwargs) -> Barrier:
    """Barrier of `form` along the straight line from `a` to `b` (modules or state dicts) on `data`."""
    result = evaluate_path(model, linear_path(a, b), data, alphas=alphas, **evaluate_kwargs)
    return barrier(result, kind=kind, form=form, relative=relative)
