"""A rank-r factorisation Delta ~= B @ A of one weight difference by truncated SVD (Eckart-Young-Mirsky: the best
rank-r approximation in the Frobenius norm keeps the r largest singular values), as LoRA factors (Hu et al. 2022).

With Delta = U S V^T, B = U_r S_r^(1/2) and A = S_r^(1/2) V_r^T (the scale split evenly, as mergekit's
`distribute_scale`). Which SVD:
- a fixed rank r whose sketch (r + OVERSAMPLE columns) is at most a quarter of min(m, n), on a matrix of more than
  SMALL entries: `torch.svd_lowrank` (Halko, Martinsson and Tropp 2011, Algorithm 4.4: a Gaussian sketch and
  POWER_ITERATIONS subspace iterations), seeded from the tensor's name so that reruns are bit-identical whatever
  the order. Its error was within 1% of the Eckart-Young optimum in the tests (decaying spectra) and on noise-like
  differences (benchmarks/extract_lora_vs_mergekit.py); the report gives the measured error;
- `rank="auto"` (it needs the whole spectrum): the exact SVD up to `exact_limit` entries, above it svd_lowrank
  with a sketch doubled until the energy is reached (the exact SVD once the sketch reaches half the size);
- anything else (small matrices, ranks near full): the exact `torch.linalg.svd`, as mergekit.
Signs are fixed (each column of U has its largest entry positive) so that the factors do not depend on the LAPACK
build's sign choice.

`rank="auto"` picks the smallest r whose kept energy sum_{i<=r} s_i^2 / ||Delta||_F^2 reaches `energy`; singular
values at or below `sv_epsilon` are dropped. The reported error is measured, not predicted: ||Delta - B A||_F of the
factors as stored (in their dtype), accumulated in float64, over ||Delta||_F.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from merging.reductions import distance64, sum_squares64

EXACT_LIMIT = 1 << 22  # rank auto: entries up to a 2048 x 2048 matrix, the exact SVD (seconds on a CPU core)
SMALL = 1 << 16  # entries (256 x 256): always the exact SVD (milliseconds)
LOWRANK_RATIO = 4  # fixed rank: randomised when (rank + OVERSAMPLE) * LOWRANK_RATIO <= min(m, n)
OVERSAMPLE = 10  # svd_lowrank's extra columns beyond the rank (Halko et al.'s p)
POWER_ITERATIONS = 4
AUTO_START = 64  # auto rank on the randomised path: columns tried first, doubled until the energy is reached


@dataclass
class Factors:
    """LoRA factors of one difference: b (out, r) @ a (r, in) ~= delta; rank 0 when nothing is kept."""

    a: torch.Tensor | None
    b: torch.Tensor | None
    rank: int
    kept_energy: float
    relative_error: float
    frobenius_error: float
    method: str


def factorize(delta: torch.Tensor, rank: int | str, *, energy: float = 0.9, sv_epsilon: float = 0.0,
              out_dtype: torch.dtype | None = None, seed_name: str = "", exact_limit: int = EXACT_LIMIT) -> Factors:
    """Factor a 2-D `delta` (any float dtype); `rank` an int (at most min(delta.shape)) or "auto"."""
    d = delta.to(torch.float32)
    total = sum_squares64(d)
    out_dtype = out_dtype or delta.dtype
    if total == 0.0:
        return Factors(None, None, 0, 1.0, 0.0, 0.0, "zero")
    u, s, vh, method = _svd(d, rank, energy, total, seed_name, exact_limit)
    r = _choose_rank(s, rank, energy, sv_epsilon, total)
    if r == 0:
        return Factors(None, None, 0, 0.0, 1.0, total ** 0.5, method)
    u, vh = _fix_signs(u[:, :r], vh[:r])
    root = s[:r].sqrt()
    a = (root[:, None] * vh).to(out_dtype).contiguous()
    b = (u * root[None, :]).to(out_dtype).contiguous()
    error = distance64(d, b.to(torch.float32) @ a.to(torch.float32))
    kept = float((s[:r].to(torch.float64) ** 2).sum()) / total
    return Factors(a, b, r, min(kept, 1.0), error / total ** 0.5, error, method)


def _svd(d: torch.Tensor, rank: int | str, energy: float, total: float, seed_name: str, exact_limit: int):
    """(U, S, V^T, method): see the module docstring for which SVD."""
    k = min(d.shape)
    if rank != "auto":
        q = int(rank) + OVERSAMPLE
        if d.numel() <= min(exact_limit, SMALL) or q * LOWRANK_RATIO > k:
            return (*torch.linalg.svd(d, full_matrices=False), "svd")
        u, s, v = _lowrank(d, q, seed_name)
        return u, s, v.T, "svd_lowrank"
    if d.numel() <= exact_limit:
        return (*torch.linalg.svd(d, full_matrices=False), "svd")
    q = AUTO_START
    while True:
        u, s, v = _lowrank(d, min(q, k), seed_name)
        if float((s.to(torch.float64) ** 2).sum()) / total >= energy:
            return u, s, v.T, "svd_lowrank"
        q *= 2
        if q >= k // 2:
            u, s, vh = torch.linalg.svd(d, full_matrices=False)
            return u, s, vh, "svd"


def _lowrank(d: torch.Tensor, q: int, seed_name: str):
    """torch.svd_lowrank with its random test matrix seeded from the tensor's name."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(seed_name.encode()))
        return torch.svd_lowrank(d, q=q, niter=POWER_ITERATIONS)


def _choose_rank(s: torch.Tensor, rank: int | str, energy: float, sv_epsilon: float, total: float) -> int:
    """The fixed rank, or the smallest reaching `energy`; then singular values <= `sv_epsilon` dropped."""
    if rank == "auto" and energy >= 1.0:  # all of it: a float32 SVD's sum can fall short of the float64 total
        r = s.numel()
    elif rank == "auto":
        cumulative = torch.cumsum(s.to(torch.float64) ** 2, 0) / total
        r = int((cumulative < energy - 1e-12).sum()) + 1
        r = min(r, s.numel())
    else:
        r = min(int(rank), s.numel())
    if sv_epsilon > 0:
        r = min(r, int((s > sv_epsilon).sum()))
    return r


def _fix_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each singular pair so that the largest-magnitude entry of its column of U is positive."""
    rows = u.abs().argmax(dim=0)
    signs = torch.sign(u[rows, torch.arange(u.shape[1])])
    signs[signs == 0] = 1
    return u * signs[None, :], vh * signs[:, None]
