"""Isotropic merging in common and task-specific subspaces (Marczak et al. 2025, "No Task Left Behind").

Iso-C (section 4.1): for a 2-D tensor, the summed task vector Delta = sum_i tau_i = U S V^T has its
spectrum replaced by the constant mean(S) (an isotropic spectrum, eq. 7): Delta_iso = mean(S) U V^T.
Iso-CTS (section 4.2): with r = min(shape), the k leading directions of Delta (the common subspace) are
kept, and each of the T tasks adds its s leading directions of tau_i - U_k U_k^T tau_i (the part of its
task vector outside the common subspace); the concatenated left and right vectors are orthogonalised
(their polar factors P Q^T, as TSV-Merge) and given the isotropic spectrum mean of all kept singular
values. k and s as the authors' code (FusionBench `iso_cts`): k = int(r * common_space_fraction), then
s = round((r - k) / T) and k = r - T s, so the two parts fill the r directions exactly; unlike that code,
s is capped at r // T, so k never goes negative (it could for small r and small fractions).
Tensors of other ranks get the mean task vector, as the authors' code. theta = base + lambda * Delta.
Each tensor is merged whole (an SVD is not elementwise), in float32 as the engine hands it over.
"""

from __future__ import annotations

from typing import Any

import torch

from merging.methods.registry import merge_method, scaled_sum
from merging.methods.subspace import polar_factor


def iso_c_delta(task_vectors: list[torch.Tensor]) -> torch.Tensor:
    """Iso-C's merged 2-D task vector (without lambda): mean(S) U V^T of the summed task vectors."""
    total = torch.stack(task_vectors).sum(0)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    return (u * s.mean()) @ vh


def iso_cts_sizes(rank: int, n_tasks: int, fraction: float) -> tuple[int, int]:
    """(k, s): the common subspace's size and each task's, with k + n_tasks * s = rank."""
    common = int(rank * fraction)
    per_task = min(round((rank - common) / n_tasks), rank // n_tasks)
    return rank - n_tasks * per_task, per_task


def iso_cts_delta(task_vectors: list[torch.Tensor], fraction: float) -> torch.Tensor:
    """Iso-CTS's merged 2-D task vector (without lambda)."""
    total = torch.stack(task_vectors).sum(0)
    common, per_task = iso_cts_sizes(min(total.shape), len(task_vectors), fraction)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    us, ss, vhs = [u[:, :common]], [s[:common]], [vh[:common]]
    if per_task:
        for tau in task_vectors:
            specific = tau - us[0] @ (us[0].T @ tau)
            ut, st, vht = torch.linalg.svd(specific, full_matrices=False)
            us.append(ut[:, :per_task])
            ss.append(st[:per_task])
            vhs.append(vht[:per_task])
    sigma = torch.cat(ss).mean()
    return (polar_factor(torch.cat(us, dim=1)) * sigma) @ polar_factor(torch.cat(vhs, dim=0))


def _parts(tensors: list[torch.Tensor], base: torch.Tensor, delta_2d: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, Delta): the merge is base + lambda * Delta."""
    task_vectors = [t - base for t in tensors]
    if base.dim() == 2:
        return base, delta_2d(task_vectors)
    return base, torch.stack(task_vectors).mean(0)


def iso_c_parts(tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict[str, Any],
                rng: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return _parts(tensors, base, iso_c_delta)


def iso_cts_parts(tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict[str, Any],
                  rng: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    fraction = params["common_space_fraction"]
    return _parts(tensors, base, lambda tvs: iso_cts_delta(tvs, fraction))


@merge_method("iso_c", scaled=iso_c_parts)
def iso_c(tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict[str, Any],
          rng: torch.Generator) -> torch.Tensor:
    """Iso-C (Marczak et al. 2025, eq. 7); see the module docstring."""
    return scaled_sum(iso_c_parts(tensors, base, params), params["lambda"])


@merge_method("iso_cts", scaled=iso_cts_parts)
def iso_cts(tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict[str, Any],
            rng: torch.Generator) -> torch.Tensor:
    """Iso-CTS (Marczak et al. 2025, Alg. 1); see the module docstring."""
    return scaled_sum(iso_cts_parts(tensors, base, params), params["lambda"])
