"""REPAIR and BatchNorm re-estimation (Jordan et al. 2023, REPAIR: REnormalizing Permuted Activations
for Interpolation Repair, section 4).

Interpolating two aligned networks shrinks the variance of hidden units ("variance collapse").
REPAIR gives every unit of the interpolated network at alpha the mean and standard deviation
that interpolate the endpoints' statistics, mu = (1 - alpha) mu_A + alpha mu_B and likewise for
sigma, measured on data. Here the correction is folded into each Linear/Conv layer's weight and
bias (its output is affine in them), layer by layer so that later layers see corrected inputs.
For networks with BatchNorm, `reset_bn_stats` (re-estimating the running statistics) is the
corresponding fix.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from merging.alignment.activation_matching import SITE_TYPES, batches, run_model
from merging.modes import eval_mode, training_mode
from merging.reductions import column_mean_std64
from taxonomy.errors import BasinError


@torch.no_grad()
def reset_bn_stats(model: nn.Module, data: Any) -> nn.Module:
    """Recompute every BatchNorm's running mean/variance as the average over `data` (in place)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        raise BasinError(f"{type(model).__name__}: has no BatchNorm layers to re-estimate")
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    try:
        with training_mode(model):
            for args, kwargs in batches(data):
                run_model(model, args, kwargs, type(model).__name__)
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
    return model


def unit_stats(model: nn.Module, names: list[str], data: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-unit mean and standard deviation of each named module's output over `data` (one pass)."""
    modules = dict(model.named_modules())
    acc: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = []
    for name in names:
        def hook(mod, _inp, out, name=name):
            x = out.detach().to(torch.float64)
            x = x.movedim(1, -1) if not isinstance(mod, nn.Linear) else x
            acc[name].append(x.reshape(-1, x.shape[-1]))
        handles.append(modules[name].register_forward_hook(hook))
    try:
        with eval_mode(model):
            for args, kwargs in batches(data):
                run_model(model, args, kwargs, type(model).__name__)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, parts in acc.items():
        x = torch.cat(parts)
        mean, std = column_mean_std64(x)  # accumulated in float64 over blocks of samples
        out[name] = (mean.to(x.dtype), std.to(x.dtype))
    return out


def repair_sites(model: nn.Module) -> list[str]:
    """Default sites: every Linear/Conv except the last one (the output layer)."""
    names = [n for n, m in model.named_modules() if isinstance(m, SITE_TYPES)]
    return names[:-1]


@torch.no_grad()
def repair(model: nn.Module, model_a: nn.Module, model_b: nn.Module, data: Any, alpha: float = 0.5,
           sites: list[str] | None = None, eps: float = 1e-5) -> nn.Module:
    """REPAIR `model` (the interpolation of aligned `model_a` and `model_b` at `alpha`) in place."""
    if not 0.0 <= alpha <= 1.0:
        raise BasinError(f"repair: alpha must lie in [0, 1], got {alpha}")
    names = repair_sites(model) if sites is None else sites
    modules = dict(model.named_modules())
    for name in names:
        mod = modules.get(name)
        if not isinstance(mod, SITE_TYPES):
            raise BasinError(f"repair: {name!r} is not a Linear/Conv module of {type(model).__name__}")
        if mod.bias is None:
            raise BasinError(f"repair: layer {name!r} has no bias to carry the correction; "
                             "for BatchNorm networks use reset_bn_stats")
    stats_a, stats_b = unit_stats(model_a, names, data), unit_stats(model_b, names, data)
    for name in names:  # in order: each correction changes the inputs of the layers after it
        (mean_a, std_a), (mean_b, std_b) = stats_a[name], stats_b[name]
        goal_mean = (1 - alpha) * mean_a + alpha * mean_b
        goal_std = (1 - alpha) * std_a + alpha * std_b
        mean, std = unit_stats(model, [name], data)[name]
        scale = goal_std / (std + eps)
        mod = modules[name]
        shape = (-1,) + (1,) * (mod.weight.dim() - 1)
        mod.weight.mul_(scale.view(shape).to(mod.weight.dtype))
        mod.bias.copy_(((mod.bias.double() - mean) * scale + goal_mean).to(mod.bias.dtype))
    return model
