"""Whole-tensor reductions accumulated in float64, in fixed chunks: dots, norms, distances, per-row dots.

A float32 dot product over a large tensor loses digits (torch.dot over the 11.7M-entry word embeddings of
all-MiniLM-L6-v2 and a perturbed copy is off by a relative 1.1e-4). Here each chunk of `REDUCTION_CHUNK`
entries is copied into a float64 buffer, where the product of two float32 (or bfloat16) entries is exact,
summed with numpy's pairwise sum on the CPU (independent of the thread count: bit-identical reruns), and the
chunk sums are added with math.fsum (correctly rounded). Memory stays bounded: one float64 buffer per
operand, never a float64 copy of a whole tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch

REDUCTION_CHUNK = 1 << 16  # entries per float64 buffer: 512 kB, cache-sized


def _spans(n: int, chunk: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, chunk):
        yield start, min(n, start + chunk)


def _fill(buffer: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Copy `source` into float64 `buffer` (numpy's cast on the CPU where it can read the dtype: faster)."""
    if buffer.device.type == "cpu" and source.dtype in (torch.float32, torch.float64):
        np.copyto(buffer.numpy(), source.numpy())
        return buffer
    return buffer.copy_(source)


def _reduce(tensors: list[torch.Tensor], combine: Callable[..., object], chunk: int) -> float:
    """math.fsum over chunks of sum(combine(*float64 chunks)); `combine` may overwrite its arguments. On the CPU
    it gets numpy arrays and the sums are numpy's pairwise sums (independent of thread counts), elsewhere tensors."""
    return math.fsum(_parts(tensors, combine, chunk))


def square_parts64(x: torch.Tensor, chunk: int = REDUCTION_CHUNK) -> list[float]:
    """The float64 sums of x_j^2 over each `chunk` entries of flat x, whose math.fsum is `sum_squares64(x)`: a
    tensor's sum of squares from its pieces, each piece starting at a multiple of `chunk` (fsum's correct rounding
    makes the result independent of the order the parts come in)."""
    return _parts([x], _square, chunk)


def _parts(tensors: list[torch.Tensor], combine: Callable[..., object], chunk: int) -> list[float]:
    """[sum(combine(*float64 chunks)) per chunk], see `_reduce`."""
    flats = [t.detach().reshape(-1) for t in tensors]
    n = flats[0].numel()
    if any(f.numel() != n for f in flats):
        raise ValueError(f"float64 reduction over tensors of {[f.numel() for f in flats]} entries")
    cpu = flats[0].device.type == "cpu"
    buffers = [torch.empty(min(chunk, n), dtype=torch.float64, device=flats[0].device) for _ in flats]
    parts = []
    for start, stop in _spans(n, chunk):
        chunks = [_fill(b[:stop - start], f[start:stop]) for b, f in zip(buffers, flats)]
        parts.append(float(combine(*[c.numpy() for c in chunks] if cpu else chunks).sum()))
    return parts


