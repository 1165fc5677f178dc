"""Subspace merges of task vectors: TSV-Merge (Gargiulo et al. 2025, Task Singular Vectors) and CART (Choi et
al. 2024, centred task vectors of low rank).

For a 2-D tensor, each task vector tau_i = U_i S_i V_i^T is cut to its k = max(1, int(r * f))
leading singular triplets (r = min(shape), f = `sv_reduction`, by default 1 / T for T models);
the kept left vectors are concatenated into U = [U_1k ... U_Tk], the right ones into
V = [V_1k ... V_Tk], the singular values into S. Interference between tasks is removed by
replacing U and V with their nearest matrices with orthonormal columns (the polar factors,
P Q^T for U = P Sigma Q^T: the Procrustes whitening of section 4 of the paper), and
    theta = base + lambda * U_perp diag(S) V_perp^T.
Tensors of other ranks (biases, norms) get the mean task vector, as the authors' code. Unlike
the authors' CLIP code, no tensor is special-cased by name (they average `text_projection`), and
components whose singular value is numerically zero (below numpy.linalg.matrix_rank's tolerance)
are left out before orthogonalising: their singular vectors are arbitrary (a task vector that is
zero on a tensor would otherwise rotate the other tasks' vectors), and they add nothing to Delta.

CART (Choi et al. 2024, eq. 5): no base; the task vectors are centred at the weight average m = mean_i
theta_i, and each centred matrix theta_i - m is cut to its k = max(1, int(r * rank_ratio)) leading singular
triplets: theta = m + lambda * sum_i SVD_k(theta_i - m). At full rank the centred vectors sum to zero and CART is
the average; tensors of other ranks get m.

Both cut matrices to their leading triplets; `svd: exact` (the default) takes them from a full SVD, as the
authors' code and FusionBench do; `svd: lowrank` from `torch.svd_lowrank` (Halko et al. 2011, randomised range
finder, k + 10 columns, 4 power iterations), seeded from the tensor's generator so runs repeat bit for bit: much
faster when k is small against min(shape) (CART's 8%), approximate (within a few per cent of the best rank-k
error on flat spectra, tested), so not FusionBench's numbers.
"""

from __future__ import annotations

from typing import Any

import torch

from merging.methods.registry import merge_method, scaled_sum

LOWRANK_OVERSAMPLE, LOWRANK_ITERATIONS = 10, 4


def leading_triplets(matrix: torch.Tensor, k: int, svd: str = "exact", seed: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_k, S_k, V_k^T): the k leading singular triplets of a 2-D tensor, by a full SVD (`svd="exact"`) or by
    torch.svd_lowrank seeded with `seed` (`"lowrank"`, where k + oversampling is below min(shape))."""
    q = k + LOWRANK_OVERSAMPLE
    if svd == "lowrank" and q < min(matrix.shape):
        with torch.random.fork_rng(devices=[matrix.device] if matrix.is_cuda else []):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(matrix, q=q, niter=LOWRANK_ITERATIONS)
        return u[:, :k], s[:k], v[:, :k].T
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :k], s[:k], vh[:k]


def svd_seed(params: dict[str, Any], rng: torch.Generator | None) -> int:
    """The seed of `leading_triplets` for one tensor: drawn from its generator only for `svd: lowrank` (the exact
    path draws nothing)."""
    if params.get("svd", "exact") != "lowrank" or rng is None:
        return 0
    return int(torch.randint(0, 2**62, (1,), generator=rng))


def polar_factor(matrix: torch.Tensor) -> torch.Tensor:
    """The closest matrix with orthonormal columns (or rows, if wide) in Frobenius norm: P Q^T."""
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh


def tsv_delta(task_vectors: list[torch.Tensor], sv_reduction: float, svd: str = "exact",
              seed: int = 0) -> torch.Tensor:
    """The TSV-Merge combination of 2-D task vectors (without lambda)."""
    fraction = sv_reduction if sv_reduction > 0 else 1 / len(task_vectors)
    us, ss, vhs = [], [], []
    for i, tau in enumerate(task_vectors):
        if not bool(tau.any()):  # a zero task vector has no components (and its SVD's vectors are arbitrary)
            continue
        k = max(1, int(min(tau.shape) * fraction))
        u, s, vh = leading_triplets(tau, k, svd, seed + i)
        # numerically zero components (numpy.linalg.matrix_rank's tolerance) have arbitrary singular
        # vectors that would rotate the others in the orthogonalisation: leave them out
        tolerance = float(s[0]) * max(tau.shape) * torch.finfo(s.dtype).eps if s.numel() else 0.0
        k = min(k, int((s > tolerance).sum()))
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k])
    if sum(values.numel() for values in ss) == 0:
        return torch.zeros_like(task_vectors[0])
    if len(ss) == 1:  # one task: its leading components are orthonormal already
        return (us[0] * ss[0]) @ vhs[0]
    u_perp = polar_factor(torch.cat(us, dim=1))
    vh_perp = polar_factor(torch.cat(vhs, dim=0))
    return (u_perp * torch.cat(ss)) @ vh_perp


def tsv_parts(tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict[str, Any],
              rng: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, Delta): TSV-Merge is base + lambda * Delta."""
    task_vectors = [t - base for t in tensors]
    if base.dim() == 2:
        return base, tsv_delta(task_vectors, params["sv_reduction"], params.get("svd", "exact"),
                               svd_seed(params, rng))
    return base, torch.stack(task_vectors).mean(0)


@merge_method("tsv", scaled=tsv_parts)
def tsv(tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict[str, Any],
        rng: torch.Generator) -> torch.Tensor:
    """TSV-Merge (Gargiulo et al. 2025, Task Singular Vectors, Alg. 1); see the module docstring."""
    return scaled_sum(tsv_parts(tensors, base, params, rng), params["lambda"])


def truncated(matrix: torch.Tensor, k: int, svd: str = "exact", seed: int = 0) -> torch.Tensor:
    """The best rank-k approximation of a 2-D tensor (Eckart-Young): its k leading singular triplets
    (`leading_triplets`)."""
    u, s, vh = leading_triplets(matrix, k, svd, seed)
    return (u * s) @ vh


def cart_parts(tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict[str, Any],
               rng: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(m, sum_i SVD_k(theta_i - m)): CART is m + lambda * that sum (m alone for tensors of other ranks)."""
    mean = torch.stack(tensors).mean(0)
    if mean.dim() != 2:
        return mean, None
    k = max(1, int(min(mean.shape) * params["rank_ratio"]))
    svd, seed = params.get("svd", "exact"), svd_seed(params, rng)
    delta = torch.zeros_like(mean)
    for i, t in enumerate(tensors):
        delta += truncated(t - mean, k, svd, seed + i)
    return mean, delta


@merge_method("cart", scaled=cart_parts)
def cart(tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict[str, Any],
         rng: torch.Generator) -> torch.Tensor:
    """CART (Choi et al. 2024, eq. 5); see the module docstring."""
    return scaled_sum(cart_parts(tensors, base, params, rng), params["lambda"])
