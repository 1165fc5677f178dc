"""Per-task masks over one multi-task vector: TALL masks and consensus merging (Wang et al. 2024, "Localizing
Task Information for Improved Model Merging and Compression").

With tau_MTL = sum_t tau_t (task arithmetic's merged vector), task t's TALL mask (eq. 5) keeps the entries
where its task vector outweighs what the others add there: m_t = |tau_t| > tall_lambda * |tau_MTL - tau_t|
(strict, as the authors' code). Consensus merging (eq. 7) keeps the entries that at least k = `min_agreement`
masks hold, dropping the weights no task uses ("catastrophic") and, with k = 2, those only one task uses
("selfish"): theta = base + lambda * 1[sum_t m_t >= k] * tau_MTL. Elementwise: large tensors stream in chunks.
"""

from __future__ import annotations

from typing import Any

import torch

from merging.methods.registry import merge_method


def tall_masks(task_vectors: list[torch.Tensor], tall_lambda: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(tau_MTL, [m_t]): the summed task vector and each task's TALL mask (bool), eq. 5."""
    total = task_vectors[0].clone()
    for tau in task_vectors[1:]:
        total += tau
    masks = [tau.abs() > (total - tau).abs_().mul_(tall_lambda) for tau in task_vectors]
    return total, masks


@merge_method("consensus_ta", elementwise=True)
def consensus_ta(tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict[str, Any],
                 rng: torch.Generator) -> torch.Tensor:
    """Consensus Task Arithmetic (Wang et al. 2024, eq. 7); see the module docstring."""
    total, masks = tall_masks([t - base for t in tensors], params["tall_lambda"])
    votes = torch.stack(masks).sum(0)
    return base + params["lambda"] * (total * (votes >= params["min_agreement"]))
