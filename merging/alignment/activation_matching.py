"""Activation matching (Ainsworth et al. 2023, Git Re-Basin, section 3.1; Entezari et al. 2022).

For every permutation group, the units' activations are read where the network consumes them:
the input of each Linear/Conv whose weight axis 1 the group permutes (post-nonlinearity hidden
units, the normalised residual stream, attention heads' context vectors in head_dim blocks).
The cost is the sum over those sites (and over the positions within a block) of the Pearson
correlation between unit i of A and unit j of B over the data; one linear assignment per group.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from merging.alignment.spec import PermutationSpec
from merging.alignment.weight_matching import MatchResult, check_same_architecture
from merging.batches import input_batches as batches
from merging.modes import eval_mode
from taxonomy.errors import BasinError

SITE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def run_model(model: nn.Module, args: tuple, kwargs: dict, label: str) -> Any:
    try:
        return model(*args, **kwargs)
    except (RuntimeError, TypeError, ValueError, IndexError) as err:
        shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)] or {
            k: tuple(v.shape) for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        raise BasinError(f"data: a batch of shape {shapes} does not fit {label} ({str(err).splitlines()[0]})") from None


def sites(model: nn.Module, spec: PermutationSpec) -> dict[str, list[str]]:
    """group -> names of the Linear/Conv modules that read the group's units (weight axis 1)."""
    out: dict[str, list[str]] = {g: [] for g in spec.groups}
    for name, mod in model.named_modules():
        axes = spec.axes.get(f"{name}.weight" if name else "weight")
        if isinstance(mod, SITE_TYPES) and axes and len(axes) > 1 and axes[1] is not None:
            out[axes[1]].append(name)
    return out


def _unit_features(x: torch.Tensor, conv: bool, n: int) -> torch.Tensor:
    """[samples, n, block] from a site's input (channels at axis 1 for convs, last axis for Linear)."""
    x = x.detach().to(torch.float64)
    x = x.movedim(1, -1) if conv else x
    x = x.reshape(-1, x.shape[-1])
    return x.reshape(x.shape[0], n, -1)


class _Stats:
    def __init__(self) -> None:
        self.n = 0
        self.sa = self.sb = self.saa = self.sbb = self.sab = None

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        terms = (a.sum(0), b.sum(0), (a * a).sum(0), (b * b).sum(0), torch.einsum("sib,sjb->ijb", a, b))
        if self.sa is None:
            self.sa, self.sb, self.saa, self.sbb, self.sab = terms
        else:
            old = (self.sa, self.sb, self.saa, self.sbb, self.sab)
            self.sa, self.sb, self.saa, self.sbb, self.sab = (x + t for x, t in zip(old, terms))
        self.n += a.shape[0]

    def correlation(self) -> torch.Tensor:
        """[n, n]: sum over block positions of corr(unit i of A, unit j of B)."""
        mean_a, mean_b = self.sa / self.n, self.sb / self.n
        std_a = (self.saa / self.n - mean_a**2).clamp_min(0).sqrt() + 1e-8
        std_b = (self.sbb / self.n - mean_b**2).clamp_min(0).sqrt() + 1e-8
        cov = self.sab / self.n - mean_a[:, None, :] * mean_b[None, :, :]
        return (cov / (std_a[:, None, :] * std_b[None, :, :])).sum(-1)


def check_spec_argument(spec: Any, data: Any, name: str) -> None:
    """TypeError unless `spec` is a PermutationSpec: the matchers take (A, B, spec, ...) as weight_matching does,
    so the earlier (A, B, data, spec) order fails loudly instead of being misread."""
    if isinstance(spec, PermutationSpec):
        return
    swapped = isinstance(data, PermutationSpec)
    hint = (f" (spec and data look swapped: call {name}(model_a, model_b, spec, data, ...), "
            "weight_matching's order)" if swapped else "")
    raise TypeError(f"{name}: spec must be a PermutationSpec, got {type(spec).__name__}{hint}")


@torch.no_grad()

def _accumulate(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec, data: Any,
                where: dict[str, list[str]], captured: dict[str, dict[str, torch.Tensor]], stats: dict) -> int:
    """Run both models over `data`, adding each site's unit features to its group's statistics; the batch count."""
    modules = dict(model_a.named_modules())
    seen = 0
    for args, kwargs in batches(data):
        run_model(model_a, args, kwargs, "model A")
        run_model(model_b, args, kwargs, "model B")
        seen += 1
        for group, names in where.items():
            n = spec.sizes[group]
            for name in names:
                conv = not isinstance(modules[name], nn.Linear)
                stats[group].add(_unit_features(captured["a"][name], conv, n),
                                 _unit_features(captured["b"][name], conv, n))
    return seen

def activation_matching(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec, data: Any) -> MatchResult:
    """Permutations of B's units maximising the correlation of its activations with A's on `data`.

    Arguments in weight_matching's order (A, B, spec, then the rest); the old (A, B, data, spec) order raises
    TypeError."""
    check_spec_argument(spec, data, "activation_matching")
    start, cpu_start = time.perf_counter(), time.process_time()
    check_same_architecture(model_a.state_dict(), model_b.state_dict(), spec)
    where = sites(model_a, spec)
    unread = [g for g, names in where.items() if not names]
    if unread:
        raise BasinError(f"activation matching: no Linear/Conv module reads the units of group {unread[0]!r} "
                         "(use weight matching for this model)")
    stats = {g: _Stats() for g in spec.groups}
    captured: dict[str, dict[str, torch.Tensor]] = {"a": {}, "b": {}}
    handles = []
    for key, model in (("a", model_a), ("b", model_b)):
        modules = dict(model.named_modules())
        for names in where.values():
            for name in names:
                def hook(mod, inputs, key=key, name=name):
                    captured[key][name] = inputs[0].clone()  # read after the pass: later in-place ops must not reach it
                handles.append(modules[name].register_forward_pre_hook(hook))
    try:
        with eval_mode(model_a), eval_mode(model_b):
            seen = _accumulate(model_a, model_b, spec, data, where, captured, stats)
        if not seen:
            raise BasinError("data: no batches")
    finally:
        for h in handles:
            h.remove()
    perms: dict[str, torch.Tensor] = {}
    objective: list[float] = []
    for group in spec.groups:
        corr = stats[group].correlation().numpy()
        _, cols = linear_sum_assignment(np.nan_to_num(corr), maximize=True)
        perms[group] = torch.as_tensor(cols, dtype=torch.long)
        objective.append(float(corr[np.arange(len(cols)), cols].mean()))
    return MatchResult(perms, objective, True, 1, time.perf_counter() - start, method="activation_matching",
                       cpu_seconds=time.process_time() - cpu_start)
