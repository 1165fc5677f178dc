"""Parameter points as dicts of tensors: extraction, interpolation, stacking, flattening.

Every evaluator in this package treats a model's weights as a plain `dict[str, Tensor]` that is fed to
`torch.func.functional_call`; this module holds the small pure helpers over such dicts.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from taxonomy.errors import BasinError

Params = dict[str, torch.Tensor]


def as_params(obj: object, label: str = "model") -> Params:
    """A detached dict of tensors from an `nn.Module` (parameters and buffers), a state dict or a Checkpoint."""
    if isinstance(obj, nn.Module):
        out = {k: v.detach() for k, v in obj.named_parameters()}
        out.update({k: v.detach() for k, v in obj.named_buffers()})
        return out
    if isinstance(obj, Mapping):
        out = {}
        for k in obj.keys():
            v = obj[k]
            if not isinstance(v, torch.Tensor):
                raise BasinError(f"{label}: entry {k!r} is a {type(v).__name__}, not a tensor")
            out[k] = v.detach()
        return out
    raise BasinError(f"{label}: expected an nn.Module or a dict of tensors, got {type(obj).__name__}")


def parameter_names(model: nn.Module) -> list[str]:
    """Names of the model's trainable parameters (not buffers)."""
    return [k for k, _ in model.named_parameters()]


def check_same_keys(a: Mapping, b: Mapping, label_a: str = "A", label_b: str = "B") -> None:
    """Raise a BasinError naming the first tensor that differs in presence or shape."""
    missing = sorted(set(a) ^ set(b))
    if missing:
        where = label_b if missing[0] in a else label_a
        raise BasinError(f"tensor {missing[0]!r} is missing from {where}")
    for k in a:
        if a[k].shape != b[k].shape:
            raise BasinError(f"tensor {k!r}: shape {tuple(a[k].shape)} in {label_a} "
                             f"vs {tuple(b[k].shape)} in {label_b}")


def check_points(points: list[Params], model: nn.Module | None = None, labels: list[str] | None = None) -> None:
    """Raise a BasinError naming the first model (and tensor) whose names or shapes differ from the first
    point's, or from `model`'s own parameters and buffers."""
    labels = labels or [f"model {i}" for i in range(len(points))]
    for label, p in zip(labels[1:], points[1:]):
        check_same_keys(points[0], p, labels[0], label)
    if model is None or not points:
        return
    own = as_params(model)
    for k, v in points[0].items():
        if k not in own:
            raise BasinError(f"{labels[0]}: tensor {k!r} is not a parameter or buffer of the model")
        if own[k].shape != v.shape:
            raise BasinError(f"{labels[0]}: tensor {k!r} has shape {tuple(v.shape)}, "
                             f"the model's is {tuple(own[k].shape)}")


def is_float(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def lerp(a: Params, b: Params, alpha: float | torch.Tensor) -> Params:
    """(1 - alpha) a + alpha b for floating tensors; integer tensors (e.g. BN counters) are taken from a."""
    return {k: torch.lerp(v, b[k], alpha) if is_float(v) else v for k, v in a.items()}


def combine(center: Params, terms: list[tuple[float | torch.Tensor, Params]]) -> Params:
    """center + sum_i c_i d_i over floating tensors (directions may omit keys: treated as zero)."""
    out = {}
    for k, v in center.items():
        if is_float(v):
            acc = v
            for c, d in terms:
                if k in d:
                    acc = acc + c * d[k]
            out[k] = acc
        else:
            out[k] = v
    return out


def stack(points: list[Params]) -> Params:
    """Stack parameter dicts along a new leading axis (for `vmap`)."""
    return {k: torch.stack([p[k] for p in points]) for k in points[0]}


def flatten(p: Params, keys: list[str] | None = None) -> torch.Tensor:
    """Concatenate the floating tensors of `p` (in `keys` order, default: dict order) into one vector."""
    keys = [k for k in (keys or list(p)) if is_float(p[k])]
    return torch.cat([p[k].reshape(-1).to(torch.float64) for k in keys]) if keys else torch.zeros(0)


def unflatten(vec: torch.Tensor, like: Params, keys: list[str] | None = None) -> Params:
    """Inverse of `flatten`: split `vec` into tensors shaped like `like` (non-floating entries copied)."""
    keys = [k for k in (keys or list(like)) if is_float(like[k])]
    out, start = {}, 0
    for k in keys:
        n = like[k].numel()
        out[k] = vec[start : start + n].reshape(like[k].shape).to(like[k].dtype)
        start += n
    if start != vec.numel():
        raise BasinError(f"vector has {vec.numel()} entries, the parameters {start}")
    return {k: out.get(k, like[k]) for k in like}


def subtract(a: Params, b: Params) -> Params:
    """a - b over floating tensors (a task vector when b is the base)."""
    return {k: a[k] - b[k] for k in a if is_float(a[k])}
