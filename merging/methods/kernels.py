"""The compiled kernels of merging/methods/_fused.c, and what they can read.

`compiled` is the extension module, or None where it was not built (setup.py marks it optional: without a C
compiler basin runs the same merges in torch ops, with the same bits, only slower). Callers read
`kernels.compiled` at call time, so tests can switch it off to compare the two paths.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

try:
    from merging.methods import _fused as compiled
except ImportError:  # pragma: no cover - a build without a C compiler
    compiled = None

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}  # as in _fused.c
POST_NONE, POST_DIVIDE, POST_MULTIPLY = 0, 1, 2  # the rescale after the trim, as in _fused.c


def readable(tensors: list[torch.Tensor | None], numel: int) -> bool:
    """Whether the kernels can read these: built, and every tensor a contiguous float32 or bf16 CPU tensor of
    `numel` entries."""
    return compiled is not None and all(
        t is not None and t.device.type == "cpu" and t.dtype in DTYPE_CODES and t.is_contiguous()
        and t.numel() == numel for t in tensors)


def address(t: torch.Tensor, start: int = 0) -> int:
    """The address of entry `start` of contiguous `t`."""
    return t.data_ptr() + start * t.element_size()


ELECT_MAGMAX, ELECT_CONSENSUS, ELECT_EMR, ELECT_RAM = 0, 1, 2, 3  # elect_chunk's kinds, as in _fused.c


def elect(kind: int, inputs: Any, fallback: Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor],
          a: float = 0.0, b: float = 0.0, k: int = 0) -> Callable[[int, torch.Tensor], torch.Tensor] | None:
    """The compiled `elect_chunk` of an elementwise election over task vectors (MagMax, consensus TA, EMR, RAM) as
    `run_chunked`'s kernel(chunk, out), or None where it does not apply (`inputs` a ChunkedInputs). A chunk holding
    a value that is not finite is merged by `fallback(float32 chunks, float32 base chunk)`, the method's torch ops
    (NaN bits are theirs)."""
    if compiled is None or not hasattr(compiled, "elect_chunk") or inputs.base is None \
            or not 1 <= len(inputs.tensors) <= 64 or not readable(inputs.tensors + [inputs.base], inputs.numel):
        return None
    base, tensors = inputs.base, inputs.tensors

    def kernel(chunk: int, out: torch.Tensor) -> torch.Tensor:
        start, stop = inputs.span(chunk)
        models = tuple((address(t, start), DTYPE_CODES[t.dtype]) for t in tensors)
        if compiled.elect_chunk(kind, out.data_ptr(), stop - start, (address(base, start), DTYPE_CODES[base.dtype]),
                                models, float(a), float(b), int(k)):
            return out
        return out.copy_(fallback([t[start:stop].to(torch.float32) for t in tensors],
                                  base[start:stop].to(torch.float32)))

    return kernel
