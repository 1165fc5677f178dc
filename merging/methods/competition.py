"""Merges that let task-vector entries compete: PCB-merging (Du et al. 2024) and MagMax (Marczak et al. 2024).

PCB (Parameter Competition Balancing, section 3, as the authors' `PCB_merge`): over the T task vectors of
one tensor, flattened to rows tau_i of d entries,
  1. outliers: |tau_i| clamped to its own values of ascending rank int(d c) and int(d (1 - c)) - 1
     (c = `clamp_ratio`), signs kept: tau'_i;
  2. intra-balancing: exp(T * minmax(|tau'_i|)^2), minmax the per-row (x - min) / (max - min);
  3. inter-balancing: tanh(tau_i * sum_j tau_j) (the unclamped task vectors, as the authors' code);
  4. score beta_i = intra * inter; drop: beta_i clamped from below at its value of ascending rank
     int(d (1 - r)) (r = `pcb_ratio`) and min-max normalised, so the entries under it weigh 0;
  5. theta = base + lambda * sum_i beta_i tau'_i / max(sum_i beta_i, 1e-12).
Where basin differs: the statistics (ranks, min, max) are per tensor, as the engine streams one tensor at a
time (the authors flatten the whole model into one row per task); a row whose max equals its min (a
constant task vector, or a tensor of one entry) normalises to 0 where the authors' code divides 0 by 0.

MagMax (section 3.2): per entry, the task-vector entry of largest magnitude, theta = base + lambda * tau_max;
on equal magnitudes the later model's entry wins (the authors' `merge_max_abs`, FusionBench's `magmax`).
Elementwise: large tensors stream in chunks like TIES (on the CPU through the compiled `elect_chunk`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from merging.methods import kernels
from merging.methods.registry import merge_method
from merging.methods.sparsify import kth_largest


def ranked_value(rows: torch.Tensor, index: int) -> torch.Tensor:
    """Per row, the value at position `index` of its ascending sort (a column vector), exact."""
    return ranked_values(rows, [index])[0]


def ranked_values(rows: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
    """`ranked_value` of each index: on the CPU by numpy's partition of the rows' order-preserving int32 keys (a
    copy per index, no sort; 5x torch.kthvalue on 11M entries), the value found being the only one of its bits
    (where it is not, a zero of either sign among both, or where a row holds NaN: `_ranked_by_torch`, the
    previous implementation)."""
    columns = [[] for _ in indices]
    for row in rows:
        found = _ranked_by_keys(row, indices)
        for c, index in enumerate(indices):
            value = found[c] if found is not None else None
            columns[c].append(_ranked_by_torch(row, index) if value is None else value)
    return [torch.stack(values).unsqueeze(1) for values in columns]


def _ranked_by_keys(row: torch.Tensor, indices: list[int]) -> list[torch.Tensor | None] | None:
    """The values at `indices` of the sorted float32 CPU row from a partition of int32 keys that order like the
    floats (the bits for non-negative floats, the low 31 bits flipped for negative ones); None where it does not
    apply (another dtype or device, NaN), a None value where a zero's sign is ambiguous."""
    if row.device.type != "cpu" or row.dtype != torch.float32 or not row.is_contiguous() or row.numel() == 0:
        return None
    x = row.numpy()
    if np.isnan(x).any():
        return None
    bits = x.view(np.int32)
    signed = bool(bits.min() < 0)  # a negative value or -0
    keys = bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF)) if signed else bits
    out: list[torch.Tensor | None] = []
    both_zeros = None
    for index in indices:  # one partition per index: numpy's vectorised select takes a single one
        key = np.int32(np.partition(keys, index)[index])
        value_bits = key ^ np.int32(0x7FFFFFFF) if key < 0 else key
        if signed and value_bits & 0x7FFFFFFF == 0:  # +-0: kthvalue's sign is whichever zero it meets
            if both_zeros is None:
                both_zeros = bool((bits == 0).any()) and bool((bits == np.int32(-2**31)).any())
            if both_zeros:
                out.append(None)
                continue
        out.append(torch.from_numpy(np.array([value_bits], dtype=np.int32).view(np.float32))[0])
    return out


