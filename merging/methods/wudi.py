"""WUDI-merging (Cheng et al. 2025, "Whoever Started the Interference Should End It: Guiding Data-Free Model
Merging via Task Vectors"), per 2-D tensor.

The task vectors stand in for the inputs a layer sees (section 4: a linear layer's update lies in the span
of its inputs), so the merged vector tau should leave each task's outputs unchanged on its own task
vector's rows: it minimises (eq. 11)
    L(tau) = sum_i ||(tau - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2
from tau = sum_i tau_i by Adam (lr 1e-5, betas 0.9 / 0.999, eps 1e-8, `iterations` steps; the authors' code
and FusionBench's `wudi_merging`, whose default is 400 steps). The gradient is computed in closed form,
dL/dtau = 2 (tau A - B) with A = sum_i tau_i^T tau_i / n_i and B = sum_i tau_i tau_i^T tau_i / n_i
(n_i = ||tau_i||_F^2), so a step costs one (out x in) by (in x in) product instead of 2T products with
autograd; the Adam update is torch.optim.Adam's. Deterministic (no randomness), float32 as the engine hands
tensors over. Tensors of other ranks get the mean task vector, as the authors' code; theta = base + tau.
A task vector that is zero on a tensor is left out of L (the authors' code divides by its zero norm).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from merging.methods.registry import merge_method

BETAS, EPS = (0.9, 0.999), 1e-8


def interference_terms(task_vectors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the gradient 2 (tau A - B) of WUDI's loss (eq. 11)."""
    cols = task_vectors[0].shape[1]
    a = torch.zeros(cols, cols, dtype=task_vectors[0].dtype)
    b = torch.zeros_like(task_vectors[0])
    for tau in task_vectors:
        norm = float(tau.square().sum())
        if norm > 0:
            gram = tau.T @ tau / norm
            a += gram
            b += tau @ gram
    return a, b


def wudi_delta(task_vectors: list[torch.Tensor], iterations: int, lr: float) -> torch.Tensor:
    """WUDI's merged 2-D task vector: `iterations` Adam steps on eq. 11 from the sum of the task vectors."""
    tau = torch.stack(task_vectors).sum(0)
    a, b = interference_terms(task_vectors)
    m, v = torch.zeros_like(tau), torch.zeros_like(tau)
    for step in range(1, iterations + 1):
        grad = (tau @ a).sub_(b).mul_(2)
        m.lerp_(grad, 1 - BETAS[0])
        v.mul_(BETAS[1]).addcmul_(grad, grad, value=1 - BETAS[1])
        step_size = lr / (1 - BETAS[0] ** step)
        denom = (v.sqrt() / math.sqrt(1 - BETAS[1] ** step)).add_(EPS)
        tau.addcdiv_(m, denom, value=-step_size)
    return tau


@merge_method("wudi")
def wudi(tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict[str, Any],
         rng: torch.Generator) -> torch.Tensor:
    """WUDI-merging (Cheng et al. 2025, eq. 11); see the module docstring."""
    task_vectors = [t - base for t in tensors]
    if base.dim() != 2:
        return base + torch.stack(task_vectors).mean(0)
    return base + wudi_delta(task_vectors, int(params["iterations"]), params["lr"])
