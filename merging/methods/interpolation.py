"""Interpolation family: weighted averages, soups, selective interpolation and layer stacking.

- linear (Wortsman et al. 2022; mergekit `linear`): sum_i w_i theta_i, divided by sum_i w_i when `normalize`.
- model_soup (Wortsman et al. 2022, the uniform soup): (1/N) sum_i theta_i. mergekit has no such method
  (its `linear` with equal weights is the same); the greedy soup is in `merging.modelwise.soups` (model-wise).
- nearswap (alchemonaut 2024; mergekit `nearswap`): per entry, lambda = clamp(t / |base - other|, 0, 1)
  (1 where the two are equal) and theta = lambda * other + (1 - lambda) * base.
- arcee_fusion (Arcee AI 2025; mergekit `arcee_fusion`): with p = softmax(other) + 1e-8 and q = softmax(base)
  + 1e-8 along the last dimension, importance I = |other - base| * KL(p || q) (one KL per row, broadcast
  over the row); threshold tau = median(I) + 1.5 (Q3(I) - Q1(I)) with quantiles taken as sorted(I)[floor(
  q (n - 1))]; the output takes `other` where I >= tau and `base` elsewhere.
- passthrough (mergekit `passthrough`): one model's tensor, times its optional `scale`.
The spherical methods (slerp, nuslerp, multislerp, karcher) live in `merging.methods.spherical`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from merging.methods import kernels
from merging.methods.chunking import ChunkedInputs
from merging.methods.registry import merge_method
from merging.reductions import row_blocks, row_sums64
from taxonomy.errors import BasinError

KL_EPS = 1e-8
FUSION_QUANTILES = (0.25, 0.5, 0.75)


def weighted_sum(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """sum_i w_i x_i, left to right, each product rounded before it is added (as mergekit's (x * w).sum(0); torch's
    add_ with alpha would fuse the multiply-add on CPU); one output buffer, no stacked copy of the inputs."""
    out = tensors[0] * weights[0]
    for x, w in zip(tensors[1:], weights[1:]):
        out.add_(x * w)
    return out


def weighted_sum_kernel(inputs: ChunkedInputs, weights: list[float], total: float
                        ) -> Callable[[int, torch.Tensor], torch.Tensor] | None:
    """weighted_sum(...) / total as one pass of the compiled kernel per chunk (merging/methods/_fused.c, the same bits:
    tested), reading the stored inputs directly; None where the kernel does not apply (see kernels.readable)."""
    if not kernels.readable(inputs.tensors, inputs.numel):
        return None
    codes = [kernels.DTYPE_CODES[t.dtype] for t in inputs.tensors]

    def kernel(chunk: int, out: torch.Tensor) -> torch.Tensor:
        start, stop = inputs.span(chunk)
        kernels.compiled.weighted_sum_chunk(out.data_ptr(), stop - start, tuple(
            (kernels.address(t, start), code, w) for t, code, w in zip(inputs.tensors, codes, weights)), total)
        return out

    return kernel


def _linear_total(weights: list[float]) -> float:
    total = sum(weights)
    if total == 0:
        raise BasinError("linear: the weights sum to zero, cannot normalize")
    return total


def _linear_kernel(inputs: ChunkedInputs, params: dict[str, Any]) -> Callable[[int, torch.Tensor], torch.Tensor] | None:
    weights = [float(w) for w in params["weight"]]
    return weighted_sum_kernel(inputs, weights, _linear_total(weights) if params["normalize"] else 1.0)


@merge_method("linear", elementwise=True, fused=_linear_kernel)
def linear(
    tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict[str, Any], rng: torch.Generator
) -> torch.Tensor:
    """Weighted average sum_i w_i theta_i (divided by sum_i w_i when `normalize`); Wortsman et al. 2022."""
    weights = [float(w) for w in params["weight"]]
    out = weighted_sum(tensors, weights)
    return out.div_(_linear_total(weights)) if params["normalize"] else out


def _soup_kernel(inputs: ChunkedInputs, params: dict[str, Any]) -> Callable[[int, torch.Tensor], torch.Tensor] | None:
    return weighted_sum_kernel(inputs, [1.0] * len(inputs.tensors), float(len(inputs.tensors)))


@merge_method("model_soup", elementwise=True, fused=_soup_kernel)
def model_soup(
    tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict[str, Any], rng: torch.Generator
) -> torch.Tensor:
    """Uniform soup: the plain average of the models (Wortsman et al. 2022)."""
    return weighted_sum(tensors, [1.0] * len(tensors)).div_(len(tensors))


@merge_method("nearswap", elementwise=True)
def nearswap(
    tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict[str, Any], rng: torch.Generator
) -> torch.Tensor:
    """Move the base toward the other model entrywise by clamp(t / |base - other|, 0, 1)."""
    t = params["t"]
    if t is None or t <= 0:
        raise BasinError(f"nearswap: parameter 't' (the sameness threshold) must be > 0, got {t!r}")
    if base is None or len(tensors) != 1:
        raise BasinError(f"nearswap merges a base_model with exactly one other model, got {len(tensors)} others")
    other = tensors[0]
    lam = float(t) / torch.sub(base, other).abs_()
    lam = torch.nan_to_num_(lam, nan=1.0, posinf=1.0, neginf=1.0).clamp_(0.0, 1.0)
    return torch.lerp(base, other, lam)  # lam * other + (1 - lam) * base; exactly `other` where lam = 1




def row_kl(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """KL(softmax(other) + eps || softmax(base) + eps) per last-dim row, in float64 over blocks of rows (shape
    other.shape[:-1] + (1,))."""
    o2, b2 = other.reshape(-1, other.shape[-1]), base.reshape(-1, base.shape[-1])
    kl = torch.empty(o2.shape[0], dtype=torch.float64, device=other.device)
    for start, stop in row_blocks(*o2.shape):
        p = torch.softmax(o2[start:stop].to(torch.float64), dim=-1).add_(KL_EPS)
        q = torch.softmax(b2[start:stop].to(torch.float64), dim=-1).add_(KL_EPS)
        kl[start:stop] = row_sums64(p * torch.log(p / q))
    return kl.reshape(*other.shape[:-1], 1)


def fusion_importance(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Arcee Fusion's importance |other - base| * KL(softmax(other) || softmax(base)), KL per last-dim row
    (accumulated in float64, rounded once to the inputs' dtype)."""
    if other.dim() == 0:
        other, base = other.reshape(1), base.reshape(1)
    return (other - base).abs_().mul_(row_kl(other, base).to(other.dtype))


