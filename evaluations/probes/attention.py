"""Attention through its composite "math" kernels, for every probe that differentiates twice or forward.

`nn.TransformerEncoderLayer` / `nn.MultiheadAttention` fast paths and fused scaled-dot-product kernels have no
double-backward (Hessian-vector products) or forward-mode (`jvp`) rules on CPU, and round differently from the
reference computation; the math backend's ops have all of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Inside the block: MHA fast paths off, scaled dot-product attention on the math backend."""
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was)
