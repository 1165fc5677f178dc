"""Merging in the recipe's low-precision dtype, as mergekit does (`compute_dtype: float16 | bfloat16`).

By default basin converts every input to float32, merges in float32 and rounds once, to the output
dtype. mergekit instead loads the inputs in the recipe's `dtype` and runs its methods on them: its
generalized task arithmetic (task_arithmetic, ties) computes in that dtype, rounding after every
operation, while its linear and slerp upcast to float32 internally. `compute_dtype` reproduces that, so
a mergekit fp16/bf16 merge can be reproduced bit for bit (verified side by side with mergekit 0.1.5 and
recorded in tests/merging/data/, see benchmarks/mergekit_lowprec_fixture.py):

- linear: inputs rounded to `compute_dtype`; float32 accumulator, one multiply-add per model (torch's
  addcmul_), divided by the float32 sum of the weights, rounded to the inputs' dtype.
- task_arithmetic / ties: in `compute_dtype`: tau_i = x_i - base; TIES keeps each tau_i's
  max(1, int(density n)) largest magnitudes; tau_i *= w_i (the weights rounded to the dtype); sign election
  from sum_i w_i tau_i (zero elects +), agreeing entries summed and divided by the sum of the agreeing
  weights (1 where none agree); the plain sum is divided by sum_i w_i unless |sum| < 1e-8; times lambda
  when lambda != 1; plus the base. The trim ranks magnitudes with the same torch.argsort call as mergekit, so
  entries tied at the threshold fall the same way with the same torch build (argsort is not stable: another
  build may order ties differently).
- slerp: inputs rounded to `compute_dtype`, then mergekit's float32 operation order (`slerp_lowprec`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from merging.dtypes import torch_dtype
from merging.methods.registry import RegisteredMethod
from taxonomy.errors import BasinError

Params = dict[str, Any]
LowFn = Callable[[list[torch.Tensor], "torch.Tensor | None", Params, torch.dtype], torch.Tensor]


def linear_lowprec(tensors: list[torch.Tensor], base: torch.Tensor | None, params: Params,
                   dtype: torch.dtype) -> torch.Tensor:
    """sum_i w_i x_i (/ sum_i w_i), float32 multiply-adds over inputs rounded to `dtype`."""
    weights = torch.tensor([float(w) for w in params["weight"]], dtype=torch.float32)
    out = torch.zeros(tensors[0].shape, dtype=torch.float32)
    for x, w in zip(tensors, weights):
        out.addcmul_(x, w)
    if params["normalize"]:
        out.div_(weights.sum())
    return out.to(dtype)


def _trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim in the tensor's dtype: keep the max(1, int(density n)) largest magnitudes, ranked as mergekit
    ranks them (torch.argsort of the float32 magnitudes, descending), so ties fall as in mergekit."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    mask[torch.argsort(delta.abs().reshape(-1).float(), descending=True)[:k]] = 1
    return delta * mask.reshape(delta.shape)


def _combine(deltas: torch.Tensor, weights: torch.Tensor, consensus: bool, normalize: bool) -> torch.Tensor:
    """mergekit's combine of weighted task vectors (stacked on dim 0) in their dtype."""
    if consensus:
        sign = deltas.sign()
        elected = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
        mask = sign == elected
        mixed = (deltas * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    return mixed / divisor if normalize else mixed


def task_vectors_lowprec(consensus: bool) -> LowFn:
    """task_arithmetic (consensus=False) or ties (True), every operation in the inputs' dtype."""

    def merge(tensors: list[torch.Tensor], base: torch.Tensor | None, params: Params,
              dtype: torch.dtype) -> torch.Tensor:
        if base is None:
            raise BasinError("compute_dtype: this method needs a base model")
        if params.get("rescale") not in (False, None):
            raise BasinError("compute_dtype float16/bfloat16: rescale is not implemented in low precision")
        deltas = base.new_empty((len(tensors), *base.shape))
        for i, x in enumerate(tensors):
            delta = x - base
            deltas[i] = _trim(delta, float(params["density"][i])) if consensus else delta
        weights = torch.tensor([float(w) for w in params["weight"]], dtype=dtype)
        weights = weights.view(-1, *[1] * base.dim())
        deltas.mul_(weights)
        mixed = _combine(deltas, weights, consensus, bool(params["normalize"]))
        if params["lambda"] != 1:
            mixed *= params["lambda"]
        return base + mixed

    return merge


SLERP_CHUNK = 1 << 20  # mergekit's slerp reduces over chunks of this many entries
SLERP_EPS = 1e-8


def _chunks(x: torch.Tensor) -> list[torch.Tensor]:
    return [x[:, i:i + SLERP_CHUNK].float() for i in range(0, x.shape[1], SLERP_CHUNK)]


def slerp_lowprec(tensors: list[torch.Tensor], base: torch.Tensor | None, params: Params,
                  dtype: torch.dtype) -> torch.Tensor:
    """Shoemake 1985 slerp from the base (t = 0) to the other model, in mergekit's float32 operation order:
    norms as the norm of per-chunk norms (1 where <= 1e-8), cos = sum of per-chunk dots of the normalized
    inputs, clamped to [-1, 1]; linear interpolation where |cos| > 0.9995; the result rounded to `dtype`."""
    if base is None or len(tensors) != 1:
        raise BasinError(f"slerp merges a base_model with exactly one other model, got {len(tensors)} others")
    a, b = base.reshape(1, -1), tensors[0].reshape(1, -1)
    t = torch.tensor([[float(params["t"])]], dtype=torch.float32)
    if not a.shape[1]:
        return ((1 - t) * a + t * b).reshape(base.shape).to(dtype)
    norms = []
    for x in (a, b):
        n = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(c, dim=1, keepdim=True)
                                                  for c in _chunks(x)]), dim=0)
        norms.append(torch.where(n > SLERP_EPS, n, 1))
    dot = torch.stack([((x / norms[0]) * (y / norms[1])).sum(dim=1, keepdim=True)
                       for x, y in zip(_chunks(a), _chunks(b))]).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > 0.9995
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    out = torch.empty_like(a, dtype=dtype)
    for i, (x, y) in zip(range(0, a.shape[1], SLERP_CHUNK), zip(_chunks(a), _chunks(b))):
        out[:, i:i + SLERP_CHUNK] = coef_a * x + coef_b * y
    return out.reshape(base.shape)


