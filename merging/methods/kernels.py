"""The compiled kernels of merging/methods/_fused.c, and what they can read.

`compiled` is the extension module, or None where it was not built (setup.py marks it optional: without a C
compiler basin runs the same merges in torch ops, with the same bits, only slower). Callers read
`kernels.compiled` at call time, so tests can switch it off to compare the two paths.
"""

from __future__ import annotations

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
