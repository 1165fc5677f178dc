"""Sparsifying task vectors and electing signs: the building blocks of TIES, DARE, Breadcrumbs, DELLA.

- `topk_mask`: the exactly-k largest magnitudes (TIES trim, Yadav et al. 2023, step 1), by a radix
  select on float32 bit patterns (one histogram pass, then an exact k-th value inside one bucket)
  instead of the full sort mergekit uses; ties at the threshold keep the lowest flat indices.
- `magnitude_band_mask`: drop the `n_top` largest and the smallest, keep `n_keep` (Breadcrumbs,
  Davari and Belilovsky 2024).
- `random_mask`: keep each entry with probability p (DARE, Yu et al. 2024, eq. 1-2).
- `rank_keep_probability`: DELLA's MagPrune probabilities (Deep et al. 2024, section 3), magnitude
  ranks per row mapped linearly onto [density - epsilon, density + epsilon].
- `mask_and_rescale_`: mergekit's rescale (match the L1 norm) or the papers' (divide by keep probability).
- `sign_consensus_disjoint_sum_`: TIES steps 2-3 (elect, disjoint merge) over weighted task vectors.
- `magnitude_cuts` / `MagnitudeCut`: the same exact top-k as `topk_mask`, found in one pass over the
  chunks of a tensor (a sampled bracket around the k-th largest, then an exact selection among the
  entries inside it, as in Floyd and Rivest's SELECT) and applied chunk by chunk, so TIES and
  Breadcrumbs stream like elementwise methods (on the CPU the scan runs in the compiled kernel where
  built); `random_masks`: DARE's Bernoulli masks from the counter-based Philox generator keyed by
  (tensor key, model, entry), independent of thread count, chunk order, chunk size and device;
  `magprune_masks`: DELLA's, from the same uniforms below each entry's rank keep probability, drawn per range of
  rows (compiled `della_chunk` where built).
Functions ending in _ modify their first argument in place (the callers own those task vectors: in
place saves the allocation of a fresh tensor per step, the costly part on CPU); the rest are pure.
Randomness only through the generator passed in (drawn on CPU).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from merging import profiling
from merging.methods import kernels, philox
from merging.methods.chunking import CHUNK_ELEMENTS, ChunkedInputs, map_threads, scratch
from taxonomy.errors import BasinError

_RADIX_MIN = 1 << 16  # below this size torch.kthvalue is as fast as anything


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest (1-based) of a flat non-negative float tensor, exact.

    For float32 >= 0 the int32 bit pattern orders like the value, so a histogram of the top 16
    bits finds the bucket holding the k-th largest; torch.kthvalue then runs on that bucket only.
    """
    n = values.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} outside [1, {n}]")
    if n < _RADIX_MIN or values.dtype != torch.float32:
        return torch.kthvalue(values, n - k + 1).values
    high = values.view(torch.int32) >> 16
    counts = torch.bincount(high, minlength=1 << 15)
    at_or_above = counts.flip(0).cumsum(0).flip(0)  # at_or_above[b] = number of entries in buckets >= b
    bucket = int(torch.nonzero(at_or_above >= k)[-1])
    above = int(at_or_above[bucket + 1]) if bucket + 1 < at_or_above.numel() else 0
    candidates = values[high == bucket]
    rank = k - above  # the rank-th largest inside the bucket
    return torch.kthvalue(candidates, candidates.numel() - rank + 1).values


def topk_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly the `k` largest entries; ties at the threshold keep the lowest flat indices.

    The tie rule makes masks nested (topk_mask(m, k1) contains topk_mask(m, k2) for k1 >= k2).
    """
    flat = magnitude.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(magnitude, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(magnitude, dtype=torch.bool)
    threshold = kth_largest(flat, k)
    mask = flat >= threshold
    extra = int(torch.count_nonzero(mask)) - k
    if extra > 0:  # more entries equal to the threshold than needed: drop the highest-index ones
        tied = torch.nonzero(flat == threshold).squeeze(1)
        mask[tied[tied.numel() - extra:]] = False
    return mask.view(magnitude.shape)


def magnitude_band_mask(magnitude: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs mask: drop the int(gamma n) largest, then the smallest, keeping int(density n).

    As mergekit: when density + gamma > 1 the number of removed outliers shrinks to hit the density.
    Unlike mergekit (whose slice `[n_bot:-n_top]` keeps nothing when n_top == 0), n_top = 0 removes
    no outliers.
    """
    n = magnitude.numel()
    n_keep = int(density * n)
    n_top = min(int(gamma * n), n - n_keep)
    return topk_mask(magnitude, n_keep + n_top) & ~topk_mask(magnitude, n_top)


def random_mask(shape: torch.Size, keep: float | torch.Tensor, rng: torch.Generator,
                device: torch.device) -> torch.Tensor:
    """Bernoulli(keep) mask drawn on CPU from `rng` (uniform < keep), moved to `device`."""
    u = torch.rand(shape, generator=rng, dtype=torch.float32).to(device)
    return u < keep


def check_della(density: float, epsilon: float) -> None:
    """DELLA's keep probabilities must lie in (0, 1)."""
    if not (0 < density - epsilon and density + epsilon < 1):
        raise BasinError(f"della: density +- epsilon must lie in (0, 1); got density={density}, epsilon={epsilon}")