def _ranked_by_torch(row: torch.Tensor, index: int) -> torch.Tensor:
    """One row's value at `index` of its ascending sort: where that value is positive, by the radix select of
    `sparsify.kth_largest` (on the row's positive part, which keeps the order of the entries at and above it),
    else by torch.kthvalue."""
    k = row.numel() - index  # the k-th largest
    if k <= int(torch.count_nonzero(row > 0)):
        return kth_largest(torch.where(row > 0, row, 0.0), k)  # +0 for -0 too (a sign bit)
    return torch.kthvalue(row, index + 1).values


PCB_BLOCK = 1 << 14  # columns per block of the elementwise steps: a few cache-sized temporaries per model


def pcb_delta(rows: torch.Tensor, ratio: float, clamp_ratio: float) -> torch.Tensor:
    """PCB's merged task vector (without lambda), flat, from the task vectors as the rows of one (models, entries)
    float tensor (consumed); see the module docstring.

    The order statistics and the min-max ranges are taken over whole rows; the elementwise steps between them
    run over blocks of columns (the same float32 operations per entry, and per column the same sums over the
    models, as over the whole rows: tested), the scores written over the magnitudes."""
    n, d = rows.shape
    magnitude = rows.abs()
    low, high = ranked_values(magnitude, [int(d * clamp_ratio), max(0, int(d * (1 - clamp_ratio) - 1))])
    torch.maximum(torch.minimum(magnitude, high, out=magnitude), low, out=magnitude)
    m_low, m_span = _row_range(magnitude)
    for c in _blocks(d):  # intra-balancing, then inter-balancing: the scores, over the magnitudes
        score = magnitude[:, c].sub_(m_low).div_(m_span).square_().mul_(n).exp_()
        score.mul_(torch.tanh(rows[:, c] * rows[:, c].sum(0)))
    score = magnitude
    torch.maximum(score, ranked_value(score, min(d - 1, int(d * (1 - ratio)))), out=score)
    s_low, s_span = _row_range(score)
    merged = torch.empty(d, dtype=rows.dtype, device=rows.device)
    for c in _blocks(d):
        scale = score[:, c].sub_(s_low).div_(s_span)
        clamped = torch.sign(rows[:, c]).mul_(torch.maximum(torch.minimum(rows[:, c].abs(), high), low))
        merged[c] = clamped.mul_(scale).sum(0).div_(scale.sum(0).clamp_(min=1e-12))
    return merged


def _row_range(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, (min, max - min) as column vectors, 1 for the span of a constant row: min-max normalisation is
    (x - min) / span."""
    low = rows.amin(dim=1, keepdim=True)
    span = rows.amax(dim=1, keepdim=True) - low
    return low, torch.where(span > 0, span, torch.ones_like(span))


def _blocks(d: int) -> list[slice]:
    return [slice(start, min(d, start + PCB_BLOCK)) for start in range(0, max(d, 1), PCB_BLOCK)]


@merge_method("pcb")
def pcb(tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict[str, Any],
        rng: torch.Generator) -> torch.Tensor:
    """PCB-merging (Du et al. 2024, eq. 1-6); see the module docstring."""
    rows = torch.empty(len(tensors), base.numel(), dtype=base.dtype, device=base.device)
    for i, t in enumerate(tensors):  # the task vectors, straight into their rows
        torch.sub(t.reshape(-1), base.reshape(-1), out=rows[i])
    delta = pcb_delta(rows, params["pcb_ratio"], params["clamp_ratio"]).view(base.shape)
    return base + params["lambda"] * delta


def _magmax_kernel(inputs: Any, params: dict[str, Any]) -> Any:
    return kernels.elect(kernels.ELECT_MAGMAX, inputs, lambda x, b: magmax.fn(x, b, params, None), params["lambda"])


@merge_method("magmax", elementwise=True, fused=_magmax_kernel)
def magmax(tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict[str, Any],
           rng: torch.Generator) -> torch.Tensor:
    """MagMax (Marczak et al. 2024, eq. 2): the largest-magnitude task-vector entry; see the module docstring."""
    best = tensors[0] - base
    for t in tensors[1:]:
        tau = t - base
        best = torch.where(tau.abs() >= best.abs(), tau, best)
    return base + params["lambda"] * best
