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

Both methods' side outputs stream chunk by chunk (`SideStream`, on the CPU one compiled `side_chunk` pass per chunk
reading the stored inputs once), with the same bits as the whole-tensor functions `_tall_outputs` and
`_emr_outputs` kept as their reference. EMR's float64 sums have one order, independent of chunk size and threads
(`ordered_sum`): per block of SUM_BLOCK entries of the flat tensor numpy's float64 sum of the float32 summands,
the blocks' sums added in block order (a NaN sum stored as float("nan")). Before, torch summed each whole tensor,
an order chunks cannot replay: the stored l1 / masked_l1, and so the rescalers, changed in their last bits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from merging.methods import kernels
from merging.methods.chunking import CHUNK_ELEMENTS, scratch
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


def _tall_stream(tensors: list[torch.Tensor], base: torch.Tensor, params: dict[str, Any],
                 dtype: torch.dtype) -> SideStream:
    return SideStream(SIDE_TALL, tensors, base, dtype, params["tall_lambda"])


@merge_method("tall_masks", elementwise=True,
              task_outputs=TaskOutputs(_mask_layout, _tall_outputs, stream=_tall_stream))
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


SUM_BLOCK = CHUNK_ELEMENTS  # entries per block of EMR's float64 sums (ordered_sum)


def block_sum(values: torch.Tensor) -> float:
    """numpy's float64 sum of one block's float32 values: per 8192-entry buffer (np.getbufsize()) a pairwise sum,
    the buffers' sums added left to right (replayed by `side_chunk` in merging/methods/_fused.c)."""
    return float(values.cpu().numpy().sum(dtype=np.float64))


def fold_blocks(sums: Iterable[float]) -> float:
    """Block sums added left to right from 0.0 (float64); a NaN total as float("nan")."""
    total = 0.0
    for s in sums:
        total += s
    return math.nan if math.isnan(total) else total


def ordered_sum(values: torch.Tensor) -> float:
    """The float64 sum of float32 `values` in EMR's fixed order, independent of chunk size and threads: per block of
    SUM_BLOCK entries of the flat tensor `block_sum`, the blocks' sums added in block order (`fold_blocks`). Within
    a few ulps of any other float64 order (torch's whole-tensor sum, which chunks cannot replay, rounds otherwise)."""
    flat = values.reshape(-1)
    return fold_blocks(block_sum(flat[s:s + SUM_BLOCK]) for s in range(0, flat.numel(), SUM_BLOCK))


def _emr_sums(task_vectors: list[torch.Tensor], unified: torch.Tensor, masks: list[torch.Tensor],
              summed: Callable[[torch.Tensor], float]) -> list[float]:
    """[sum |tau_t| for each t] + [sum |tau_uni| M_t for each t], float32 summands (exact: M_t is 0 or 1) summed by
    `summed` in float64."""
    magnitude = unified.abs()
    return [summed(tau.abs()) for tau in task_vectors] + [summed(magnitude * m) for m in masks]


def _emr_totals(l1: list[float], masked: list[float], numel: int) -> dict[str, torch.Tensor]:
    return {"l1": torch.tensor(l1, dtype=torch.float64), "masked_l1": torch.tensor(masked, dtype=torch.float64),
            "numel": torch.tensor([float(numel)], dtype=torch.float64)}