def row_width(shape: tuple[int, ...]) -> int:
    """The rows `rank_keep_probability` ranks in: the last axis of a 2-D tensor, the whole of a 0-D or 1-D one,
    (shape[0], -1) above."""
    numel = math.prod(shape)
    return numel if len(shape) < 2 or numel == 0 else numel // shape[0]


def rank_keep_probability(magnitude: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA MagPrune: keep probability density - epsilon + 2 epsilon * rank / (n - 1), per row.

    Ranks are ascending magnitudes within each row (the last axis of a 2-D tensor; 1-D tensors are
    one row; higher-rank tensors are viewed as (shape[0], -1)), ties ordered by index (stable
    sort). A row of one entry gets the midpoint, density.
    """
    check_della(density, epsilon)
    if magnitude.numel() == 0:
        return torch.empty_like(magnitude)
    rows = magnitude.reshape(1, -1) if magnitude.dim() < 2 else magnitude.reshape(magnitude.shape[0], -1)
    width = rows.shape[1]
    if width <= 1:
        return ((density - epsilon) + 2 * epsilon * torch.full_like(rows, 0.5)).reshape(magnitude.shape)
    ranks = stable_row_ranks(rows)  # in place below: the same float32 operations as out of place
    return ranks.div_(width - 1).mul_(2 * epsilon).add_(density - epsilon).reshape(magnitude.shape)


def stable_row_ranks(rows: torch.Tensor) -> torch.Tensor:
    """Per row of a 2-D float tensor, each entry's position in the row's stable ascending sort (torch.sort's order:
    -0 equals +0, NaN last), as floats of the rows' dtype. On the CPU by the compiled radix sort (the same ranks,
    tested), else by a sort and a scatter."""
    width = rows.shape[1]
    if (kernels.compiled is not None and hasattr(kernels.compiled, "row_ranks") and rows.device.type == "cpu"
            and rows.dtype == torch.float32 and rows.is_contiguous() and width < 1 << 24 and rows.numel() > 0):
        ranks = torch.empty_like(rows)
        kernels.compiled.row_ranks(rows.data_ptr(), rows.shape[0], width, ranks.data_ptr())
        return ranks
    order = torch.sort(rows, dim=1, stable=True).indices
    ranks = torch.empty_like(rows)
    positions = torch.arange(width, dtype=rows.dtype, device=rows.device).expand_as(rows)
    return ranks.scatter_(1, order, positions)


def mask_and_rescale_(delta: torch.Tensor, mask: torch.Tensor, rescale: bool | str,
                      keep_probability: float | torch.Tensor, magnitude: torch.Tensor | None = None,
                      eps: float = 1e-7) -> torch.Tensor:
    """In place: zero `delta` outside `mask`, then rescale: True = match the L1 norm `delta` had (mergekit),
    'unbiased' = divide by the keep probability (DARE eq. 2, DELLA), False = none.

    `magnitude` (|delta|, if the caller has it) is consumed as scratch space.
    """
    factor = 1.0
    if rescale is True:
        magnitude = delta.abs() if magnitude is None else magnitude
        before = sum64(magnitude)
        factor = l1_rescale_factor(before, sum64(mul_mask_(magnitude, mask)), eps)
    mul_mask_(delta, mask)
    if rescale == "unbiased":
        delta.div_(keep_probability)
    elif factor != 1.0:
        delta.mul_(factor)
    return delta


def mul_mask_(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x *= mask (bool) in place: x where the mask holds, a signed zero elsewhere. On CPU through numpy,
    whose bool-to-float multiply is 3x faster than torch's in-place one (15x the out-of-place one)."""
    if x.device.type == "cpu" and mask.device.type == "cpu" and x.is_contiguous() and mask.is_contiguous() \
            and x.dtype == torch.float32 and mask.shape == x.shape:
        np.multiply(x.numpy(), mask.numpy(), out=x.numpy())
        return x
    return x.mul_(mask)


def l1_rescale_factor(before: float, after: float, eps: float = 1e-7) -> float:
    """mergekit's rescale: the L1 norm before the drop over the norm after (1 when either is < eps)."""
    return before / after if before >= eps and after >= eps else 1.0


def sign_consensus_disjoint_sum_(weighted: list[torch.Tensor], weights: list[float],
                                 normalize: bool) -> torch.Tensor:
    """TIES elect + disjoint merge over weighted task vectors w_i tau_i (consumed: modified in place).

    Elected sign per entry: the sign of sum_i w_i tau_i (zero counts as +, as mergekit); an entry
    agrees when w_i tau_i has the elected sign (zero entries never agree). Returns the sum of the
    agreeing entries, divided with `normalize` by the sum of the agreeing models' weights (1 where none
    agree). With e = +-1 the elected sign, relu(e w_i tau_i) is |w_i tau_i| where model i agrees and 0
    elsewhere, so the sum of agreeing entries is e * sum_i relu(e w_i tau_i) (negation is exact).
    """
    elected = weighted[0].clone()
    for wd in weighted[1:]:
        elected.add_(wd)
    # copysign(1, s), in place: +1 for s >= +0; -1 for s = -0, which only arises when every w_i tau_i is a
    # zero, so no model agrees under either convention
    torch.copysign(torch.ones((), dtype=elected.dtype, device=elected.device).expand_as(elected), elected,
                   out=elected)
    mixed, divisor, indicator = None, None, None
    for w, wd in zip(weights, weighted):
        agreeing = wd.mul_(elected).relu_()
        if normalize:
            if divisor is None:
                divisor = torch.sign(agreeing).mul_(w)
            else:  # one scratch indicator for the other models
                indicator = torch.sign(agreeing, out=indicator)
                divisor.add_(indicator, alpha=w)
        mixed = agreeing if mixed is None else mixed.add_(agreeing)
    mixed.mul_(elected)
    if normalize:
        if min(weights) > 0:  # a divisor is 0 only where no model agrees (and mixed is 0), else >= min weight
            divisor.clamp_(min=min(weights))
        else:
            divisor.masked_fill_(divisor == 0, 1.0)
        mixed.div_(divisor)
    return mixed