def _product(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    x *= y
    return x


def _square(x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    x *= x
    return x


def _squared_difference(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    x -= y
    x *= x
    return x


def dot64(a: torch.Tensor, b: torch.Tensor, chunk: int = REDUCTION_CHUNK) -> float:
    """<a, b> over all entries (any shapes of equal size), accumulated in float64."""
    return _reduce([a, b], _product, chunk)


def sum_squares64(x: torch.Tensor, chunk: int = REDUCTION_CHUNK) -> float:
    """sum_j x_j^2 in float64."""
    return _reduce([x], _square, chunk)


def norm64(x: torch.Tensor, chunk: int = REDUCTION_CHUNK) -> float:
    """The Euclidean (Frobenius) norm of all entries, accumulated in float64."""
    return math.sqrt(sum_squares64(x, chunk))


def distance64(a: torch.Tensor, b: torch.Tensor, chunk: int = REDUCTION_CHUNK) -> float:
    """|a - b| over all entries; differences taken in float64 (exact for float32 inputs)."""
    return math.sqrt(_reduce([a, b], _squared_difference, chunk))


def _row_totals(x: torch.Tensor) -> torch.Tensor:
    """Per-row sums of a contiguous float64 matrix (numpy's pairwise sum along each row on the CPU)."""
    if x.device.type != "cpu":
        return x.sum(-1)
    return torch.from_numpy(x.numpy().sum(-1))


def _row_block_products(a2: torch.Tensor, b2: torch.Tensor, chunk: int):
    """(start, stop, a2[start:stop] * b2[start:stop] in float64) for blocks of about `chunk` entries (one row at
    least), the products formed in two reused float64 buffers."""
    rows, columns = a2.shape
    step = max(1, chunk // max(1, columns))
    buffers = [torch.empty(min(step, rows), columns, dtype=torch.float64, device=a2.device) for _ in range(2)]
    for start, stop in row_blocks(rows, columns, chunk):
        x, y = (_fill(buffer[:stop - start], t[start:stop]) for buffer, t in zip(buffers, (a2, b2)))
        if x.device.type == "cpu":
            _product(x.numpy(), y.numpy())  # in place, numpy's loop: faster than torch's on small blocks
        else:
            x.mul_(y)
        yield start, stop, x


def row_dots64(a: torch.Tensor, b: torch.Tensor, chunk: int = REDUCTION_CHUNK) -> torch.Tensor:
    """Float64 dot products along the last dimension, shape a.shape[:-1]."""
    a2, b2 = a.detach().reshape(-1, a.shape[-1]), b.detach().reshape(-1, b.shape[-1])
    out = torch.empty(a2.shape[0], dtype=torch.float64, device=a.device)
    for start, stop, products in _row_block_products(a2, b2, chunk):
        out[start:stop] = _row_totals(products)
    return out.reshape(a.shape[:-1])


def axis_dots64(a: torch.Tensor, b: torch.Tensor, dim: int = -1, chunk: int = REDUCTION_CHUNK) -> torch.Tensor:
    """Float64 dot products of the vectors along `dim` (0 or the last), keeping `dim` with size 1. Along dim 0 the
    products of blocks of rows are added block after block into float64 column sums (no transposed copy)."""
    if dim in (-1, a.dim() - 1):
        return row_dots64(a, b, chunk).unsqueeze(-1)
    if dim != 0:
        raise ValueError(f"axis_dots64: dim must be 0 or -1, got {dim}")
    a2, b2 = a.detach().reshape(a.shape[0], -1), b.detach().reshape(b.shape[0], -1)
    total = torch.zeros(a2.shape[1], dtype=torch.float64, device=a.device)
    for _, _, products in _row_block_products(a2, b2, chunk):
        total += torch.from_numpy(products.numpy().sum(0)) if products.device.type == "cpu" else products.sum(0)
    return total.reshape(1, *a.shape[1:])


def row_norms64(x: torch.Tensor, chunk: int = REDUCTION_CHUNK) -> torch.Tensor:
    """Float64 Euclidean norms along the last dimension (shape x.shape[:-1])."""
    return row_dots64(x, x, chunk).sqrt_()


def row_blocks(rows: int, columns: int, chunk: int = REDUCTION_CHUNK) -> Iterator[tuple[int, int]]:
    """Spans of consecutive rows holding about `chunk` entries (one row at least)."""
    return _spans(rows, max(1, chunk // max(1, columns)))


def row_sums64(x: torch.Tensor) -> torch.Tensor:
    """Float64 sums along the last dimension of a float64 tensor (pairwise, thread-count independent on the CPU)."""
    flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float64, memory_format=torch.contiguous_format)
    return _row_totals(flat).reshape(x.shape[:-1])


def column_mean_std64(x: torch.Tensor, chunk: int = REDUCTION_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column mean and population standard deviation of a 2-D tensor, two passes over blocks of rows in
    float64 (the centred second pass avoids E[x^2] - E[x]^2's cancellation); float64 results."""
    x = x.detach()
    rows = max(1, x.shape[0])
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for start, stop in row_blocks(x.shape[0], x.shape[1], chunk):
        total += x[start:stop].to(torch.float64).sum(0)
    mean = total / rows
    squares = torch.zeros_like(mean)
    for start, stop in row_blocks(x.shape[0], x.shape[1], chunk):
        squares += (x[start:stop].to(torch.float64) - mean).square_().sum(0)
    return mean, (squares / rows).sqrt_()