def _emr_outputs(task_vectors: list[torch.Tensor], params: dict[str, Any],
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """EMR's side outputs of one whole tensor: the reference of the streamed `SideStream` (same bits)."""
    unified, masks = emr_elect_inplace(task_vectors)
    sums = _emr_sums(task_vectors, unified, masks, ordered_sum)
    n = len(task_vectors)
    return {"task_vector": unified.to(dtype), **{f"mask.{t}": m for t, m in enumerate(masks)},
            **_emr_totals(sums[:n], sums[n:], unified.numel())}


SIDE_TALL, SIDE_EMR = 0, 1  # side_chunk's kinds, as in _fused.c


class SideStream:
    """One tensor's side outputs (TALL masks or EMR), chunk by chunk: `chunk(start, stop, task_vector, masks)` fills
    entries [start, stop) (one sum block: start a multiple of `block`, stop the block's end or the tensor's) of the
    task vector (in the output dtype) and of every task's bool mask, and returns that block's EMR sums (l1 of each
    task, then masked_l1 of each; none for TALL masks); `finish(block sums in block order, numel)` gives the
    per-tensor statistics (EMR: l1, masked_l1, numel; TALL masks: none). Where the kernel reads the inputs (CPU,
    float32 or bf16), one compiled pass per chunk; chunks holding a non-finite value, and everything without the
    kernel, run `tall_masks` / `emr_elect_inplace` on float32 copies of the chunk (torch's NaN bits)."""

    block = SUM_BLOCK

    def __init__(self, kind: int, tensors: list[torch.Tensor], base: torch.Tensor, dtype: torch.dtype,
                 tall_lambda: float = 0.0):
        self.kind, self.tensors, self.base, self.dtype, self.tall_lambda = kind, tensors, base, dtype, tall_lambda
        self.sums = kind == SIDE_EMR
        self.compiled = kernels.compiled is not None and hasattr(kernels.compiled, "side_chunk") \
            and 1 <= len(tensors) <= 64 and kernels.readable(tensors + [base], base.numel())
        self.work = len(tensors) * (256 + (2 * 8192 if self.sums else 0))  # side_chunk's float32 work space

    def chunk(self, start: int, stop: int, task_vector: torch.Tensor, masks: list[torch.Tensor]) -> tuple[float, ...]:
        if self.compiled:
            direct = self.dtype in kernels.DTYPE_CODES
            buffers = scratch(2, max(self.work, stop - start))
            out = task_vector if direct else buffers[1][:stop - start]
            got = kernels.compiled.side_chunk(
                self.kind, stop - start, (kernels.address(self.base, start), kernels.DTYPE_CODES[self.base.dtype]),
                tuple((kernels.address(t, start), kernels.DTYPE_CODES[t.dtype]) for t in self.tensors),
                float(self.tall_lambda), out.data_ptr(), kernels.DTYPE_CODES[out.dtype],
                tuple(m.data_ptr() for m in masks), buffers[0].data_ptr(), self.sums)
            if got is not False:
                if not direct:
                    task_vector.copy_(out)
                return got
        b = self.base[start:stop].to("cpu", torch.float32)
        taus = [t[start:stop].to("cpu", torch.float32) - b for t in self.tensors]
        if self.kind == SIDE_TALL:
            vector, ms = tall_masks(taus, self.tall_lambda)
        else:
            vector, ms = emr_elect_inplace(taus)
        task_vector.copy_(vector)
        for out_mask, m in zip(masks, ms):
            out_mask.copy_(m)
        return tuple(_emr_sums(taus, vector, ms, block_sum)) if self.sums else ()

    def finish(self, block_sums: list[tuple[float, ...]], numel: int) -> dict[str, torch.Tensor]:
        if not self.sums:
            return {}
        n = len(self.tensors)
        totals = [fold_blocks(s[i] for s in block_sums) for i in range(2 * n)]
        return _emr_totals(totals[:n], totals[n:], numel)


def _emr_stream(tensors: list[torch.Tensor], base: torch.Tensor, params: dict[str, Any],
                dtype: torch.dtype) -> SideStream:
    return SideStream(SIDE_EMR, tensors, base, dtype)


def _emr_kernel(inputs: Any, params: dict[str, Any]) -> Any:
    return kernels.elect(kernels.ELECT_EMR, inputs, lambda x, b: emr.fn(x, b, params, None))


@merge_method("emr", elementwise=True, fused=_emr_kernel,
              task_outputs=TaskOutputs(_emr_layout, _emr_outputs, rescale=True, stream=_emr_stream))
def emr(tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict[str, Any],
        rng: torch.Generator) -> torch.Tensor:
    """EMR-merging (Huang et al. 2024, Alg. 1): the unified model base + tau_uni; the per-task masks and the
    rescalers' sums are written beside it (see the module docstring)."""
    unified, _ = emr_elect([t - base for t in tensors])
    return base + unified