def sum64(x: torch.Tensor) -> float:
    """Sum in float64, independent of torch's thread count (numpy's pairwise sum on CPU)."""
    if x.device.type != "cpu":
        return float(x.sum(dtype=torch.float64))
    return float(x.numpy().sum(dtype=np.float64))


def _below(value: float) -> float:
    """The largest float32 strictly below `value`."""
    v = torch.tensor(value, dtype=torch.float32)
    return float(torch.nextafter(v, torch.tensor(float("-inf"))))


KEEP_ALL, KEEP_ABOVE, KEEP_PARTIAL_TIES, KEEP_MASK, KEEP_BAND = 0, 1, 2, 3, 4  # the cut rules, as in _fused.c


@dataclass(frozen=True)
class MagnitudeCut:
    """The `k` largest of `numel` magnitudes as a rule applied chunk by chunk: entries above `threshold`
    are kept, and of the `ties_total` entries equal to it the first `ties_kept` in flat order (the rule of
    `topk_mask`). `ties_before[c]` counts the ties in chunks before chunk c (only when some, not all,
    ties are kept)."""

    k: int
    numel: int
    threshold: float = 0.0
    ties_kept: int = 0
    ties_total: int = 0
    ties_before: tuple[int, ...] | None = None

    def rule(self, chunk: int) -> tuple[int, float, int]:
        """How chunk `chunk` is cut: (KEEP_ALL, 0, 0); (KEEP_ABOVE, cut, 0): magnitudes <= cut are zeroed;
        (KEEP_PARTIAL_TIES, threshold, n): those above the threshold and the first n equal to it are kept."""
        if self.k <= 0:
            return KEEP_ABOVE, math.inf, 0
        if self.k >= self.numel:
            return KEEP_ALL, 0.0, 0
        if self.ties_before is None:  # all ties kept, or none
            keep_ties = self.ties_kept > 0
        else:
            allowed = self.ties_kept - self.ties_before[chunk]
            keep_ties = allowed >= self.ties_before[chunk + 1] - self.ties_before[chunk]
            if 0 < allowed and not keep_ties:
                return KEEP_PARTIAL_TIES, self.threshold, allowed
        return KEEP_ABOVE, self.below_threshold if keep_ties else self.threshold, 0

    def keep_(self, magnitude: torch.Tensor, chunk: int) -> torch.Tensor:
        """`magnitude` (chunk `chunk`) zeroed in place where not kept; returns it."""
        keep, cut, allowed = self.rule(chunk)
        if keep == KEEP_ALL:
            return magnitude
        if keep == KEEP_PARTIAL_TIES:
            tied = magnitude == cut
            return mul_mask_(magnitude, (magnitude > cut) | (tied & (tied.cumsum(0) <= allowed)))
        return torch.nn.functional.threshold(magnitude, cut, 0.0, inplace=True)

    @functools.cached_property
    def below_threshold(self) -> float:
        """The largest float32 below `threshold`: `x > below_threshold` is `x >= threshold`."""
        return _below(self.threshold)


Bracket = tuple[float, float, float | None]  # (lo, hi, a heavily tied value inside, or None)


def _split_at_bracket(a: torch.Tensor, bracket: Bracket, sums: bool) -> tuple[int, torch.Tensor, int, float]:
    """Tally one flat float32 chunk of magnitudes against `bracket` = (lo, hi, heavy): (number of entries
    > hi, the entries in [lo, hi] other than `heavy`, the number equal to `heavy`, sum of the entries > hi
    if `sums` else 0). Counting the heavy value instead of collecting it matters for bf16 checkpoints, whose
    task vectors take few distinct values: the k-th largest is often shared by 5-10% of all entries.
    On CPU through numpy, whose comparisons, counts and boolean selection run 4-5x faster than torch's on
    cache-sized chunks (the bounds are float32 values, so both compare exactly the same way)."""
    if a.device.type != "cpu":
        return _split_at_bracket_torch(a, bracket, sums)
    lo, hi, heavy = bracket
    x = a.numpy()
    above = x > hi
    inside = (x >= lo) & (x <= hi)
    heavy_count = 0
    if heavy is not None:
        is_heavy = x == heavy
        heavy_count = int(np.count_nonzero(is_heavy))
        inside &= ~is_heavy
    return (int(np.count_nonzero(above)), torch.from_numpy(x[inside]), heavy_count,
            sum64(a * torch.from_numpy(above)) if sums else 0.0)


