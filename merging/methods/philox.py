"""Philox4x32-10 (Salmon, Moraes, Dror and Shaw 2011, "Parallel random numbers: as easy as 1, 2, 3", SC '11):
a counter-based generator, the random source of DARE's and DELLA's drop masks (`keep_mask`, `uniforms`).

Block b of stream s under a 64-bit key is a pure function of (key, s, b): four 32-bit words from the counter
(b mod 2^32, b div 2^32, s, 0) after ten rounds of the Philox S-box with the key bumped by the Weyl constants
between rounds. Entry j of a mask is word j mod 4 of block j div 4, so any entry's draw is computed on its own:
a mask is the same for any chunk size, thread count or device, and the compiled kernels (_fused.c `dare_chunk`,
`della_chunk`) compute the same words. Integer ops only, exact on every device; the 32 x 32 -> 64-bit products
are split into 16-bit halves so that int64 tensors never overflow.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
WEYL = (0x9E3779B9, 0xBB67AE85)
ROUNDS = 10
_LOW32 = 0xFFFFFFFF
_PIECE = 1 << 20  # entries per torch evaluation: bounds the int64 temporaries (~10 x 8 bytes per entry)


def _mulhilo(multiplier: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of multiplier * x for int64 tensors holding uint32 values, without overflow."""
    low_half, high_half = x & 0xFFFF, x >> 16
    p_low, p_high = low_half * multiplier, high_half * multiplier  # each < 2^48
    return ((p_low >> 16) + p_high) >> 16, (p_low + ((p_high & 0xFFFF) << 16)) & _LOW32


def philox4x32(counters: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
    """Philox4x32-10 of each row of `counters` (int64, shape (..., 4), uint32 values) under `key` (two uint32):
    int64 words of the same shape."""
    x0, x1, x2, x3 = counters.unbind(-1)
    k0, k1 = key
    for _ in range(ROUNDS):
        hi0, lo0 = _mulhilo(MULTIPLIERS[0], x0)
        hi1, lo1 = _mulhilo(MULTIPLIERS[1], x2)
        x0, x1, x2, x3 = hi1 ^ x1 ^ k0, lo1, hi0 ^ x3 ^ k1, lo0
        k0, k1 = (k0 + WEYL[0]) & _LOW32, (k1 + WEYL[1]) & _LOW32
    return torch.stack((x0, x1, x2, x3), dim=-1)


def _philox4x32_numpy(counters: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """`philox4x32` in numpy uint64 (the CPU route without the compiled kernel): the products of two uint32 fit
    in uint64, so no split is needed."""
    x0, x1, x2, x3 = (counters[:, w].copy() for w in range(4))
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    m0, m1, low, shift = np.uint64(MULTIPLIERS[0]), np.uint64(MULTIPLIERS[1]), np.uint64(_LOW32), np.uint64(32)
    for _ in range(ROUNDS):
        p0, p1 = x0 * m0, x2 * m1
        x0, x1, x2, x3 = (p1 >> shift) ^ x1 ^ k0, p1 & low, (p0 >> shift) ^ x3 ^ k1, p0 & low
        k0, k1 = (k0 + np.uint64(WEYL[0])) & low, (k1 + np.uint64(WEYL[1])) & low
    return np.stack((x0, x1, x2, x3), axis=-1)


def keep_threshold(keep: float) -> int:
    """The 24-bit threshold of Bernoulli(keep): a word r keeps its entry when (r >> 8) < threshold, which is the
    float32 uniform (r >> 8) 2^-24 < float32(keep)."""
    return math.ceil(float(torch.tensor(keep, dtype=torch.float32)) * 2**24)


def split_key(key: int) -> tuple[int, int]:
    """A 64-bit key as Philox's two 32-bit key words."""
    return key & _LOW32, (key >> 32) & _LOW32


def draw_key(rng: torch.Generator) -> int:
    """A tensor's 64-bit Philox key, drawn from its generator (DARE's and DELLA's masks: one draw per tensor)."""
    return int(torch.randint(0, 2**62, (1,), generator=rng))


def _words(key: int, stream: int, start: int, n: int, device: torch.device | str
           ) -> Iterator[tuple[int, torch.Tensor]]:
    """(offset, int64 words) for entries [start, start + n) of stream `stream` under `key`, piece by piece."""
    words = split_key(key)
    on_cpu = torch.device(device).type == "cpu"
    for piece in range(start, start + n, _PIECE):
        stop = min(start + n, piece + _PIECE)
        first = piece // 4
        blocks = torch.arange(first, -(-stop // 4), dtype=torch.int64, device=device)
        counters = torch.stack((blocks & _LOW32, blocks >> 32, torch.full_like(blocks, stream),
                                torch.zeros_like(blocks)), dim=-1)
        if on_cpu:
            drawn = torch.from_numpy(_philox4x32_numpy(counters.numpy().astype(np.uint64), words).astype(np.int64))
        else:
            drawn = philox4x32(counters, words)
        yield piece - start, drawn.reshape(-1)[piece - 4 * first:stop - 4 * first]


def keep_mask(key: int, stream: int, start: int, n: int, threshold: int,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """Entries [start, start + n) of stream `stream`'s Bernoulli mask under `key`, as bools on `device`."""
    out = torch.empty(n, dtype=torch.bool, device=device)
    for offset, drawn in _words(key, stream, start, n, device):
        out[offset:offset + drawn.numel()] = (drawn >> 8) < threshold
    return out


def uniforms(key: int, stream: int, start: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Entries [start, start + n) of stream `stream`'s float32 uniforms on [0, 1) under `key`: u = (r >> 8) 2^-24
    (exact), r the entry's word (DELLA's draws: kept where u < the keep probability; `keep_mask` is u <
    float32(keep))."""
    out = torch.empty(n, dtype=torch.float32, device=device)
    for offset, drawn in _words(key, stream, start, n, device):
        out[offset:offset + drawn.numel()] = (drawn >> 8).to(torch.float32).mul_(2.0**-24)
    return out