def order_statistics(values: torch.Tensor, ranks: list[int], use_numpy: bool | None = None) -> list[float]:
    """The `ranks`-th smallest entries (0-based) of `values`: one numpy selection pass on CPU, kthvalue elsewhere."""
    flat = values.reshape(-1)
    if use_numpy if use_numpy is not None else flat.device.type == "cpu":
        return [float(v) for v in np.partition(flat.numpy(), ranks)[ranks]]
    return [float(torch.kthvalue(flat, r + 1).values) for r in ranks]


def fusion_threshold(importance: torch.Tensor) -> float:
    """median + 1.5 * (Q3 - Q1), each quantile the sorted value at index floor(q * (n - 1)) (no interpolation)."""
    q1, median, q3 = order_statistics(importance, [int(q * (importance.numel() - 1)) for q in FUSION_QUANTILES])
    return median + 1.5 * (q3 - q1)


@merge_method("arcee_fusion")
def arcee_fusion(
    tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict[str, Any], rng: torch.Generator
) -> torch.Tensor:
    """Take the other model's entries whose fusion importance reaches the dynamic threshold; keep the base elsewhere."""
    if base is None or len(tensors) != 1:
        raise BasinError(f"arcee_fusion merges a base_model with exactly one other model, got {len(tensors)} others")
    other = tensors[0]
    importance = fusion_importance(other, base)
    mask = (importance >= fusion_threshold(importance)).reshape(other.shape)
    return torch.where(mask, other, base)


@merge_method("passthrough", elementwise=True)
def passthrough(
    tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict[str, Any], rng: torch.Generator
) -> torch.Tensor:
    """One model's tensor unchanged (times its `scale`); the building block of frankenmerges."""
    if len(tensors) != 1:
        raise BasinError(f"passthrough takes exactly one model per tensor (use slices to stack layers), "
                         f"got {len(tensors)}")
    scale = float(params["scale"][0])
    return tensors[0].clone() if scale == 1.0 else tensors[0] * scale


