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
constant task vector, or a tensor of one entry) normalises to 0 where the authors' code divides 0 by 0. Since
issue 24's speed work the elementwise steps are basin's own float32 code, the same bits in torch ops and in the
compiled kernel: exp and tanh from merging/methods/float_math.py (within 1 and 2.5 ulp; torch's are library code
a C kernel cannot reproduce), sums over the models in model order, clamps and maxima by comparisons (torch.maximum
returns either zero of +-0 depending on the loop), sgn(+-0) = +0, and ranks that order -0 below +0. The float32
results differ from the torch.exp / torch.tanh code's in their last bits (a few entries in a hundred, at most
3e-7 relative), so a merge's content hash may change (the 4 x 1 GB bf16 benchmark's did; merge_hashes.json's did
not). A task vector with a NaN or infinite entry is refused.

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

from merging import profiling
from merging.methods import kernels
from merging.methods.chunking import ChunkedInputs, TwoPhase, map_threads, scratch
from merging.methods.float_math import exp32, tanh32
from merging.methods.registry import merge_method
from merging.methods.sparsify import _sample_positions, kth_largest
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


def sequential_sum(rows: torch.Tensor) -> torch.Tensor:
    """The sum of the rows of a (models, entries) tensor in model order, ((r0 + r1) + r2) + ..., as the kernel adds."""
    total = rows[0].clone()
    for row in rows[1:]:
        total += row
    return total


