"""Straight-through estimator matching (Ainsworth et al. 2023, Git Re-Basin, section 3.3, Algorithm 2).

Learn a proxy theta~ (initialised at theta_A). Each step projects B onto theta~ by weight matching,
pi = argmax <theta~, pi(theta_B)>, and evaluates the loss at the midpoint
(theta_A + pi(theta_B)) / 2, where pi(theta_B) is replaced by theta~ + (pi(theta_B) - theta~).detach():
the forward pass uses the permuted B, the gradient updates theta~ (straight through the projection).
The permutation with the lowest midpoint loss seen is returned.
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from merging.alignment.activation_matching import batches, check_spec_argument
from merging.alignment.apply import apply_permutation
from merging.alignment.spec import PermutationSpec
from merging.alignment.weight_matching import MatchResult, check_same_architecture, weight_matching
from merging.modes import eval_mode
from taxonomy.errors import BasinError


def ste_matching(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec, data: Any,
                 loss_fn: Callable | None = None, steps: int = 20, lr: float = 1e-3, seed: int = 0) -> MatchResult:
    """Permutations of B found by the straight-through estimator; `data` is (x, y) or a list of (x, y).

    Arguments in weight_matching's order (A, B, spec, then the rest); the old (A, B, data, spec) order raises
    TypeError."""
    from torch.func import functional_call

    check_spec_argument(spec, data, "ste_matching")

    start, cpu_start = time.perf_counter(), time.process_time()
    loss_fn = loss_fn or nn.functional.cross_entropy
    state_a = {k: v.detach() for k, v in model_a.state_dict().items()}
    state_b = {k: v.detach() for k, v in model_b.state_dict().items()}
    check_same_architecture(state_a, state_b, spec)
    pairs = [(b[0], b[1]) for b in ([data] if isinstance(data, tuple) else list(data))
             if isinstance(b, (tuple, list)) and len(b) == 2]
    if not pairs:
        raise BasinError("ste: data must be (x, y) or a list of (x, y) batches")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise BasinError(f"ste: steps must be a positive integer, got {steps!r}")
    trainable = {k for k, v in state_a.items() if v.is_floating_point()}
    proxy = {k: state_a[k].clone().requires_grad_(True) for k in trainable}
    opt = torch.optim.Adam(list(proxy.values()), lr=lr)
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    trace: list[float] = []
    with eval_mode(model_a):
        for step in range(steps):
            x, y = pairs[step % len(pairs)]
            perms = weight_matching({k: proxy[k].detach() if k in proxy else v for k, v in state_a.items()},
                                    state_b, spec, seed=seed + step).perms
            projected = apply_permutation(state_b, spec, perms)
            mid = {k: (state_a[k] + proxy[k] + (projected[k] - proxy[k]).detach()) / 2 if k in proxy else state_a[k]
                   for k in state_a}
            for args, kwargs in batches(x):
                loss = loss_fn(functional_call(model_a, mid, args, kwargs), y)
            value = float(loss.detach())
            trace.append(value)
            if best is None or value < best[0]:
                best = (value, perms)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return MatchResult(best[1], trace, True, steps, time.perf_counter() - start, method="ste",
                       cpu_seconds=time.process_time() - cpu_start)