def _tally_compiled(cuts: list[tuple[torch.Tensor, Bracket]], base: torch.Tensor, start: int, stop: int
                    ) -> list[tuple[int, torch.Tensor, int, float, bool]]:
    """`_split_at_bracket` of entries [start, stop) of |x - base| for every (x, bracket) in `cuts`, read from the
    stored tensors by the compiled kernel in one pass (no float32 copy, the base read once); last, whether a
    NaN was seen. No sums."""
    size = stop - start
    buffers = scratch(len(cuts), size)
    args = tuple((kernels.address(x, start), kernels.DTYPE_CODES[x.dtype], lo, hi, 0.0 if heavy is None else heavy,
                  heavy is not None, buffer.data_ptr()) for (x, (lo, hi, heavy)), buffer in zip(cuts, buffers))
    tallies = kernels.compiled.tally_chunk(kernels.address(base, start), kernels.DTYPE_CODES[base.dtype], size, args)
    return [(above, buffer[:kept].clone(), heavy_count, 0.0, nan)
            for (above, heavy_count, kept, nan), buffer in zip(tallies, buffers)]


def _split_at_bracket_torch(a: torch.Tensor, bracket: Bracket, sums: bool) -> tuple[int, torch.Tensor, int, float]:
    """`_split_at_bracket` in torch ops, for tensors on an accelerator."""
    lo, hi, heavy = bracket
    above = a > hi
    inside = (a >= lo) & ~above
    heavy_count = 0
    if heavy is not None:
        is_heavy = a == heavy
        heavy_count = int(torch.count_nonzero(is_heavy))
        inside &= ~is_heavy
    return (int(torch.count_nonzero(above)), torch.masked_select(a, inside), heavy_count,
            sum64(a.mul(above)) if sums else 0.0)


_SAMPLE = 1 << 16
_RUN = 16  # consecutive entries per sampled position: 32 bytes of bf16, one cache line or half of one


