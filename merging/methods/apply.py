"""Merging one tensor name at a time: seeding, parameter broadcast, dtype handling.

The streaming engine and the in-memory `merging.modelwise.state_dicts.merge_state_dicts` share these, so a
merge of small models in memory and a streamed merge of the same inputs are bit-identical.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from merging.io.lora import LoraTensor
from merging.methods.chunking import CHUNK_ELEMENTS, run_chunked
from merging.methods.registry import RegisteredMethod
from taxonomy.errors import BasinError


def tensor_rng(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from (recipe seed, tensor name): independent of order and threads."""
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def full_params(method: RegisteredMethod, params: Mapping[str, Any] | None, n_models: int) -> dict[str, Any]:
    """Fill defaults, check names and ranges, broadcast per-model scalars to lists of `n_models`."""
    return method.info.resolve(dict(params or {}), n_models)


def merge_tensor(
    method: RegisteredMethod,
    name: str,
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    params: dict[str, Any],
    seed: int,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Merge one tensor: float32 compute, result cast to `out_dtype` (default: the first input's)."""
    if method.info.needs_lora:
        return _merge_lora(method, name, tensors, base, params, seed, out_dtype)
    first = _checked_first(name, tensors, base)
    dtype = out_dtype or first.dtype
    if not first.is_floating_point():  # integer buffers (position ids, counters): take the base's
        return (base if base is not None else first).clone()
    rng = tensor_rng(seed, name)
    try:
        large_on_cpu = first.numel() > CHUNK_ELEMENTS and first.device.type == "cpu"
        if method.two_phase or (method.chunked and large_on_cpu):
            return run_chunked(method, tensors, base, params, rng, dtype)
        f32 = [t.to(torch.float32) for t in tensors]
        b32 = base.to(torch.float32) if base is not None else None
        return method.fn(f32, b32, params, rng).to(dtype)
    except BasinError as err:  # the method's message, prefixed with the tensor it was merging
        raise BasinError(str(err) if str(err).startswith(name) else f"{name}: {err}") from None


def _checked_first(name: str, tensors: Sequence[torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
    """The first input (the base when there are none), after checking every input has its shape."""
    first = tensors[0] if tensors else base
    if first is None:
        raise BasinError(f"{name}: no inputs to merge")
    for i, t in enumerate(tensors):
        if t.shape != first.shape:
            raise BasinError(f"{name}: model {i} has shape {tuple(t.shape)}, expected {tuple(first.shape)}")
    if base is not None and base.shape != first.shape:
        raise BasinError(f"{name}: base has shape {tuple(base.shape)}, models have {tuple(first.shape)}")
    return first


def merge_tensor_parts(
    method: RegisteredMethod,
    name: str,
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    params: dict[str, Any],
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor | None] | torch.Tensor:
    """`merge_tensor` of a method with `scaled` parts, before lambda: the float32 (anchor, delta), or, for a
    non-floating tensor, the tensor every lambda's merge holds. `scaled_sum(parts, lambda).to(dtype)` is then
    `merge_tensor`'s result, bit for bit."""
    if method.scaled is None or method.chunked or method.info.needs_lora:
        raise BasinError(f"method {method.info.name!r} has no lambda-free parts")
    first = _checked_first(name, tensors, base)
    if not first.is_floating_point():
        return (base if base is not None else first).clone()
    f32 = [t.to(torch.float32) for t in tensors]
    b32 = base.to(torch.float32) if base is not None else None
    try:
        return method.scaled(f32, b32, params, tensor_rng(seed, name))
    except BasinError as err:
        raise BasinError(str(err) if str(err).startswith(name) else f"{name}: {err}") from None


def _merge_lora(method: RegisteredMethod, name: str, inputs: Sequence[Any], base: torch.Tensor | None,
                params: dict[str, Any], seed: int, out_dtype: torch.dtype | None) -> torch.Tensor:
    """Merge one tensor of a method that reads LoRA factors (KnOTS): `inputs` are `merging.io.lora.LoraTensor`s,
    float32 compute, the result cast to `out_dtype` (default: the base's)."""
    if base is None:
        raise BasinError(f"{name}: method {method.info.name!r} needs the base model's tensor")
    if not base.is_floating_point():
        return base.clone()
    for i, x in enumerate(inputs):
        full = getattr(x, "full", None)
        if full is not None and full.shape != base.shape:
            raise BasinError(f"{name}: model {i} has shape {tuple(full.shape)}, the base {tuple(base.shape)}")
    inputs32 = [x.map(lambda t: t.to(torch.float32)) if isinstance(x, LoraTensor) else x for x in inputs]
    try:
        return method.fn(inputs32, base.to(torch.float32), params, tensor_rng(seed, name)).to(out_dtype or base.dtype)
    except BasinError as err:
        raise BasinError(str(err) if str(err).startswith(name) else f"{name}: {err}") from None
