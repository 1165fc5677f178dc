"""Rows for the tokens only the donor has, computed from the tokens both tokenizers share.

- `omp` (default): orthogonal matching pursuit (Pati, Rezaiifar & Krishnaprasad 1993; as mergekit-tokensurgeon
  uses it): the new token's *donor* row is approximated as a combination of at most k shared tokens' donor rows,
  picked greedily (each step adds the shared row most correlated with the residual, then refits every
  coefficient by least squares); the same coefficients on the *model's* rows of those shared tokens give the
  new row. Float64 throughout, least squares by an incrementally updated QR (Gram-Schmidt applied twice).
- `mean`: the mean of all the model's rows (float64 accumulation); `zero`: zeros;
- `subword`: the mean of the model's rows of the pieces the model's tokenizer cuts the token's text into.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

EPS = 1e-12  # relative: an atom whose part orthogonal to the chosen ones is below EPS * its norm adds nothing


def omp(targets: torch.Tensor, atoms: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched OMP: (indices (B, k), coefficients (B, k), float64) such that coefficients @ atoms[indices]
    approximates each target. Stops early per target once its residual vanishes (later coefficients are 0)."""
    y = targets.to(torch.float64)
    a = atoms.to(torch.float64)
    b, d = y.shape
    k = min(k, a.shape[0])
    q = torch.zeros(b, d, k, dtype=torch.float64)
    r = torch.eye(k, dtype=torch.float64).repeat(b, 1, 1)
    chosen = torch.zeros(b, k, dtype=torch.long)
    taken = torch.zeros(b, a.shape[0], dtype=torch.bool)
    residual = y.clone()
    rows = torch.arange(b)
    for t in range(k):
        corr = (residual @ a.T).abs().masked_fill_(taken, -1.0)
        pick = corr.argmax(dim=1)
        chosen[:, t], taken[rows, pick] = pick, True
        q[:, :, t], r[:, : t + 1, t] = _orthogonalize(q[:, :, :t], a[pick])
        residual = y - torch.einsum("bdt,bt->bd", q[:, :, : t + 1], torch.einsum("bdt,bd->bt", q[:, :, : t + 1], y))
    qty = torch.einsum("bdt,bd->bt", q, y).unsqueeze(-1)
    coeffs = torch.linalg.solve_triangular(r, qty, upper=True).squeeze(-1)
    return chosen, coeffs


def _orthogonalize(q: torch.Tensor, atom: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The new unit column of Q (zero when `atom` adds nothing) and R's new column (t+1 entries): classical
    Gram-Schmidt applied twice (Giraud et al. 2005: orthogonal to working precision)."""
    v = atom.clone()
    proj = torch.zeros(atom.shape[0], q.shape[2], dtype=torch.float64)
    for _ in range(2):
        p = torch.einsum("bdt,bd->bt", q, v)
        v -= torch.einsum("bdt,bt->bd", q, p)
        proj += p
    norm = v.norm(dim=1)
    useful = norm > EPS * atom.norm(dim=1).clamp_min(EPS)
    col = torch.where(useful.unsqueeze(1), v / norm.clamp_min(EPS).unsqueeze(1), torch.zeros_like(v))
    diag = torch.where(useful, norm, torch.ones_like(norm))  # R stays invertible; Q's zero column gives coefficient 0
    proj = torch.where(useful.unsqueeze(1), proj, torch.zeros_like(proj))
    return col, torch.cat([proj, diag.unsqueeze(1)], dim=1)


def omp_rows(donor_new: torch.Tensor, donor_shared: torch.Tensor, model_shared: torch.Tensor, k: int,
             batch: int = 512, progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """The model's rows for the new tokens (float64, (B, model dim)), OMP over the donor's shared rows, `batch`
    targets at a time. Memory: the shared rows in float64 (both models'), and per batch Q (batch x dim x k)."""
    out = torch.empty(donor_new.shape[0], model_shared.shape[1], dtype=torch.float64)
    shared = model_shared.to(torch.float64)
    for start in range(0, donor_new.shape[0], batch):
        idx, coeffs = omp(donor_new[start:start + batch], donor_shared, k)
        rows = torch.zeros(idx.shape[0], shared.shape[1], dtype=torch.float64)
        for t in range(idx.shape[1]):  # one (batch, dim) gather at a time, never (batch, k, dim)
            rows += coeffs[:, t, None] * shared[idx[:, t]]
        out[start:start + batch] = rows
        if progress is not None:
            progress(idx.shape[0])
    return out


def mean_row(matrix: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """The mean of every row, accumulated in float64 `chunk` rows at a time."""
    total = torch.zeros(matrix.shape[1], dtype=torch.float64)
    for start in range(0, matrix.shape[0], chunk):
        total += matrix[start:start + chunk].to(torch.float64).sum(dim=0)
    return total / max(matrix.shape[0], 1)


def subword_rows(pieces: list[list[int]], matrix: torch.Tensor) -> torch.Tensor:
    """Per new token, the float64 mean of the model's rows of its pieces (the mean of all rows when it has none)."""
    out = torch.empty(len(pieces), matrix.shape[1], dtype=torch.float64)
    fallback = None
    for i, ids in enumerate(pieces):
        if ids:
            out[i] = matrix[torch.tensor(ids)].to(torch.float64).mean(dim=0)
        else:
            fallback = mean_row(matrix) if fallback is None else fallback
            out[i] = fallback
    return out
