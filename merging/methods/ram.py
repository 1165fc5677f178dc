"""Reinforced Agent Merging (RAM, arXiv:2601.13572; mergekit `ram` and `ramplus_tl`), on task vectors.

With tau_i = theta_i - base, entry j of model i *contributes* when |tau_ij| > epsilon, and
c_j = #{i : model i contributes at j}. An entry only one model changed is kept as it is; where
several overlap they are averaged:

    ram:         theta_j = base_j + sum_{i contributing} tau_ij / max(c_j, 1) ... i.e. tau_ij if c_j = 1,
                 the mean of the contributing entries if c_j > 1, base_j if c_j = 0.
    ramplus_tl:  per model and tensor, rho_i = shared_i / max(unique_i, epsilon), with shared_i (unique_i)
                 the number of model i's contributing entries where c_j > 1 (c_j = 1); the unique entries
                 are scaled by lambda_i = 1 + r * clamp(rho_i, 0, alpha), the overlapping ones averaged.

float32 compute (mergekit computes in the inputs' dtype); counts are exact integers.
"""

from __future__ import annotations

from typing import Any

import torch

from merging.methods import kernels
from merging.methods.chunking import ChunkedInputs, TwoPhase
from merging.methods.registry import merge_method

Params = dict[str, Any]


def contributions(tensors: list[torch.Tensor], base: torch.Tensor, epsilon: float
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """(tau_i, contributes_i = |tau_i| > epsilon, c = number of contributing models per entry)."""
    taus = [t - base for t in tensors]
    masks = [tau.abs() > epsilon for tau in taus]
    count = torch.zeros(base.shape, dtype=torch.int32, device=base.device)
    for m in masks:
        count.add_(m.to(torch.int32))
    return taus, masks, count


def _ram_kernel(inputs: Any, params: Params) -> Any:
    return kernels.elect(kernels.ELECT_RAM, inputs, lambda x, b: ram.fn(x, b, params, None), float(params["epsilon"]))


@merge_method("ram", elementwise=True, fused=_ram_kernel)
def ram(tensors: list[torch.Tensor], base: torch.Tensor | None, params: Params, rng: torch.Generator) -> torch.Tensor:
    """RAM: unique task-vector entries kept, overlapping ones averaged over the contributing models."""
    taus, masks, count = contributions(tensors, base, float(params["epsilon"]))
    divisor = count.clamp(min=1).to(base.dtype)
    merged = torch.zeros_like(base)
    for tau, m in zip(taus, masks):
        merged.add_(torch.where(m, tau, 0.0) / divisor)
    return base + merged



def unique_gain(mask: torch.Tensor, count: torch.Tensor, r: float, alpha: float, epsilon: float) -> torch.Tensor:
    """lambda_i = 1 + r * clamp(shared_i / max(unique_i, epsilon), 0, alpha) for one model's contribution mask,
    in float32 (as mergekit: the counts are exact, the ratio and gain are rounded to float32)."""
    shared = torch.count_nonzero(mask & (count > 1)).to(torch.float32)
    unique = torch.count_nonzero(mask & (count == 1)).to(torch.float32)
    return gain_from_counts(shared, unique, r, alpha, epsilon)


def gain_from_counts(shared: torch.Tensor, unique: torch.Tensor, r: float, alpha: float,
                     epsilon: float) -> torch.Tensor:
    """`unique_gain` from the counts (float32 0-dim tensors)."""
    rho = shared / unique.clamp(min=epsilon)
    return 1 + r * rho.clamp(min=0, max=alpha)


class RamPlusTl(TwoPhase):
    """RAM+ (tensor-local): RAM with each model's unique entries scaled by its lambda_i (counted per tensor).

    Two phases (merging.methods.chunking): `prepare` counts each model's shared and unique entries chunk by chunk
    (exact integers), `apply` merges chunk by chunk with the gains.
    """

    def prepare(self, inputs: ChunkedInputs, params: Params, rng: torch.Generator) -> dict[str, Any]:
        epsilon = float(params["epsilon"])

        def tally(_: int, chunks: list[torch.Tensor], base: torch.Tensor | None) -> list[tuple[int, int]]:
            _, masks, count = contributions(chunks, base, epsilon)
            shared, unique = count > 1, count == 1
            return [(int(torch.count_nonzero(m & shared)), int(torch.count_nonzero(m & unique))) for m in masks]

        per_chunk = inputs.map(tally)
        gains = []
        for i in range(len(inputs.tensors)):
            shared = torch.tensor(sum(c[i][0] for c in per_chunk)).to(torch.float32)
            unique = torch.tensor(sum(c[i][1] for c in per_chunk)).to(torch.float32)
            gains.append(gain_from_counts(shared, unique, float(params["r"]), float(params["alpha"]), epsilon))
        return {"gains": gains}

    def apply(self, chunks: list[torch.Tensor], base: torch.Tensor, params: Params, state: dict[str, Any],
              chunk: int) -> torch.Tensor:
        taus, masks, count = contributions(chunks, base, float(params["epsilon"]))
        unique, overlap = count == 1, count > 1
        divisor = count.clamp(min=1).to(base.dtype)
        merged = torch.zeros_like(base)
        for tau, m, gain in zip(taus, masks, state["gains"]):
            merged.add_(torch.where(m & unique, tau * gain.to(tau.device), 0.0))
            merged.add_(torch.where(m & overlap, tau, 0.0) / divisor)
        return base + merged


ramplus_tl = merge_method("ramplus_tl")(RamPlusTl())
