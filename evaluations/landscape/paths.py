"""Paths between parameter points: linear, piecewise-linear chains, and curves fitted by training.

A path is a callable alpha in [0, 1] -> parameter dict.

- `linear_path(a, b)`: theta(alpha) = (1 - alpha) a + alpha b.
- `chain_path([m0, ..., mK])`: the polygon through K + 1 models, each segment 1/K of alpha.
- `BezierCurve`: the quadratic Bezier curve of Garipov et al. 2018 ("Loss Surfaces, Mode Connectivity, and
  Fast Ensembling of DNNs", Sec. 3.1): theta(t) = (1 - t)^2 a + 2 t (1 - t) c + t^2 b.
- `PolygonalChain`: Garipov et al.'s one-bend chain: a -> c on t in [0, 1/2], c -> b on [1/2, 1].
- `fit_curve`: trains the control point c to minimise E_{t ~ U(0, 1)} L(theta(t)) (their Eq. 4), one t per
  minibatch, endpoints fixed; returns the trained control point as a state dict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call
from tqdm import tqdm

from evaluations.landscape.params import Params, as_params, check_same_keys, is_float, lerp, parameter_names
from merging.modes import training_mode
from taxonomy.errors import BasinError


class Path:
    """Callable alpha in [0, 1] -> parameter dict."""

    def __call__(self, alpha: float) -> Params:
        raise NotImplementedError

    def stacked(self, alphas: torch.Tensor) -> Params:
        """The points at `alphas`, stacked along a new leading axis (override for a vectorised form)."""
        points = [self(float(a)) for a in alphas]
        return {k: torch.stack([p[k] for p in points]) for k in points[0]}


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not (0.0 <= alpha <= 1.0) or math.isnan(alpha):
        raise BasinError(f"alpha={alpha} is outside [0, 1]")
    return alpha


class LinearPath(Path):
    def __init__(self, a: Params, b: Params):
        check_same_keys(a, b)
        self.a, self.b = a, b

    def __call__(self, alpha: float) -> Params:
        return lerp(self.a, self.b, _check_alpha(alpha))

    def stacked(self, alphas: torch.Tensor) -> Params:
        out = {}
        for k, v in self.a.items():
            if is_float(v):
                w = alphas.to(v.device, v.dtype).reshape(-1, *([1] * v.dim()))
                out[k] = v.unsqueeze(0) + w * (self.b[k] - v).unsqueeze(0)
            else:
                out[k] = v.unsqueeze(0).expand(len(alphas), *v.shape)
        return out


class ChainPath(Path):
    def __init__(self, models: list[Params]):
        if len(models) < 2:
            raise BasinError(f"chain_path needs at least 2 models, got {len(models)}")
        for i, m in enumerate(models[1:], 1):
            check_same_keys(models[0], m, "model 0", f"model {i}")
        self.models = models

    def __call__(self, alpha: float) -> Params:
        k = len(self.models) - 1
        pos = _check_alpha(alpha) * k
        i = min(int(pos), k - 1)
        return lerp(self.models[i], self.models[i + 1], pos - i)


def linear_path(a: object, b: object) -> Path:
    """The straight line between two models (modules or state dicts); for checkpoint references (paths, Hub
    ids, `Checkpoint`s) a streamed `CheckpointPath` that `evaluate_path` evaluates without loading them."""
    from evaluations.landscape.checkpoint_paths import CheckpointPath, is_checkpoint_ref

    if is_checkpoint_ref(a) or is_checkpoint_ref(b):
        return CheckpointPath([a, b], "linear")
    return LinearPath(as_params(a, "A"), as_params(b, "B"))


def chain_path(models: list[object]) -> Path:
    """The piecewise-linear path through `models` in order, each segment an equal share of alpha (streamed
    when they are checkpoint references, as `linear_path`)."""
    from evaluations.landscape.checkpoint_paths import CheckpointPath, is_checkpoint_ref

    if any(is_checkpoint_ref(m) for m in models):
        return CheckpointPath(list(models), "chain")
    return ChainPath([as_params(m, f"model {i}") for i, m in enumerate(models)])


class _Curve(Path):
    """Endpoints a, b fixed; the control point `control` (names in `trainable`) is a dict of tensors."""

    def __init__(self, a: Params, b: Params, control: Params | None = None, trainable: list[str] | None = None):
        check_same_keys(a, b)
        self.a, self.b = a, b
        self.trainable = [k for k in (trainable or list(a)) if is_float(a[k])]
        init = control if control is not None else lerp(a, b, 0.5)
        self.control = {k: init[k].detach().clone() for k in self.trainable}

    def weights(self, t: float) -> tuple[float, float, float]:
        raise NotImplementedError

    def __call__(self, alpha: float) -> Params:
        wa, wc, wb = self.weights(_check_alpha(alpha))
        out = {}
        for k, v in self.a.items():
            if k in self.control:
                out[k] = wa * v + wc * self.control[k] + wb * self.b[k]
            elif is_float(v):
                out[k] = torch.lerp(v, self.b[k], alpha)
            else:
                out[k] = v
        return out


class BezierCurve(_Curve):
    """Quadratic Bezier curve (Garipov et al. 2018): (1-t)^2 a + 2t(1-t) c + t^2 b."""

    def weights(self, t: float) -> tuple[float, float, float]:
        return (1 - t) ** 2, 2 * t * (1 - t), t**2


class PolygonalChain(_Curve):
    """One-bend polygonal chain (Garipov et al. 2018): a -> c for t <= 1/2, c -> b after."""

    def weights(self, t: float) -> tuple[float, float, float]:
        if t <= 0.5:
            return 1 - 2 * t, 2 * t, 0.0
        return 0.0, 2 - 2 * t, 2 * t - 1


CURVES = {"bezier": BezierCurve, "polychain": PolygonalChain, "polygonal": PolygonalChain}


@dataclass
class FittedCurve:
    curve: _Curve
    control: Params  # the trained control point, as a (partial) state dict: trainable parameters only
    kind: str
    train_loss: list[float] = field(default_factory=list)  # mean loss per epoch

    def state_dict(self) -> Params:
        """A full state dict for the control point (buffers taken from the midpoint of a and b)."""
        mid = lerp(self.curve.a, self.curve.b, 0.5)
        return {k: self.control.get(k, v).detach().clone() for k, v in mid.items()}

    def to_json(self) -> dict:
        return {"kind": self.kind, "train_loss": self.train_loss, "control_tensors": sorted(self.control)}


def fit_curve(
    model: nn.Module,
    a: object,
    b: object,
    data: object,
    kind: str = "bezier",
    epochs: int = 20,
    lr: float = 1e-2,
    batch_size: int = 128,
    seed: int = 0,
    loss_fn=None,
    weight_decay: float = 0.0,
    progress: bool = False,
) -> FittedCurve:
    """Train the control point of a curve between `a` and `b` (Garipov et al. 2018, Eq. 4).

    Each minibatch draws t ~ U(0, 1) and takes an Adam step on L(theta(t)); the endpoints stay fixed.
    `data` is (x, y) tensors (shuffled into minibatches with `seed`) or an iterable of (x, y) batches.
    """
    if kind not in CURVES:
        raise BasinError(f"kind={kind!r}: choose from {sorted(CURVES)}")
    from evaluations.landscape.evaluate import default_loss, iter_batches

    loss_fn = loss_fn or default_loss
    pa, pb = as_params(a, "A"), as_params(b, "B")
    curve = CURVES[kind](pa, pb, trainable=parameter_names(model))
    for v in curve.control.values():
        v.requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(list(curve.control.values()), lr=lr, weight_decay=weight_decay)
    history = []
    with training_mode(model):
        for _ in tqdm(range(epochs), desc=f"fit {kind}", disable=not progress):
            total, count = 0.0, 0
            for x, y in iter_batches(data, batch_size=batch_size, generator=gen):
                t = float(torch.rand((), generator=gen))
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(functional_call(model, curve(t), (x,)), y)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(y)
                count += len(y)
            history.append(total / max(count, 1))
    for v in curve.control.values():
        v.requires_grad_(False)
    control = {k: v.detach().clone() for k, v in curve.control.items()}
    return FittedCurve(curve=curve, control=control, kind=kind, train_loss=history)
