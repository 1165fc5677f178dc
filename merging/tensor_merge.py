"""Merging one tensor name at a time: seeding, parameter broadcast, dtype handling.

The streaming engine and the in-memory `merge_state_dicts` share these, so a merge of small
models in memory and a streamed merge of the same inputs are bit-identical.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from merging.methods.chunking import CHUNK_ELEMENTS, is_two_phase, run_chunked
from merging.methods.registry import RegisteredMethod, get_method
from taxonomy.errors import BasinError


def tensor_rng(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from (recipe seed, tensor name): independent of order and threads."""
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def full_params(method: RegisteredMethod, params: Mapping[str, Any] | None, n_models: int) -> dict[str, Any]:
    """Fill defaults, check names and ranges, broadcast per-model scalars to lists of `n_models`."""
    info = method.info
    out = info.defaults()
    for key, value in (params or {}).items():
        info.param(key)  # raises BasinError for unknown parameter names
        out[key] = value
    for p in info.params:
        value = out[p.name]
        if p.per_model:
            if not isinstance(value, (list, tuple)):
                value = [value] * n_models
            if len(value) != n_models:
                raise BasinError(
                    f"{info.name}: parameter {p.name!r} has {len(value)} values for {n_models} models"
                )
            for i, v in enumerate(value):
                p.check(v, f"{info.name}: model {i}")
            out[p.name] = list(value)
        else:
            p.check(value, info.name)
    return out


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
    first = tensors[0] if tensors else base
    if first is None:
        raise BasinError(f"{name}: no inputs to merge")
    dtype = out_dtype or first.dtype
    if not first.is_floating_point():  # integer buffers (position ids, counters): take the base's
        return (base if base is not None else first).clone()
    for i, t in enumerate(tensors):
        if t.shape != first.shape:
            raise BasinError(f"{name}: model {i} has shape {tuple(t.shape)}, expected {tuple(first.shape)}")
    if base is not None and base.shape != first.shape:
        raise BasinError(f"{name}: base has shape {tuple(base.shape)}, models have {tuple(first.shape)}")
    rng = tensor_rng(seed, name)
    try:
        large_on_cpu = first.numel() > CHUNK_ELEMENTS and first.device.type == "cpu"
        if is_two_phase(method.fn) or (is_elementwise(method) and large_on_cpu):
            return run_chunked(method.fn, tensors, base, params, rng, dtype)
        f32 = [t.to(torch.float32) for t in tensors]
        b32 = base.to(torch.float32) if base is not None else None
        return method.fn(f32, b32, params, rng).to(dtype)
    except BasinError as err:  # the method's message, prefixed with the tensor it was merging
        raise BasinError(str(err) if str(err).startswith(name) else f"{name}: {err}") from None


def is_elementwise(method: RegisteredMethod) -> bool:
    """Whether `method` runs on cache-sized chunks (`fn.elementwise`, or a two-phase `fn.prepare`/`fn.apply`)."""
    return bool(getattr(method.fn, "elementwise", False)) or is_two_phase(method.fn)


def merge_state_dicts(
    method: str,
    models: Sequence[Mapping[str, torch.Tensor]],
    base: Mapping[str, torch.Tensor] | None = None,
    params: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Merge in-memory state dicts with a registered tensorwise method (small models, notebooks).

    `models` excludes the base for methods that need one; per-model parameters are lists aligned
    with `models` or scalars.
    """
    m = get_method(method)
    if m.info.needs_base and base is None:
        raise BasinError(f"method {method!r} needs a base model")
    if len(models) < m.info.min_models:
        raise BasinError(f"method {method!r} needs at least {m.info.min_models} models, got {len(models)}")
    if m.info.max_models is not None and len(models) > m.info.max_models:
        raise BasinError(f"method {method!r} takes at most {m.info.max_models} models, got {len(models)}")
    resolved = full_params(m, params, len(models))
    names = list(models[0].keys())
    for i, sd in enumerate(models[1:], start=1):
        if set(sd) != set(names):
            missing = sorted(set(names) - set(sd))[:5]
            extra = sorted(set(sd) - set(names))[:5]
            raise BasinError(f"model {i} tensor names differ from model 0: missing {missing}, extra {extra}")
    if base is not None and set(base) != set(names):
        lacks = sorted(set(names) - set(base))[:5]
        extra = sorted(set(base) - set(names))[:5]
        raise BasinError(f"base tensor names differ from the models': base lacks {lacks}, models lack {extra}")
    return {
        name: merge_tensor(m, name, [sd[name] for sd in models], None if base is None else base[name], resolved, seed)
        for name in names
    }