@functools.lru_cache(maxsize=16)
def _sample_positions(n: int) -> torch.Tensor:
    """About min(n, 2^16) fixed pseudo-random flat positions in [0, n), sorted (for locality): runs of `_RUN`
    consecutive entries at random starts where n allows, so a sample costs one cache miss per run instead of one
    per entry (loaded, 4 x 0.36 GB bf16 TIES: the sample phase 0.79 -> 0.27 thread-s). Where the positions fall only
    changes how tight the brackets are, never a cut: `magnitude_cuts` is exact for any bracket."""
    g = torch.Generator().manual_seed(0)
    if n < _RUN * _SAMPLE:
        return torch.randint(n, (min(n, _SAMPLE),), generator=g).sort().values
    starts = torch.randint(n // _RUN, (_SAMPLE // _RUN,), generator=g).sort().values * _RUN
    return (starts.unsqueeze(1) + torch.arange(_RUN)).reshape(-1)


def _brackets(inputs: ChunkedInputs, ks: list[list[int]]) -> list[list[Bracket | None]]:
    """Per cut, a value range [lo, hi] that likely holds the k-th largest magnitude: sample quantiles
    (`_sample_positions`) 4.5 standard deviations either side of the k-th's rank, and the value that fills
    at least a quarter of the sample inside the range, if one does (a heavy tie); None for the trivial
    cuts k <= 0 (keep nothing) and k >= numel (keep all)."""
    n = inputs.numel
    if not any(0 < k < n for cut_ks in ks for k in cut_ks):  # only trivial cuts (an empty tensor among them)
        return [[None] * len(cut_ks) for cut_ks in ks]
    index = _sample_positions(n).to(inputs.base.device)
    base = inputs.base.index_select(0, index).to(torch.float32)

    def model(i: int) -> list[Bracket | None]:
        sample = (inputs.tensors[i].index_select(0, index).to(torch.float32) - base).abs_()
        size = sample.numel()
        ranks: list[tuple[int, int] | None] = []  # 0-based ranks in ascending order
        for k in ks[i]:
            if not 0 < k < n:
                ranks.append(None)
                continue
            q = 1 - k / n  # fraction below the k-th largest
            spread = 4.5 * (q * (1 - q) * size) ** 0.5 + 2
            ranks.append((int(q * size - spread), int(q * size + spread) + 1))
        wanted = sorted({min(max(r, 0), size - 1) for pair in ranks if pair for r in pair})
        if not wanted:
            ordered = None
        elif sample.device.type == "cpu":
            # one selection for all ranks, on the int32 bit patterns: for magnitudes (sign bit clear) they order
            # like the floats, NaN last as in a float sort, and compare 1.5x faster than floats
            ordered = np.partition(sample.numpy().view(np.int32), wanted).view(np.float32)
        else:  # a sort on the device, one transfer (each np.partition on the host waited on its own transfer)
            ordered = sample.sort().values.cpu().numpy()
        out: list[Bracket | None] = []
        for pair in ranks:
            if pair is None:
                out.append(None)
                continue
            low, high = pair
            values, counts = np.unique(ordered[max(low, 0):min(high, size - 1) + 1], return_counts=True)
            top = int(np.argmax(counts))
            out.append((float(ordered[low]) if low > 0 else float("-inf"),
                        float(ordered[high]) if high < size else float("inf"),
                        float(values[top]) if 4 * counts[top] >= counts.sum() else None))
        return out

    return map_threads(model, len(ks), inputs.workers)


def magnitude_cuts(inputs: ChunkedInputs, ks: list[list[int]], sums: bool = False
                   ) -> tuple[list[list[MagnitudeCut]], list[float], list[list[float]]]:
    """For each model i and each k in ks[i], the exact top-k rule of |theta_i - base|.

    One pass over the chunks counts, per cut, the magnitudes above a sampled bracket [lo, hi] and
    collects those inside it (about 1% of the entries); the k-th largest is then found among them,
    and its ties counted per chunk. A cut whose k-th largest falls outside its bracket (a sample far off,
    which the 4.5-sigma bracket makes rare) gets a second pass with the bracket extended to that side, so
    the result is always exact. With `sums`, also returns sum |tau_i| and, per cut, the sum of the kept
    magnitudes (float64, summed in chunk order: independent of thread counts).
    """
    n, m = inputs.numel, len(inputs.tensors)
    started = profiling.start()
    brackets = _brackets(inputs, ks)
    profiling.stop("sample", started)
    started = profiling.start()
    per_chunk = _scan(inputs, ks, brackets, sums, sums)
    profiling.stop("scan", started, inputs.nbytes)
    started = profiling.start()
    totals = [sum(c[i][1] for c in per_chunk) if ks[i] else 0.0 for i in range(m)]

    def select(i: int, j: int, chunks: list[list]) -> tuple[MagnitudeCut, float] | None:
        return _select_cut(ks[i][j], n, brackets[i][j][2], [c[i][0][j] for c in chunks], sums)

    pairs = [(i, j) for i in range(m) for j in range(len(ks[i])) if brackets[i][j] is not None]
    found = dict(zip(pairs, map_threads(lambda p: select(*pairs[p], per_chunk), len(pairs), inputs.workers)))
    for i, j in pairs:
        if found[(i, j)] is None:  # the sample missed: extend the bracket to the k-th's side and rescan
            lo, hi, _ = brackets[i][j]
            above = sum(c[i][0][j][0] for c in per_chunk)
            brackets[i][j] = (hi, float("inf"), None) if ks[i][j] <= above else (float("-inf"), lo, None)
            found[(i, j)] = select(i, j, _scan(inputs, ks, brackets, sums, False))
    profiling.stop("select", started)
    cuts: list[list[MagnitudeCut]] = []
    kept_sums: list[list[float]] = []
    for i in range(m):
        cuts.append([found[(i, j)][0] if (i, j) in found else MagnitudeCut(k, n) for j, k in enumerate(ks[i])])
        kept_sums.append([found[(i, j)][1] if (i, j) in found else (0.0 if k <= 0 else totals[i])
                          for j, k in enumerate(ks[i])])
    return cuts, totals, kept_sums


def _refuse_nan(i: int) -> None:
    """NaNs fall outside every bracket: refuse rather than rank them."""
    raise BasinError(f"model {i}: its task vector has NaN entries, so its magnitudes cannot be ranked")


def _scan(inputs: ChunkedInputs, ks: list[list[int]], brackets: list[list[Bracket | None]], sums: bool,
          with_totals: bool) -> list[list]:
    """One pass over the chunks: per chunk and model, ([per cut, its `_split_at_bracket` tally], sum |tau| if
    `with_totals`), None for a model without cuts. Through the compiled kernel where it reads the inputs and
    no sums are wanted (`sums`: the magnitude_cuts call's, also on its rescans)."""
    if not sums and kernels.readable(inputs.tensors + [inputs.base], inputs.numel):
        return _scan_compiled(inputs, ks, brackets)

    def visit(_: int, chunks: list[torch.Tensor], base: torch.Tensor | None) -> list:
        out = []
        for i, x in enumerate(chunks):
            if not ks[i]:
                out.append(None)
                continue
            a = x.sub_(base).abs_()
            if torch.isnan(a.sum()):
                _refuse_nan(i)
            cuts = [None if bracket is None else _split_at_bracket(a, bracket, sums) for bracket in brackets[i]]
            out.append((cuts, sum64(a) if with_totals else 0.0))
        return out

    return inputs.map(visit)


def _scan_compiled(inputs: ChunkedInputs, ks: list[list[int]], brackets: list[list[Bracket | None]]) -> list[list]:
    """`_scan` without sums, one compiled pass per chunk straight from the stored inputs."""
    m = len(inputs.tensors)
    cuts: list[tuple[int, int | None, Bracket]] = []  # (model, its cut or None, bracket)
    for i in range(m):
        if ks[i]:  # a model whose cuts are all trivial still gets a pass, to look for NaN
            cuts += [(i, j, b) for j, b in enumerate(brackets[i]) if b is not None] or [
                (i, None, (math.inf, math.inf, None))]
    scanned = [(inputs.tensors[i], b) for i, _, b in cuts]

    def visit_stored(index: int) -> list:
        start, stop = inputs.span(index)
        tallies = _tally_compiled(scanned, inputs.base, start, stop)
        out: list = [None if not ks[i] else [[None] * len(ks[i]), 0.0] for i in range(m)]
        for (i, j, _), tally in zip(cuts, tallies):
            if tally[4]:
                _refuse_nan(i)
            if j is not None:
                out[i][0][j] = tally[:4]
        return out

    return map_threads(visit_stored, inputs.num_chunks, inputs.workers)


def _select_cut(k: int, n: int, heavy: float | None, tallies: list[tuple[int, torch.Tensor, int, float]],
                sums: bool) -> tuple[MagnitudeCut, float] | None:
    """The top-k cut (and the sum of the kept magnitudes if `sums`) from one cut's per-chunk tallies
    (`_split_at_bracket`); None if its bracket missed the k-th largest."""
    above = sum(t[0] for t in tallies)
    inside = [t[1] for t in tallies]
    heavy_per_chunk = [t[2] for t in tallies]
    heavy_total = sum(heavy_per_chunk)
    if not above < k <= above + sum(t.numel() for t in inside) + heavy_total:
        return None
    candidates = torch.cat(inside)
    need = k - above  # the need-th largest inside the bracket is the k-th largest overall
    over_heavy = int(torch.count_nonzero(candidates > heavy)) if heavy is not None else 0
    if heavy is not None and over_heavy < need <= over_heavy + heavy_total:
        threshold, strictly_above, tied_per_chunk = heavy, over_heavy, heavy_per_chunk
    else:
        rank = need if heavy is None or need <= over_heavy else need - heavy_total  # among the candidates
        threshold = float(torch.kthvalue(candidates, candidates.numel() - rank + 1).values)
        heavy_above = heavy_total if heavy is not None and heavy > threshold else 0
        strictly_above = int(torch.count_nonzero(candidates > threshold)) + heavy_above
        tied_per_chunk = [int(torch.count_nonzero(t == threshold)) for t in inside]
    ties_total, ties_kept = sum(tied_per_chunk), need - strictly_above
    before = None
    if 0 < ties_kept < ties_total:
        before = tuple(itertools.accumulate(tied_per_chunk, initial=0))
    kept = 0.0
    if sums:
        kept = (sum(t[3] for t in tallies) + sum64(candidates[candidates > threshold]) + threshold * ties_kept
                + (heavy * heavy_total if heavy is not None and heavy > threshold else 0.0))
    return MagnitudeCut(k, n, threshold, ties_kept, ties_total, before), kept


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask as bits, 8 to a byte (entry j at bit j % 8 of byte j // 8; the last byte's unused bits zero), on
    the mask's device: 8x less memory than bools for the masks DARE holds between its passes (4 bytes per entry
    of a 4-model merge, twice a bf16 output, as bools)."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.packbits(mask.numpy(), bitorder="little"))
    return _pack_bits(mask)


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """`pack_mask` in torch ops, for masks on an accelerator."""
    padded = torch.nn.functional.pad(mask.to(torch.uint8), (0, -mask.numel() % 8))
    weights = 1 << torch.arange(8, dtype=torch.int32, device=mask.device)
    return (padded.view(-1, 8).to(torch.int32) * weights).sum(1).to(torch.uint8)


def unpack_mask(packed: torch.Tensor, size: int) -> torch.Tensor:
    """The first `size` entries of a `pack_mask`ed mask, as bools."""
    if packed.device.type == "cpu":
        return torch.from_numpy(np.unpackbits(packed.numpy(), count=size, bitorder="little").view(np.bool_))
    return _unpack_bits(packed, size)


def _unpack_bits(packed: torch.Tensor, size: int) -> torch.Tensor:
    """`unpack_mask` in torch ops, for masks on an accelerator."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(1) >> shifts) & 1).reshape(-1)[:size].bool()


def random_masks(inputs: ChunkedInputs, keep: list[float], key: int, sums: bool = False
                 ) -> tuple[list[list[torch.Tensor]], list[float], list[float]]:
    """DARE's Bernoulli(keep[i]) masks of model i, one `pack_mask`ed tensor per chunk: entry j is kept when
    Philox's word for (key, stream i, entry j) says so (`merging.methods.philox.keep_mask`: the float32 uniform <
    keep), so masks do not depend on the chunk size, the threads or the device; models with keep >= 1 get none.
    With `sums`, also sum |tau_i| and the sum of the kept |tau_i| (float64, in chunk order)."""
    started = profiling.start()
    masks, totals, kept = _random_masks(inputs, keep, key, sums)
    profiling.stop("masks", started, inputs.nbytes if sums else 0)
    return masks, totals, kept


def _random_masks(inputs: ChunkedInputs, keep: list[float], key: int, sums: bool
                  ) -> tuple[list[list[torch.Tensor]], list[float], list[float]]:
    """`random_masks`, unprofiled: through the compiled kernel where it applies, else torch ops."""
    m = len(inputs.tensors)
    device = inputs.tensors[0].device
    if _dare_compiled(inputs):
        return _random_masks_compiled(inputs, keep, key, sums)

    def draw(index: int) -> list[torch.Tensor | None]:
        start, stop = inputs.span(index)
        return [None if keep[i] >= 1 else philox.keep_mask(key, i, start, stop - start, philox.keep_threshold(keep[i]),
                                                           device) for i in range(m)]

    if not sums:  # the masks need no input data: no chunk is read or converted
        per_chunk = map_threads(lambda index: [None if mask is None else pack_mask(mask) for mask in draw(index)],
                                inputs.num_chunks, inputs.workers)
        return [[c[i] for c in per_chunk] for i in range(m)], [0.0] * m, [0.0] * m

    def draw_and_sum(index: int, chunks: list[torch.Tensor], base: torch.Tensor | None) -> list[tuple]:
        out = []
        for mask, x in zip(draw(index), chunks):
            if mask is None:
                out.append((None, 0.0, 0.0))
                continue
            a = x.sub_(base).abs_()
            out.append((pack_mask(mask), sum64(a), sum64(mul_mask_(a, mask))))
        return out

    per_chunk = inputs.map(draw_and_sum)
    masks = [[c[i][0] for c in per_chunk] for i in range(m)]
    return masks, [sum(c[i][1] for c in per_chunk) for i in range(m)], [sum(c[i][2] for c in per_chunk)
                                                                         for i in range(m)]


def _dare_compiled(inputs: ChunkedInputs) -> bool:
    """Whether the compiled kernel draws DARE's masks here (CPU inputs it reads)."""
    return hasattr(kernels.compiled, "dare_chunk") and kernels.readable(inputs.tensors + [inputs.base], inputs.numel)