LOW_PRECISION: dict[str, LowFn] = {
    "linear": linear_lowprec,
    "task_arithmetic": task_vectors_lowprec(consensus=False),
    "ties": task_vectors_lowprec(consensus=True),
    "slerp": slerp_lowprec,
}


def check_supported(method: str, where: str = "recipe") -> None:
    """BasinError unless `method` has a low-precision (mergekit-order) form."""
    if method not in LOW_PRECISION:
        raise BasinError(f"{where}: compute_dtype float16/bfloat16 (mergekit's low-precision arithmetic) is "
                         f"implemented for {sorted(LOW_PRECISION)}, not {method!r}; use compute_dtype: float32")


def low_precision_method(method: RegisteredMethod, compute_dtype: str | None) -> RegisteredMethod:
    """`method` itself, or for compute_dtype float16/bfloat16 its mergekit-order form as a (whole-tensor)
    method: the engine's float32 copies of the inputs round exactly back to their stored values."""
    if compute_dtype is None or compute_dtype == "float32":
        return method
    dtype = torch_dtype(compute_dtype)
    name = method.info.name
    check_supported(name)

    def fn(tensors: list[torch.Tensor], base: torch.Tensor | None, params: Params, rng: torch.Generator
           ) -> torch.Tensor:
        return merge_lowprec(name, tensors, base, params, dtype)

    return RegisteredMethod(method.info, fn)  # whole-tensor: no chunks, no kernel


def merge_lowprec(method: str, tensors: list[torch.Tensor], base: torch.Tensor | None, params: Params,
                  dtype: torch.dtype) -> torch.Tensor:
    """Round the inputs to `dtype` and merge them with `method`'s mergekit-order form; result in `dtype`."""
    check_supported(method)
    low = [t.to(dtype) for t in tensors]
    return LOW_PRECISION[method](low, None if base is None else base.to(dtype), params, dtype)
