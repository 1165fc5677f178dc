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

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from merging.methods import kernels
from merging.methods.chunking import ChunkedInputs, TwoPhase
from merging.methods.registry import merge_method
from merging.methods.sparsify import kth_largest
from taxonomy.errors import BasinError


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


RADIX = 1 << 16  # buckets per level of the streamed selection: two levels of 16 bits select a float32 exactly


def order_keys(x: torch.Tensor) -> torch.Tensor:
    """Int64 keys in [0, 2^32) that order like the float32 values of `x` (-0 just below +0): the bits of a
    non-negative float plus 2^31, those of a negative one with the low 31 bits flipped, plus 2^31."""
    bits = x.view(torch.int32)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64) + (1 << 31)


def key_value(key: torch.Tensor) -> torch.Tensor:
    """The float32 values of `order_keys` keys (inverse)."""
    bits = (key - (1 << 31)).to(torch.int32)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).view(torch.float32)


def bucket_of_rank(counts: torch.Tensor, rank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of the histograms `counts` (rows, RADIX), the bucket holding the entry of ascending rank `rank`
    (0-based, int64 per row) and that entry's rank inside its bucket."""
    cum = counts.cumsum(1)
    bucket = torch.searchsorted(cum, rank.unsqueeze(1), right=True).squeeze(1)
    before = torch.where(bucket > 0, cum.gather(1, (bucket - 1).clamp(min=0).unsqueeze(1)).squeeze(1), 0)
    return bucket, rank - before


def high_histograms(keys: torch.Tensor) -> torch.Tensor:
    """(rows, RADIX) counts of each row's keys by their top 16 bits."""
    n = keys.shape[0]
    offsets = torch.arange(n, dtype=torch.int64).unsqueeze(1) * RADIX
    return torch.bincount(((keys >> 16) + offsets).view(-1), minlength=n * RADIX).view(n, RADIX)


def low_histograms(keys: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
    """(rows, wanted, RADIX) counts by their low 16 bits of each row's keys whose top 16 bits are `buckets`
    (rows, wanted)."""
    n, wanted = buckets.shape
    high = keys >> 16
    slots = []
    for w in range(wanted):
        inside = high == buckets[:, w:w + 1]
        slot = (torch.arange(n, dtype=torch.int64).unsqueeze(1) * wanted + w) * RADIX + (keys & (RADIX - 1))
        slots.append(slot[inside])
    return torch.bincount(torch.cat(slots), minlength=n * wanted * RADIX).view(n, wanted, RADIX)


def streamed_ranks(inputs: ChunkedInputs, keys_of: Callable[..., torch.Tensor], ranks: list[int]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact order statistics of rows streamed in chunks (radix selection, two passes of 16 bits):
    `keys_of(chunk_index, chunks, base)` gives a chunk's (rows, entries) `order_keys`; returns the float32
    values of ascending ranks `ranks` per row, (rows, len(ranks)), and each row's min and max (column
    vectors, from the first pass; -0 below +0)."""

    def first(i: int, c: list[torch.Tensor], b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        keys = keys_of(i, c, b)
        return high_histograms(keys), keys.amin(1, keepdim=True), keys.amax(1, keepdim=True)

    counts, lowest, highest = _folded(inputs, first, (torch.add, torch.minimum, torch.maximum))
    n = counts.shape[0]
    found = [bucket_of_rank(counts, torch.full((n,), r, dtype=torch.int64)) for r in ranks]
    buckets = torch.stack([f[0] for f in found], 1)
    inner = torch.stack([f[1] for f in found], 1)
    low_counts, = _folded(inputs, lambda i, c, b: (low_histograms(keys_of(i, c, b), buckets),), (torch.add,))
    lows = [bucket_of_rank(low_counts[:, w].contiguous(), inner[:, w].contiguous())[0] for w in range(len(ranks))]
    return key_value((buckets << 16) | torch.stack(lows, 1)), key_value(lowest), key_value(highest)


def _folded(inputs: ChunkedInputs, fn: Callable[..., tuple], folds: tuple[Callable[..., torch.Tensor], ...]
            ) -> list[torch.Tensor]:
    """fn(chunk_index, chunks, base)'s tensors folded over the chunks as they come (`folds`: associative and
    commutative, exact: integer sums, min, max), so memory holds one result, not one per chunk."""
    lock = threading.Lock()
    total: list[torch.Tensor] = []

    def visit(i: int, c: list[torch.Tensor], b: torch.Tensor) -> None:
        parts = fn(i, c, b)
        with lock:
            if not total:
                total.extend(parts)
            else:
                for t, part, fold in zip(total, parts, folds):
                    fold(t, part, out=t)

    inputs.map(visit)
    return total


def task_rows(chunks: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """A chunk's task vectors as the rows of one (models, entries) float32 tensor."""
    rows = torch.empty(len(chunks), base.numel(), dtype=torch.float32)
    for i, t in enumerate(chunks):
        torch.sub(t, base, out=rows[i])
    return rows


class Pcb(TwoPhase):
    """PCB-merging (Du et al. 2024, eq. 1-6; see the module docstring), streamed over chunks with the bits of
    `pcb_delta` over whole rows.

    `prepare` (four passes): the clamp bounds by radix selection over the chunks (`streamed_ranks` on |tau|, with
    its per-row min and max, which clamping maps to those of the clamped magnitudes), then the score's rank value,
    min and max by the same selection on the scores recomputed per chunk. `apply`: the scores once more, clamped and
    normalised, and the weighted mean. Within a chunk the elementwise steps run over `PCB_BLOCK` columns as
    `pcb_delta` does (chunks start at multiples of it, so every block is the same as there).
    Known difference: where the score's rank value is a zero and the row holds zeros of both signs, the sign
    of that zero (and of the score range's ends) is -0 below +0 here, whichever zero torch met there; and a
    NaN task-vector entry is refused (a one-line error naming the model), where torch.kthvalue ranked it."""

    def prepare(self, inputs: ChunkedInputs, params: dict[str, Any], rng: torch.Generator) -> dict[str, Any]:
        d, clamp_ratio, ratio = inputs.numel, float(params["clamp_ratio"]), float(params["pcb_ratio"])
        state: dict[str, Any] = {"n": len(inputs.tensors)}

        def magnitude_keys(_: int, chunks: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
            magnitude = task_rows(chunks, base).abs_()
            nan_rows = torch.isnan(magnitude.sum(1)).nonzero()
            if nan_rows.numel():  # NaN has no rank: refuse, as TIES does
                raise BasinError(f"pcb: model {int(nan_rows[0])}'s task vector has NaN entries, so its magnitudes "
                                 "cannot be ranked")
            return order_keys(magnitude)

        bounds, lo, hi = streamed_ranks(inputs, magnitude_keys,
                                        [int(d * clamp_ratio), max(0, int(d * (1 - clamp_ratio) - 1))])
        low, high = bounds[:, 0:1].contiguous(), bounds[:, 1:2].contiguous()
        state["low"], state["high"] = low, high
        m_low = torch.maximum(torch.minimum(lo, high), low)  # clamping is monotone: the range's ends map to the ends
        m_high = torch.maximum(torch.minimum(hi, high), low)
        state["m_low"], state["m_span"] = _low_span(m_low, m_high)

        def score_keys(i: int, chunks: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
            return order_keys(self.scores(task_rows(chunks, base), state))

        cut, lo, hi = streamed_ranks(inputs, score_keys, [min(d - 1, int(d * (1 - ratio)))])
        state["cut"] = cut
        state["s_low"], state["s_span"] = _low_span(torch.maximum(lo, cut), torch.maximum(hi, cut))
        return state

    @staticmethod
    def scores(rows: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """A chunk's unclamped scores beta (intra * inter balancing), as `pcb_delta` computes them block by block."""
        magnitude = rows.abs()
        torch.maximum(torch.minimum(magnitude, state["high"], out=magnitude), state["low"], out=magnitude)
        for c in _blocks(rows.shape[1]):
            score = magnitude[:, c].sub_(state["m_low"]).div_(state["m_span"]).square_().mul_(state["n"]).exp_()
            score.mul_(torch.tanh(rows[:, c] * rows[:, c].sum(0)))
        return magnitude

    def apply(self, chunks: list[torch.Tensor], base: torch.Tensor, params: dict[str, Any], state: dict[str, Any],
              chunk: int) -> torch.Tensor:
        rows = task_rows(chunks, base)
        score = self.scores(rows, state)
        torch.maximum(score, state["cut"], out=score)
        low, high = state["low"], state["high"]
        merged = torch.empty(rows.shape[1], dtype=torch.float32)
        for c in _blocks(rows.shape[1]):
            scale = score[:, c].sub_(state["s_low"]).div_(state["s_span"])
            clamped = torch.sign(rows[:, c]).mul_(torch.maximum(torch.minimum(rows[:, c].abs(), high), low))
            merged[c] = clamped.mul_(scale).sum(0).div_(scale.sum(0).clamp_(min=1e-12))
        return base + params["lambda"] * merged


def _low_span(low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`_row_range` from a row's min and max."""
    span = high - low
    return low, torch.where(span > 0, span, torch.ones_like(span))


pcb = merge_method("pcb")(Pcb())


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