def _random_masks_compiled(inputs: ChunkedInputs, keep: list[float], key: int, sums: bool
                           ) -> tuple[list[list[torch.Tensor]], list[float], list[float]]:
    """`random_masks` in one compiled pass per chunk (the same Philox words, sums in numpy's order: the same
    bits, tested), straight from the stored inputs."""
    m = len(inputs.tensors)
    drawn = [i for i in range(m) if keep[i] < 1]
    thresholds = {i: philox.keep_threshold(keep[i]) for i in drawn}
    key_words = philox.split_key(key)
    base_code = kernels.DTYPE_CODES[inputs.base.dtype]

    def visit(index: int) -> list[tuple[torch.Tensor | None, float, float]]:
        start, stop = inputs.span(index)
        masks = [torch.empty(-(-(stop - start) // 8), dtype=torch.uint8) for _ in drawn]
        args = tuple((kernels.address(inputs.tensors[i], start), kernels.DTYPE_CODES[inputs.tensors[i].dtype],
                      *key_words, i, thresholds[i], mask.data_ptr()) for i, mask in zip(drawn, masks))
        result = kernels.compiled.dare_chunk(kernels.address(inputs.base, start), base_code, stop - start, start,
                                             args, sums)
        out: list[tuple[torch.Tensor | None, float, float]] = [(None, 0.0, 0.0)] * m
        for i, mask, (total, kept) in zip(drawn, masks, result):
            out[i] = (mask, total, kept)
        return out

    per_chunk = map_threads(visit, inputs.num_chunks, inputs.workers)
    masks = [[c[i][0] for c in per_chunk] for i in range(m)]
    return masks, [sum(c[i][1] for c in per_chunk) for i in range(m)], [sum(c[i][2] for c in per_chunk)
                                                                         for i in range(m)]


Magprune = tuple[float, float]  # (density, epsilon) of a model DELLA drops entries of


def magprune_masks(inputs: ChunkedInputs, drop: list[Magprune | None], key: int, sums: bool = False
                   ) -> tuple[list[list[torch.Tensor]], list[float], list[float]]:
    """DELLA's MagPrune masks (Deep et al. 2024, section 3) of model i (drop[i] = (density, epsilon), None: no
    mask), one `pack_mask`ed tensor per chunk: entry j is kept when its Philox uniform (`philox.uniforms`: key,
    stream i, entry j) is below `rank_keep_probability` of |tau_i| at j, so each range of rows is drawn on its own, in
    parallel over groups of chunks (`_magprune_groups`: a row cut by a group border is ranked by both groups). With
    `sums`, also sum |tau_i| and its kept entries, in float64: numpy's sums of each 8192 entries (its buffer) added
    left to right, on the CPU the bits of `sum64` over the whole tensor."""
    started = profiling.start()
    m, width = len(inputs.tensors), row_width(inputs.shape or (inputs.numel,))
    compiled = _della_compiled(inputs, width)
    groups = _magprune_groups(inputs, width)

    def visit(g: int) -> list[tuple[list[torch.Tensor], list[float], list[float]] | None]:
        first, last = groups[g]
        start, stop = inputs.span(first)[0], inputs.span(last - 1)[1]
        if compiled:
            return _magprune_compiled(inputs, drop, key, width, first, last, sums)
        out: list[tuple[list[torch.Tensor], list[float], list[float]] | None] = []
        for i in range(m):
            if drop[i] is None:
                out.append(None)
                continue
            bits = _magprune_range(inputs, i, drop[i], width, start, stop, key)
            packed, totals, kept = [], [], []
            for c in range(first, last):
                a, b = inputs.span(c)
                mask = bits[a - start:b - start]
                packed.append(pack_mask(mask))
                if sums:
                    t, k = _buffer_sums(inputs.tensors[i][a:b], inputs.base[a:b], mask)
                    totals += t
                    kept += k
            out.append((packed, totals, kept))
        return out

    per_group = map_threads(visit, len(groups), inputs.workers) if inputs.numel and any(drop) else []
    masks: list[list[torch.Tensor]] = [[] for _ in range(m)]
    totals, kept = [0.0] * m, [0.0] * m
    for i in range(m):
        if drop[i] is None:
            continue
        if not inputs.numel:  # an empty tensor's one empty chunk
            masks[i] = [torch.zeros(0, dtype=torch.uint8, device=inputs.base.device)]
            continue
        parts_total, parts_kept = [], []
        for g in per_group:
            masks[i] += g[i][0]
            parts_total += g[i][1]
            parts_kept += g[i][2]
        totals[i], kept[i] = _left_to_right(parts_total), _left_to_right(parts_kept)
    profiling.stop("masks", started, inputs.nbytes)
    return masks, totals, kept


def magprune_keep(inputs: ChunkedInputs, i: int, drop: Magprune, start: int, stop: int) -> torch.Tensor:
    """Model i's DELLA keep probabilities (`rank_keep_probability`) at entries [start, stop), float32, from the rows
    that range touches (what `rescale: unbiased` divides by, recomputed per chunk rather than stored)."""
    width = row_width(inputs.shape or (inputs.numel,))
    if stop <= start:
        return torch.zeros(0, dtype=torch.float32, device=inputs.base.device)
    if not _della_compiled(inputs, width):
        return _magprune_range(inputs, i, drop, width, start, stop, None)
    keep = torch.empty(stop - start, dtype=torch.float32)
    model = _della_model(inputs, i, drop, 0, 0, 0, keep.data_ptr())
    kernels.compiled.della_chunk(kernels.address(inputs.base), kernels.DTYPE_CODES[inputs.base.dtype], width, start,
                                 stop, (model,))
    return keep


def _della_compiled(inputs: ChunkedInputs, width: int) -> bool:
    """Whether the compiled kernel draws DELLA's masks here (CPU inputs it reads, rows it ranks)."""
    return (hasattr(kernels.compiled, "della_chunk") and 1 <= width < 1 << 24
            and kernels.readable(inputs.tensors + [inputs.base], inputs.numel))


def _magprune_groups(inputs: ChunkedInputs, width: int) -> list[tuple[int, int]]:
    """The chunk ranges [first, last) drawn together: one chunk each, or where rows are wider than an eighth of a
    chunk enough chunks to hold 8 rows, so that the rows cut at a group's ends (ranked by both neighbours) add at
    most a quarter to the ranking."""
    size = 1 if 8 * width <= inputs.chunk_elements else -(-8 * width // inputs.chunk_elements)
    return [(c, min(inputs.num_chunks, c + size)) for c in range(0, inputs.num_chunks, size)]


def _della_model(inputs: ChunkedInputs, i: int, drop: Magprune, key: int, mask: int, parts: int, keep: int) -> tuple:
    """Model i's tuple for `della_chunk` (mask, parts and keep: addresses or 0)."""
    density, epsilon = drop
    t = inputs.tensors[i]
    return (kernels.address(t), kernels.DTYPE_CODES[t.dtype], *philox.split_key(key), i, density - epsilon,
            2 * epsilon, mask, parts, keep)


def _magprune_compiled(inputs: ChunkedInputs, drop: list[Magprune | None], key: int, width: int, first: int,
                       last: int, sums: bool) -> list[tuple[list[torch.Tensor], list[float], list[float]] | None]:
    """Chunks [first, last) of `magprune_masks` in one call of the compiled kernel (the same bits, tested)."""
    start, stop = inputs.span(first)[0], inputs.span(last - 1)[1]
    n, drawn = stop - start, [i for i in range(len(inputs.tensors)) if drop[i] is not None]
    masks = {i: torch.empty(-(-n // 8), dtype=torch.uint8) for i in drawn}
    parts = {i: torch.empty(-(-n // SUM_BUFFER), 2, dtype=torch.float64) for i in drawn} if sums else {}
    models = tuple(_della_model(inputs, i, drop[i], key, masks[i].data_ptr(), parts[i].data_ptr() if sums else 0, 0)
                   for i in drawn)
    kernels.compiled.della_chunk(kernels.address(inputs.base), kernels.DTYPE_CODES[inputs.base.dtype], width, start,
                                 stop, models)
    out: list[tuple[list[torch.Tensor], list[float], list[float]] | None] = [None] * len(inputs.tensors)
    for i in drawn:
        packed = [masks[i][(a - start) // 8:-(-(b - start) // 8)] for a, b in map(inputs.span, range(first, last))]
        out[i] = (packed, parts[i][:, 0].tolist() if sums else [], parts[i][:, 1].tolist() if sums else [])
    return out


def _magprune_range(inputs: ChunkedInputs, i: int, drop: Magprune, width: int, start: int, stop: int,
                    key: int | None) -> torch.Tensor:
    """Model i's DELLA mask (bools; key None: the keep probabilities) at entries [start, stop), in torch ops: the
    rows the range touches, at most a chunk's worth at a time."""
    x, base = inputs.tensors[i], inputs.base
    step = max(1, CHUNK_ELEMENTS // width)
    first_row, end_row = start // width, -(-stop // width)
    pieces = []
    for row in range(first_row, end_row, step):
        lo, hi = row * width, min(end_row, row + step) * width
        magnitude = (x[lo:hi].to(torch.float32) - base[lo:hi].to(torch.float32)).abs_().view(-1, width)
        keep = rank_keep_probability(magnitude, *drop).view(-1)[max(start, lo) - lo:min(stop, hi) - lo]
        if key is not None:
            keep = philox.uniforms(key, i, max(start, lo), keep.numel(), keep.device) < keep
        pieces.append(keep)
    return torch.cat(pieces)


SUM_BUFFER = 8192  # numpy's buffer (np.getbufsize()): a float32 -> float64 sum adds its buffers' sums left to right


def _buffer_sums(x: torch.Tensor, base: torch.Tensor, mask: torch.Tensor) -> tuple[list[float], list[float]]:
    """The float64 sums of |x - base| and of its entries in `mask` per SUM_BUFFER entries (one chunk's; off the CPU,
    one sum each)."""
    a = (x.to(torch.float32) - base.to(torch.float32)).abs_()
    if a.device.type != "cpu":
        return [sum64(a)], [sum64(mul_mask_(a, mask))]
    spans = [(s, min(a.numel(), s + SUM_BUFFER)) for s in range(0, a.numel(), SUM_BUFFER)]
    totals = [sum64(a[s:e]) for s, e in spans]
    kept = mul_mask_(a, mask)
    return totals, [sum64(kept[s:e]) for s, e in spans]


def _left_to_right(parts: list[float]) -> float:
    """The float64 sum of `parts` in order (numpy's buffers' sums are added so)."""
    total = 0.0
    for part in parts:
        total += part
    return total