def pcb_scores(rows: torch.Tensor, low: torch.Tensor, high: torch.Tensor, m_low: torch.Tensor,
               m_span: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PCB's scores beta (steps 1-4 before the drop) of task-vector rows (models, entries), and the clamped
    magnitudes: c = |tau| clamped to [low, high], beta = exp(n ((c - m_low) / m_span)^2) tanh(tau sum_j tau_j)
    (basin's float32 exp and tanh, merging/methods/float_math.py); the bounds are column vectors. The float32
    operations of _fused.c's `pcb_scores`, in its order."""
    a = rows.abs()
    clamped = torch.where(a < high, a, high)
    clamped = torch.where(clamped > low, clamped, low)
    u = (clamped - m_low) / m_span
    return exp32((u * u) * rows.shape[0]) * tanh32(rows * sequential_sum(rows)), clamped


def pcb_merge(rows: torch.Tensor, clamped: torch.Tensor, score: torch.Tensor, cut: torch.Tensor,
              s_span: torch.Tensor) -> torch.Tensor:
    """PCB's merged task vector (step 5 without lambda): the scores clamped from below at `cut` and min-max
    normalised (their min is then `cut`), the weighted mean of the signed clamped magnitudes. As _fused.c's
    `pcb_apply` (sums in model order; sgn(+-0) = +0)."""
    scale = (torch.where(score > cut, score, cut) - cut) / s_span
    sign = (rows > 0).to(rows.dtype) - (rows < 0).to(rows.dtype)
    return sequential_sum((sign * clamped) * scale) / sequential_sum(scale).clamp_(min=1e-12)


def _span(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """high - low, 1 where that is not positive (a constant row: min-max normalisation (x - min) / span)."""
    span = high - low
    return torch.where(span > 0, span, torch.ones_like(span))


def _larger(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(a > b, a, b)


def ordered_values(rows: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
    """Per row of a float32 (models, entries) tensor, the values at positions `indices` of its ascending order by
    `order_keys` (-0 below +0; NaN by its bits), exact, as column vectors: numpy's partition of the keys."""
    keys = order_keys(rows).cpu().numpy()
    found = np.partition(keys, indices, axis=1)[:, indices]
    return [key_value(torch.from_numpy(found[:, c:c + 1].copy())).to(rows.device) for c in range(len(indices))]


def pcb_ranks(d: int, ratio: float, clamp_ratio: float) -> tuple[list[int], int]:
    """The ascending ranks (0-based) of PCB's clamp bounds of |tau| and of its score cut, in rows of d entries."""
    return [int(d * clamp_ratio), max(0, int(d * (1 - clamp_ratio) - 1))], min(d - 1, int(d * (1 - ratio)))


def pcb_delta(rows: torch.Tensor, ratio: float, clamp_ratio: float) -> torch.Tensor:
    """PCB's merged task vector (without lambda), flat, from the task vectors as the rows of one float32 (models,
    entries) tensor: the whole-row reference of the streamed `Pcb` (the same bits); see the module docstring.

    The clamped magnitudes' min and max are the clamp bounds (clamping is monotone and the bounds are values of
    the row), the clamped scores' min is the cut, their max that of the scores and the cut."""
    d = rows.shape[1]
    magnitude_ranks, cut_rank = pcb_ranks(d, ratio, clamp_ratio)
    low, high = ordered_values(rows.abs(), magnitude_ranks)
    score, clamped = pcb_scores(rows, low, high, low, _span(low, _larger(high, low)))
    cut, top = ordered_values(score, [cut_rank, d - 1])
    return pcb_merge(rows, clamped, score, cut, _span(cut, _larger(top, cut)))


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


PCB_MAGNITUDES, PCB_SCORES = 0, 1  # pcb_tally's kinds, as in _fused.c
SAMPLE_SIGMAS = 5.0  # bracket half-width in standard deviations of the sample quantile's rank
Bracket = tuple[int, int, int | None]  # order keys: (lo, hi, a heavily tied key inside or None)


def candidate_cap(d: int) -> int:
    """The most keys a bracket of a row of d entries collects (about 1% do, for a 5-sigma bracket at the score
    cut); past it the bracket counts as missed (the radix passes run instead), so a wide bracket cannot grow memory
    beyond 4 bytes x d / 16 per model and rank."""
    return max(1 << 20, d // 16)


def sample_positions(d: int) -> torch.Tensor:
    """The sampled flat positions of a tensor of d entries: all of them up to 2^16 (the sample is then the
    tensor, so every bracket holds its rank), else `sparsify._sample_positions` (2^16, in runs of 16)."""
    return torch.arange(d) if d <= 1 << 16 else _sample_positions(d)


def brackets_for(sample_keys: np.ndarray, d: int, ranks: list[int]) -> list[list[Bracket]]:
    """Per row of the sample's order keys (rows, s), per ascending rank of the d entries, a key range [lo, hi]
    that likely holds it: the sample's keys `SAMPLE_SIGMAS` standard deviations either side of the rank's
    quantile (lo = 0 and hi = 2^32 - 1 where that runs past the sample's ends), and the key that fills at least a
    quarter of the sample inside, if one does (a heavy tie, counted instead of collected)."""
    size = sample_keys.shape[1]
    bounds = []
    for rank in ranks:
        q = rank / d
        spread = SAMPLE_SIGMAS * (q * (1 - q) * size) ** 0.5 + 2
        bounds.append((int(q * size - spread), int(q * size + spread) + 1))
    wanted = sorted({min(max(r, 0), size - 1) for pair in bounds for r in pair})
    out = []
    for row in sample_keys:
        ordered = np.partition(row, wanted)
        row_brackets = []
        for low, high in bounds:
            values, counts = np.unique(ordered[max(low, 0):min(high, size - 1) + 1], return_counts=True)
            top = int(np.argmax(counts))
            row_brackets.append((int(ordered[low]) if low > 0 else 0, int(ordered[high]) if high < size else 2**32 - 1,
                                 int(values[top]) if 4 * counts[top] >= counts.sum() else None))
        out.append(row_brackets)
    return out


def select_in_bracket(rank: int, bracket: Bracket, below: int, heavy_count: int, candidates: np.ndarray | None
                      ) -> int | None:
    """The key of ascending rank `rank` from a bracket's tally over the whole row (`below` keys under lo,
    `heavy_count` equal to its heavy key, the other keys in [lo, hi] as `candidates`), exact; None where the
    bracket missed the rank (or its candidates overflowed: None)."""
    if candidates is None or not below <= rank < below + candidates.size + heavy_count:
        return None
    r, heavy = rank - below, bracket[2]
    if heavy is not None:
        under = int(np.count_nonzero(candidates < heavy))
        if under <= r < under + heavy_count:
            return heavy
        if r >= under + heavy_count:
            r -= heavy_count
    return int(np.partition(candidates, r)[r])


def sample_keys(kind: int, sample: torch.Tensor, rows: tuple) -> np.ndarray:
    """The order keys (models, s) of the magnitudes or scores of a float32 (models, s) sample of task vectors, by
    the kernel's `pcb_tally` (a base of zeros, one bracket holding every key): the bits of the scan's keys, without
    torch's intra-op threads (which wait for a core on a loaded machine: 2 ms to 0.3 s for this)."""
    n, s = sample.shape
    sample = sample.contiguous()
    keys = np.empty((n, s), dtype=np.uint32)
    zeros = torch.zeros(s)
    kernels.compiled.pcb_tally(kind, s, (zeros.data_ptr(), 0), tuple((kernels.address(row), 0) for row in sample),
                               rows, float(n), tuple((0, 2**32 - 1, 0, False, row.ctypes.data) for row in keys))
    return keys


class _Tally:
    """One compiled tally pass of `Pcb` over the chunks (_fused.c `pcb_tally`), folded as the chunks come: per
    (model, rank) the count below its bracket, the count of its heavy key, the keys inside (dropped, and the
    bracket missed, past `cap`), per model the largest key, and the lowest model with a non-finite value."""

    def __init__(self, inputs: ChunkedInputs, kind: int, rows: tuple, brackets: list[list[Bracket]]):
        self.inputs, self.kind, self.rows, self.brackets = inputs, kind, rows, brackets
        m, per_row = len(brackets), len(brackets[0])
        self.flat = [b for row in brackets for b in row]
        self.below = [0] * len(self.flat)
        self.heavy = [0] * len(self.flat)
        self.kept: list[list[np.ndarray] | None] = [[] for _ in self.flat]
        self.sizes = [0] * len(self.flat)
        self.top = [0] * m
        self.bad = -1
        self.per_row = per_row
        self.cap = candidate_cap(inputs.numel)
        self.lock = threading.Lock()
        map_threads(self.visit, inputs.num_chunks, inputs.workers)

    def visit(self, chunk: int) -> None:
        inputs = self.inputs
        start, stop = inputs.span(chunk)
        buffers = scratch(len(self.flat), stop - start)
        args = tuple((lo, hi, 0 if heavy is None else heavy, heavy is not None, buffer.data_ptr())
                     for (lo, hi, heavy), buffer in zip(self.flat, buffers))
        models = tuple((kernels.address(t, start), kernels.DTYPE_CODES[t.dtype]) for t in inputs.tensors)
        tallies, tops, bad = kernels.compiled.pcb_tally(
            self.kind, stop - start, (kernels.address(inputs.base, start), kernels.DTYPE_CODES[inputs.base.dtype]),
            models, self.rows, float(len(models)), args)
        kept = [buffer.numpy().view(np.uint32)[:t[2]].copy() if t[2] else None for t, buffer in zip(tallies, buffers)]
        with self.lock:
            if bad >= 0 and (self.bad < 0 or bad < self.bad):
                self.bad = bad
            for i, top in enumerate(tops):
                self.top[i] = max(self.top[i], top)
            for c, (below, heavy, size) in enumerate(tallies):
                self.below[c] += below
                self.heavy[c] += heavy
                self.sizes[c] += size
                if self.kept[c] is not None and kept[c] is not None:
                    self.kept[c].append(kept[c])
                if self.sizes[c] > self.cap:
                    self.kept[c] = None

    def select(self, ranks: list[int]) -> list[list[int | None]]:
        """Per model, per rank, its key, or None where the bracket missed."""
        out = []
        for i in range(len(self.brackets)):
            row = []
            for w, rank in enumerate(ranks):
                c = i * self.per_row + w
                kept = self.kept[c]
                candidates = None if kept is None else (np.concatenate(kept) if kept else np.empty(0, np.uint32))
                row.append(select_in_bracket(rank, self.flat[c], self.below[c], self.heavy[c], candidates))
            out.append(row)
        return out


def _refuse_not_finite(model: int) -> None:
    raise BasinError(f"pcb: model {model}'s task vector has NaN or infinite entries, so its magnitudes cannot be "
                     "ranked")


def _column(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).unsqueeze(1)


class Pcb(TwoPhase):
    """PCB-merging (Du et al. 2024, eq. 1-6; see the module docstring), streamed over chunks with the bits of the
    whole-row `pcb_delta`.

    `prepare`: the order statistics, exact. With the compiled kernel (_fused.c, PCB section): the clamp bounds of
    |tau| from one tally pass against brackets chosen on a fixed sample (`sample_positions`, `brackets_for`:
    count below, count a heavy tie, collect the keys inside, select exactly, as TIES' `magnitude_cuts`), then the
    score cut and the scores' max likewise (the sample's scores computed in torch ops with the kernel's bits);
    where a bracket misses, that pass is redone by the radix selection of `streamed_ranks` (two passes of 16-bit
    histograms, exact for any input). Without the kernel, the radix selection alone. `apply`: the scores once
    more, clamped, normalised, and the weighted mean (`pcb_scores`, `pcb_merge`; through `pcb_apply` with the
    kernel). So a merge reads the inputs three times (two tallies and the merge), five on the radix path.
    Every elementwise step is basin's float32 code (float_math's exp and tanh, sums in model order, sgn(+-0) = +0,
    clamps by comparisons): torch and the kernel give the same bits, and zeros order -0 below +0 on both paths.
    A task vector with a NaN or infinite entry is refused (a one-line error naming the model)."""

    @staticmethod
    def _compiled(inputs: ChunkedInputs) -> bool:
        return (kernels.compiled is not None and hasattr(kernels.compiled, "pcb_tally") and inputs.base is not None
                and 1 <= len(inputs.tensors) <= 64 and inputs.numel > 0
                and kernels.readable(inputs.tensors + [inputs.base], inputs.numel))

    def prepare(self, inputs: ChunkedInputs, params: dict[str, Any], rng: torch.Generator) -> dict[str, Any]:
        d, n = inputs.numel, len(inputs.tensors)
        magnitude_ranks, cut_rank = pcb_ranks(d, float(params["pcb_ratio"]), float(params["clamp_ratio"]))
        compiled = self._compiled(inputs)
        sample = None
        if compiled:
            started = profiling.start()
            index = sample_positions(d)
            base = inputs.base.index_select(0, index).to(torch.float32)
            sample = torch.stack([t.index_select(0, index).to(torch.float32) - base for t in inputs.tensors])
            profiling.stop("sample", started)
        state: dict[str, Any] = {}
        bounds = self._ranked(inputs, PCB_MAGNITUDES, None, magnitude_ranks, sample, compiled)
        low, high = bounds[0], bounds[1]
        state.update(low=low, high=high, m_low=low, m_span=_span(low, _larger(high, low)))
        cut, top = self._ranked(inputs, PCB_SCORES, state, [cut_rank], sample, compiled)
        state.update(cut=cut, s_span=_span(cut, _larger(top, cut)))
        state["rows"] = tuple(tuple(float(state[k][i]) for k in ("low", "high", "m_low", "m_span", "cut", "s_span"))
                              for i in range(n))
        return state

    def _ranked(self, inputs: ChunkedInputs, kind: int, state: dict[str, Any] | None, ranks: list[int],
                sample: torch.Tensor | None, compiled: bool) -> list[torch.Tensor]:
        """The values of ascending ranks `ranks` per model of the magnitudes (PCB_MAGNITUDES) or of the scores
        (PCB_SCORES, given the clamp bounds in `state`), column vectors, and for the scores also their max."""
        n = len(inputs.tensors)
        if compiled:
            started = profiling.start()
            rows = tuple((0.0,) * 6 for _ in range(n))
            if kind == PCB_SCORES:
                rows = tuple(tuple(float(state[k][i]) for k in ("low", "high", "m_low", "m_span")) + (0.0, 1.0)
                             for i in range(n))
            brackets = brackets_for(sample_keys(kind, sample, rows), inputs.numel, ranks)
            profiling.stop("sample", started)
            started = profiling.start()
            tally = _Tally(inputs, kind, rows, brackets)
            profiling.stop("scan", started, inputs.nbytes)
            if tally.bad >= 0:
                _refuse_not_finite(tally.bad)
            started = profiling.start()
            found = tally.select(ranks)
            profiling.stop("select", started)
            if all(key is not None for row in found for key in row):
                keys = torch.tensor(found, dtype=torch.int64)
                out = [key_value(keys[:, w:w + 1].contiguous()) for w in range(len(ranks))]
                if kind == PCB_SCORES:
                    out.append(key_value(torch.tensor(tally.top, dtype=torch.int64).unsqueeze(1)))
                return out

        def keys_of(_: int, chunks: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
            rows = task_rows(chunks, base)
            if kind == PCB_SCORES:
                return order_keys(self.scores(rows, state))
            magnitude = rows.abs_()
            bad = (~torch.isfinite(magnitude.sum(1))).nonzero()
            if bad.numel():
                _refuse_not_finite(int(bad[0]))
            return order_keys(magnitude)

        values, _, highest = streamed_ranks(inputs, keys_of, ranks)
        out = [values[:, w:w + 1].contiguous() for w in range(len(ranks))]
        return out + [highest] if kind == PCB_SCORES else out

    @staticmethod
    def scores(rows: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """A chunk's unclamped scores beta (`pcb_scores`)."""
        return pcb_scores(rows, state["low"], state["high"], state["m_low"], state["m_span"])[0]

    def apply(self, chunks: list[torch.Tensor], base: torch.Tensor, params: dict[str, Any], state: dict[str, Any],
              chunk: int) -> torch.Tensor:
        rows = task_rows(chunks, base)
        score, clamped = pcb_scores(rows, state["low"], state["high"], state["m_low"], state["m_span"])
        return base + params["lambda"] * pcb_merge(rows, clamped, score, state["cut"], state["s_span"])

    def fused(self, inputs: ChunkedInputs, params: dict[str, Any], state: dict[str, Any]
              ) -> Callable[[int, torch.Tensor], torch.Tensor] | None:
        """`apply` as one pass of the compiled `pcb_apply` per chunk, reading the stored inputs (the same bits,
        tested); None where the kernel does not apply."""
        if not self._compiled(inputs):
            return None
        models = tuple((t, kernels.DTYPE_CODES[t.dtype]) for t in inputs.tensors)
        base, lam = inputs.base, float(params["lambda"])

        def kernel(chunk: int, out: torch.Tensor) -> torch.Tensor:
            start, stop = inputs.span(chunk)
            kernels.compiled.pcb_apply(out.data_ptr(), stop - start,
                                       (kernels.address(base, start), kernels.DTYPE_CODES[base.dtype]),
                                       tuple((kernels.address(t, start), code) for t, code in models),
                                       state["rows"], float(len(models)), lam)
            return out

        return kernel


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
