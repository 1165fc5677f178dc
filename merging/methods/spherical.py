"""Spherical interpolation of parameters: SLERP, NuSLERP, Multi-SLERP and the Karcher mean.

Each tensor is treated as one vector (or, for NuSLERP without flattening, as a batch of row or
column vectors). The angle between inputs is measured on their normalized directions, while the
interpolation weights multiply the raw tensors, so norms are carried along (mergekit's semantics).

- slerp (Shoemake 1985): for cos(Omega) = <a/|a|, b/|b|>,
  slerp(t) = sin((1 - t) Omega) / sin(Omega) * a + sin(t Omega) / sin(Omega) * b;
  if |cos(Omega)| > 0.9995 the inputs are near colinear and (1 - t) a + t b is used instead.
- nuslerp (mergekit): slerp of two models at t = w_2 / (w_1 + w_2) (t = 0.5 if the sum is ~0), per
  flattened tensor or per vector along dim -1 (dim 0 with `nuslerp_row_wise`); vectors whose sin(Omega)
  < 1e-8 fall back to linear interpolation. With a base model it slerps the task vectors and adds the base.
- multislerp (Goddard 2025): with u_i = x_i / (|x_i| + eps) and weights w_i (normalized to sum 1 by
  default), mergekit projects the u_i onto the tangent space at m = sum w_i u_i / |sum w_i u_i|, averages
  there and maps back with the exponential map, then scales by sum w_i |x_i|. The weighted tangent
  average is sum_i w_i (u_i - <u_i, m> m) = sum w_i u_i - |sum w_i u_i| m = 0 exactly, so the result is
  the closed form (sum_i w_i |x_i|) * m, which is what we compute (it equals mergekit's up to rounding).
- karcher (Karcher 1977; the fixed-point algorithm of Buss and Fillmore 2001): the weighted Frechet
  mean m of the unit directions u_i on the sphere, iterating m <- exp_m(sum_i a_i theta_i / sin(theta_i)
  (u_i - cos(theta_i) m)), then scaled by sum_i a_i |x_i|; stopping and skipping rules as mergekit's.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from merging.methods.registry import merge_method
from merging.reductions import axis_dots64, dot64, norm64
from taxonomy.errors import BasinError

DOT_THRESHOLD = 0.9995  # mergekit's slerp: |cos| above this is treated as colinear
NORM_EPS = 1e-8


def _unit_scale(x: torch.Tensor, eps: float = NORM_EPS) -> float:
    """|x| when it exceeds eps, else 1 (mergekit's slerp leaves near-zero vectors unnormalized)."""
    n = norm64(x)
    return n if n > eps else 1.0


def slerp_tensors(t: float, a: torch.Tensor, b: torch.Tensor, dot_threshold: float = DOT_THRESHOLD) -> torch.Tensor:
    """Spherical interpolation of two whole tensors; t = 0 returns a copy of `a`, t = 1 of `b`, bit-exactly."""
    if t == 0:
        return a.clone()
    if t == 1:
        return b.clone()
    cos = dot64(a, b) / (_unit_scale(a) * _unit_scale(b))
    if abs(cos) > dot_threshold:
        return torch.lerp(a, b, t)  # exact where a == b
    omega = math.acos(max(-1.0, min(1.0, cos)))
    sin_omega = math.sin(omega)
    return a * (math.sin(omega - omega * t) / sin_omega) + b * (math.sin(omega * t) / sin_omega)


@merge_method("slerp")
def slerp(tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict[str, Any],
          rng: torch.Generator) -> torch.Tensor:
    """SLERP from the base (t = 0) to the single other model (t = 1)."""
    t = params["t"]
    if t is None:
        raise BasinError("slerp: parameter 't' is required")
    if base is None or len(tensors) != 1:
        raise BasinError(f"slerp interpolates a base_model and exactly one other model, got {len(tensors)} others"
                         + ("" if base is not None else " and no base"))
    return slerp_tensors(float(t), base, tensors[0])


def nuslerp_tensors(t: float, a: torch.Tensor, b: torch.Tensor, dim: int = -1, flatten: bool = True,
                    eps: float = NORM_EPS) -> torch.Tensor:
    """mergekit's NuSLERP kernel: slerp along `dim` (or of the flattened tensors), linear where sin(Omega) < eps.

    Directions are a / max(|a|, 1e-7); the coefficients sin((1 - t) Omega) / sin(Omega) and sin(t Omega) /
    sin(Omega) (or 1 - t and t for colinear vectors) multiply the raw vectors, one pair per vector.
    """
    shape = a.shape
    if flatten or a.dim() == 0:  # one vector: scalar coefficients
        a, b = a.reshape(-1), b.reshape(-1)
        norms = max(norm64(a), 1e-7) * max(norm64(b), 1e-7)
        omega = math.acos(max(-1.0, min(1.0, dot64(a, b) / norms)))
        sin_omega = math.sin(omega)
        if abs(sin_omega) < eps:
            return (a * (1 - t) + b * t).reshape(shape)
        return (a * (math.sin((1 - t) * omega) / sin_omega) + b * (math.sin(t * omega) / sin_omega)).reshape(shape)
    na = axis_dots64(a, a, dim).sqrt_().clamp_(min=1e-7)  # float64 accumulation, no transposed copies
    nb = axis_dots64(b, b, dim).sqrt_().clamp_(min=1e-7)
    cos = (axis_dots64(a, b, dim) / (na * nb)).clamp_(-1, 1)
    omega = torch.acos(cos)
    sin_omega = torch.sin(omega)
    colinear = sin_omega.abs() < eps
    safe = torch.where(colinear, torch.ones_like(sin_omega), sin_omega)
    ca = torch.where(colinear, torch.full_like(omega, 1 - t), torch.sin((1 - t) * omega) / safe)
    cb = torch.where(colinear, torch.full_like(omega, t), torch.sin(t * omega) / safe)
    return a * ca.to(a.dtype) + b * cb.to(b.dtype)  # coefficients in float64, rounded once to the inputs' dtype


def drop_listed_base(tensors: list[torch.Tensor], weights: list[float], base: torch.Tensor | None,
                     ) -> tuple[list[torch.Tensor], list[float]]:
    """For methods with an optional base: the engine lists the base first among `tensors` when the recipe
    names it under `models:`; mergekit never merges the base with itself, so drop it (and its weight).
    Recognised by equality: a model whose tensor equals the base's exactly is taken for the listed base."""
    if base is not None and len(tensors) > 1 and torch.equal(tensors[0], base):
        return tensors[1:], weights[1:]
    return tensors, weights


@merge_method("nuslerp", optional_base=True)  # base_model is used when given
def nuslerp(tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict[str, Any],
            rng: torch.Generator) -> torch.Tensor:
    """NuSLERP of exactly two models (task vectors when a base is given) at t = w_2 / (w_1 + w_2)."""
    weights = [float(w) for w in params["weight"]]
    if base is not None and len(tensors) == 3:  # the base listed under models: (the engine puts it first)
        tensors, weights = tensors[1:], weights[1:]
    if len(tensors) != 2:
        raise BasinError(f"nuslerp merges exactly two models (plus an optional base_model), got {len(tensors)}")
    total = weights[0] + weights[1]
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    dim = 0 if params["nuslerp_row_wise"] else -1
    flatten = bool(params["nuslerp_flatten"])
    if base is None:
        return nuslerp_tensors(t, tensors[0], tensors[1], dim=dim, flatten=flatten)
    return base + nuslerp_tensors(t, tensors[0] - base, tensors[1] - base, dim=dim, flatten=flatten)



@merge_method("multislerp", optional_base=True)
def multislerp(tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict[str, Any],
               rng: torch.Generator) -> torch.Tensor:
    """Weighted spherical average of N tensors (of their task vectors when a base is given)."""
    tensors, weights = drop_listed_base(tensors, [float(w) for w in params["weight"]], base)
    if len(tensors) == 1:
        return tensors[0].clone()
    eps = float(params["eps"])
    if params["normalize_weights"]:
        total = sum(weights)
        if total == 0:
            raise BasinError("multislerp: the weights sum to zero, cannot normalize_weights")
        weights = [w / total for w in weights]
    vectors = tensors if base is None else [x - base for x in tensors]
    norms = [norm64(x) for x in vectors]
    mean = torch.zeros_like(vectors[0])
    for w, x, n in zip(weights, vectors, norms):
        mean += x * (w / (n + eps))  # product then sum (no fused multiply-add): antipodal pairs cancel exactly
    mean_norm = norm64(mean)
    if mean_norm < eps:
        if len(vectors) != 2:
            raise BasinError("multislerp: the weighted mean of the unit directions is zero (antipodal inputs "
                             "whose weights cancel); change the weights")
        out = vectors[0] * weights[0] + vectors[1] * weights[1]  # mergekit's fallback for two models
    else:
        out = mean.mul_(sum(w * n for w, n in zip(weights, norms)) / mean_norm)
    return out if base is None else out + base



@merge_method("karcher")
def karcher(tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict[str, Any],
            rng: torch.Generator) -> torch.Tensor:
    """Weighted Karcher mean of the tensors' directions on the unit sphere, scaled by the weighted mean norm."""
    if len(tensors) == 1:
        return tensors[0].clone()
    weights = [float(w) for w in params["weight"]]
    total = sum(weights)
    if total <= 0:
        raise BasinError("karcher: the weights sum to zero")
    alphas = [w / total for w in weights]
    max_iter, tol = int(params["max_iter"]), float(params["tol"])
    norms = [norm64(x) for x in tensors]
    valid = [i for i, n in enumerate(norms) if n > tol]
    scale = sum(a * n for a, n in zip(alphas, norms))
    if not valid or sum(alphas[i] for i in valid) == 0:
        return torch.zeros_like(tensors[0])
    valid_total = sum(alphas[i] for i in valid)
    units = [(tensors[i] / norms[i]).reshape(-1) for i in valid]
    coef = [alphas[i] / valid_total for i in valid]
    mean = torch.zeros_like(units[0])
    for c, u in zip(coef, units):
        mean.add_(u, alpha=c)
    mean_norm = norm64(mean)
    mean = units[0].clone() if mean_norm < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for c, u in zip(coef, units):
            cos = max(-1.0, min(1.0, dot64(mean, u)))
            theta = math.acos(cos)
            if theta < tol:
                continue
            k = c * theta / math.sin(theta)
            tangent.add_(u, alpha=k).add_(mean, alpha=-k * cos)
        step = norm64(tangent)
        if step < tol:
            break
        mean = mean * math.cos(step) + tangent * (math.sin(step) / step)
        n = norm64(mean)
        if n > tol:
            mean = mean / n
    return (mean * scale).reshape(tensors[0].shape)
