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
Functions ending in _ modify their first argument in place (the callers own those task vectors: in
place saves the allocation of a fresh tensor per step, the costly part on CPU); the rest are pure.
Randomness only through the generator passed in (drawn on CPU).
"""

from __future__ import annotations

import torch

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


def rank_keep_probability(magnitude: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA MagPrune: keep probability density - epsilon + 2 epsilon * rank / (n - 1), per row.

    Ranks are ascending magnitudes within each row (the last axis of a 2-D tensor; 1-D tensors are
    one row; higher-rank tensors are viewed as (shape[0], -1)), ties ordered by index (stable
    sort). A row of one entry gets the midpoint, density.
    """
    if not (0 < density - epsilon and density + epsilon < 1):
        raise BasinError(f"della: density +- epsilon must lie in (0, 1); got density={density}, epsilon={epsilon}")
    rows = magnitude.reshape(1, -1) if magnitude.dim() < 2 else magnitude.reshape(magnitude.shape[0], -1)
    width = rows.shape[1]
    order = torch.sort(rows, dim=1, stable=True).indices
    ranks = torch.empty_like(rows)
    positions = torch.arange(width, dtype=rows.dtype, device=rows.device).expand_as(rows)
    ranks.scatter_(1, order, positions)
    scaled = ranks / (width - 1) if width > 1 else torch.full_like(ranks, 0.5)
    return ((density - epsilon) + 2 * epsilon * scaled).reshape(magnitude.shape)


def mask_and_rescale_(delta: torch.Tensor, mask: torch.Tensor, rescale: bool | str,
                      keep_probability: float | torch.Tensor, magnitude: torch.Tensor | None = None,
                      eps: float = 1e-7) -> torch.Tensor:
    """In place: zero `delta` outside `mask`, then rescale: True = match the L1 norm `delta` had (mergekit),
    'unbiased' = divide by the keep probability (DARE eq. 2, DELLA), False = none.

    `magnitude` (|delta|, if the caller has it) is consumed as scratch space.
    """
    before = after = None
    if rescale is True:
        magnitude = delta.abs() if magnitude is None else magnitude
        before = magnitude.sum()
        after = magnitude.mul_(mask).sum()
    delta.mul_(mask)
    if rescale == "unbiased":
        delta.div_(keep_probability)
    elif before is not None and before >= eps and after >= eps:
        delta.mul_(before / after)
    return delta


def sign_consensus_disjoint_sum_(weighted: list[torch.Tensor], weights: list[float],
                                 with_divisor: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """TIES elect + disjoint merge over weighted task vectors w_i tau_i (consumed: modified in place).

    Elected sign per entry: the sign of sum_i w_i tau_i (zero counts as +, as mergekit); an entry
    agrees when w_i tau_i has the elected sign (zero entries never agree). Returns the sum of the
    agreeing entries and, if `with_divisor`, the sum of the weights of the agreeing models per entry
    (the divisor of the disjoint mean; zero where none agree).
    """
    elected = weighted[0].clone()
    for wd in weighted[1:]:
        elected += wd
    elected.sign_()
    elected.masked_fill_(elected == 0, 1.0)
    product = torch.empty_like(elected)
    agree = torch.empty(elected.shape, dtype=torch.bool, device=elected.device)
    divisor = torch.zeros_like(elected) if with_divisor else None
    mixed = None
    for w, wd in zip(weights, weighted):
        torch.gt(torch.mul(wd, elected, out=product), 0, out=agree)
        wd.mul_(agree)
        mixed = wd if mixed is None else mixed.add_(wd)
        if divisor is not None:
            divisor.add_(agree, alpha=w)
    return mixed, divisor
