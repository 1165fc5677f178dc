"""Per-task masks over one multi-task vector: TALL masks and consensus merging (Wang et al. 2024, "Localizing
Task Information for Improved Model Merging and Compression").

With tau_MTL = sum_t tau_t (task arithmetic's merged vector), task t's TALL mask (eq. 5) keeps the entries
where its task vector outweighs what the others add there: m_t = |tau_t| > tall_lambda * |tau_MTL - tau_t|
(strict, as the authors' code). Consensus merging (eq. 7) keeps the entries that at least k = `min_agreement`
masks hold, dropping the weights no task uses ("catastrophic") and, with k = 2, those only one task uses
("selfish"): theta = base + lambda * 1[sum_t m_t >= k] * tau_MTL. Elementwise: large tensors stream in chunks
(on the CPU through the compiled `elect_chunk`).

`tall_masks` writes the task-arithmetic merge base + lambda * tau_MTL and, beside it, tau_MTL and every
task's mask: task t is base + m_t * tau_MTL (eq. 6; `merging.output.task_files.task_tensors`), so inference
needs the task's identity.

EMR-merging (Huang et al. 2024, "Elect, Mask & Rescale", Alg. 1): elect the sign gamma = sgn(sum_t tau_t)
(a zero sum counts as negative, as the authors' code) and, per entry, the largest magnitude among the task
vectors of that sign: tau_uni = gamma * max_t |tau_t| 1[tau_t gamma > 0]; mask M_t = 1[tau_t gamma > 0];
rescaler c_t = sum_n mean|tau_t^n| / sum_n mean|M_t^n tau_uni^n| over the tensors n (the authors' code; the
paper's eq. 6 writes the plain sums over all entries). The merged model written is base + tau_uni; tau_uni,
the masks and the per-tensor sums (the rescalers need the whole model) go beside it, and task t is
base + c_t M_t * tau_uni.
"""

from __future__ import annotations

from typing import Any

import torch

from merging.methods import kernels
from merging.methods.registry import Layout, TaskOutputs, merge_method


def tall_masks(task_vectors: list[torch.Tensor], tall_lambda: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(tau_MTL, [m_t]): the summed task vector and each task's TALL mask (bool), eq. 5."""
    total = task_vectors[0].clone()
    for tau in task_vectors[1:]:
        total += tau
    masks = [tau.abs() > (total - tau).abs_().mul_(tall_lambda) for tau in task_vectors]
    return total, masks


def _consensus_kernel(inputs: Any, params: dict[str, Any]) -> Any:
    return kernels.elect(kernels.ELECT_CONSENSUS, inputs, lambda x, b: consensus_ta.fn(x, b, params, None),
                         params["tall_lambda"], params["lambda"], params["min_agreement"])


@merge_method("consensus_ta", elementwise=True, fused=_consensus_kernel)
def consensus_ta(tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict[str, Any],
                 rng: torch.Generator) -> torch.Tensor:
    """Consensus Task Arithmetic (Wang et al. 2024, eq. 7); see the module docstring."""
    total, masks = tall_masks([t - base for t in tensors], params["tall_lambda"])
    votes = torch.stack(masks).sum(0)
    return base + params["lambda"] * (total * (votes >= params["min_agreement"]))


def _mask_layout(shape: tuple[int, ...], n: int, dtype: torch.dtype) -> Layout:
    return [("task_vector", shape, dtype)] + [(f"mask.{t}", shape, torch.bool) for t in range(n)]


def _tall_outputs(task_vectors: list[torch.Tensor], params: dict[str, Any],
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    total, masks = tall_masks(task_vectors, params["tall_lambda"])
    return {"task_vector": total.to(dtype), **{f"mask.{t}": m for t, m in enumerate(masks)}}


@merge_method("tall_masks", elementwise=True, task_outputs=TaskOutputs(_mask_layout, _tall_outputs))
def tall_masks_merge(tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict[str, Any],
                     rng: torch.Generator) -> torch.Tensor:
    """TALL masks (Wang et al. 2024, eq. 5-6): the merged model is task arithmetic, base + lambda * tau_MTL;
    the per-task masks are written beside it (see the module docstring)."""
    total = tensors[0] - base
    for t in tensors[1:]:
        total += t - base
    return base + params["lambda"] * total


def emr_elect(task_vectors: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(tau_uni, [M_t]): EMR's elected unified task vector and each task's sign mask (bool), Alg. 1 lines 1-4."""
    total = task_vectors[0].clone()
    for tau in task_vectors[1:]:
        total += tau
    sign = torch.where(total > 0, 1.0, -1.0)
    masks = [tau * sign > 0 for tau in task_vectors]
    largest = torch.zeros_like(total)
    for tau, mask in zip(task_vectors, masks):
        largest = torch.maximum(largest, tau.abs() * mask)
    return largest * sign, masks


def _emr_layout(shape: tuple[int, ...], n: int, dtype: torch.dtype) -> Layout:
    return _mask_layout(shape, n, dtype) + [("l1", (n,), torch.float64), ("masked_l1", (n,), torch.float64),
                                            ("numel", (1,), torch.float64)]


def emr_elect_inplace(task_vectors: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`emr_elect` (Huang et al. 2024, Alg. 1 lines 1-4) with the same float32 operations in the same order, into
    reused buffers: two float32 temporaries of the tensor's size instead of 2 + 2 n (the same bits, NaN included)."""
    total = task_vectors[0].clone()
    for tau in task_vectors[1:]:
        total += tau
    sign = torch.where(total > 0, 1.0, -1.0)
    largest, kept = total.zero_(), torch.empty_like(total)
    masks = []
    for tau in task_vectors:
        mask = torch.mul(tau, sign, out=kept).gt_(0).bool()
        masks.append(mask)
        torch.maximum(largest, torch.abs(tau, out=kept).mul_(mask), out=largest)
    return largest.mul_(sign), masks


def _emr_outputs(task_vectors: list[torch.Tensor], params: dict[str, Any],
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    unified, masks = emr_elect_inplace(task_vectors)
    scratch32 = torch.empty_like(unified)
    l1 = [float(torch.abs(tau, out=scratch32).double().sum()) for tau in task_vectors]  # tau.abs(), reused buffer
    magnitude = unified.abs().double()
    scratch = torch.empty_like(magnitude)  # (magnitude * m).sum(), each product into one reused float64 buffer
    masked = [float(torch.mul(magnitude, m, out=scratch).sum()) for m in masks]
    return {"task_vector": unified.to(dtype), **{f"mask.{t}": m for t, m in enumerate(masks)},
            "l1": torch.tensor(l1, dtype=torch.float64), "masked_l1": torch.tensor(masked, dtype=torch.float64),
            "numel": torch.tensor([float(unified.numel())], dtype=torch.float64)}


def _emr_kernel(inputs: Any, params: dict[str, Any]) -> Any:
    return kernels.elect(kernels.ELECT_EMR, inputs, lambda x, b: emr.fn(x, b, params, None))


@merge_method("emr", elementwise=True, fused=_emr_kernel,
              task_outputs=TaskOutputs(_emr_layout, _emr_outputs, rescale=True))
def emr(tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict[str, Any],
        rng: torch.Generator) -> torch.Tensor:
    """EMR-merging (Huang et al. 2024, Alg. 1): the unified model base + tau_uni; the per-task masks and the
    rescalers' sums are written beside it (see the module docstring)."""
    unified, _ = emr_elect([t - base for t in tensors])
    return base + unified
