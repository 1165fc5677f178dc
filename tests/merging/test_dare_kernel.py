"""DARE's prepare pass in the compiled kernel (`_fused.dare_chunk`) against the numpy route of
`sparsify.random_masks`, bit for bit: the packed masks (numpy's PCG64 streams, 8 lanes jumped apart in C) and the
float64 L1 sums (numpy's buffered pairwise order), on bf16 and float32, odd sizes (the last byte's padding), chunks
of several blocks, 1 and 2 threads, NaN and infinities."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from merging.methods import kernels, sparsify
from merging.methods.chunking import CHUNK_ELEMENTS, ChunkedInputs

pytestmark = pytest.mark.skipif(not hasattr(kernels.compiled, "dare_chunk"), reason="kernel not built")


def _inputs(n: int, dtype: torch.dtype, seed: int = 0, specials: bool = False):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=g) * 0.02).to(dtype)
    models = [(base.float() + 0.0005 * torch.randn(n, generator=g)).to(dtype) for _ in range(3)]
    if specials and n > 20:
        models[1][3:8] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0], dtype=dtype)
    return models, base


def _numpy_route(inputs, keep, key, sums):
    saved, sparsify.kernels.compiled = kernels.compiled, None
    try:
        return sparsify.random_masks(inputs, keep, key, sums)
    finally:
        sparsify.kernels.compiled = saved


def _same(a, b) -> None:
    masks_a, totals_a, kept_a = a
    masks_b, totals_b, kept_b = b
    assert np.array_equal(np.array(totals_a), np.array(totals_b), equal_nan=True)
    assert np.array_equal(np.array(kept_a), np.array(kept_b), equal_nan=True)
    for row_a, row_b in zip(masks_a, masks_b):
        assert len(row_a) == len(row_b)
        for x, y in zip(row_a, row_b):
            assert (x is None) == (y is None)
            assert x is None or torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [1, 7, 9, 15, 16, 17, 8191, 8193, CHUNK_ELEMENTS, CHUNK_ELEMENTS + 9])
def test_compiled_dare_masks_and_sums_equal_the_numpy_route(n, dtype):
    models, base = _inputs(n, dtype, seed=n)
    inputs = ChunkedInputs(models, base)
    assert sparsify._dare_compiled(inputs)
    keep = [0.5, 0.3, 1.0]  # the last model: no mask
    got = sparsify.random_masks(inputs, keep, 12345, sums=True)
    _same(got, _numpy_route(inputs, keep, 12345, sums=True))
    assert got[0][2] == [None] * inputs.num_chunks
    density = float(sparsify.unpack_mask(got[0][0][0], min(n, CHUNK_ELEMENTS)).float().mean())
    assert n < 1000 or abs(density - 0.5) < 0.01


@pytest.mark.parametrize("workers, chunk_blocks, sums", [(1, 1, False), (2, 1, True), (2, 3, True), (1, 2, False)])
def test_compiled_dare_is_independent_of_threads_and_chunk_size(workers, chunk_blocks, sums):
    n = 3 * CHUNK_ELEMENTS + 13
    models, base = _inputs(n, torch.bfloat16, specials=True)
    inputs = ChunkedInputs(models, base, workers, chunk_blocks * CHUNK_ELEMENTS)
    got = sparsify.random_masks(inputs, [0.25, 0.9, 0.6], 7, sums)
    _same(got, _numpy_route(inputs, [0.25, 0.9, 0.6], 7, sums))
    single = sparsify.random_masks(ChunkedInputs(models, base), [0.25, 0.9, 0.6], 7, sums)
    whole = [torch.cat([sparsify.unpack_mask(p, CHUNK_ELEMENTS * chunk_blocks) for p in row])[:n] for row in got[0]]
    parts = [torch.cat([sparsify.unpack_mask(p, CHUNK_ELEMENTS) for p in row])[:n] for row in single[0]]
    assert all(torch.equal(a, b) for a, b in zip(whole, parts))
    if sums:
        assert np.isnan(got[1][1]) and got[1][0] == single[1][0]  # NaN flows into the sum as in numpy


def test_pcg64_states_continue_numpys_stream():
    """What the kernel starts from is the generator's state: its first raw output is one LCG step away."""
    state = sparsify.pcg64_states(3, 1, range(5, 6))[0]
    s = (int(state[0]) << 64) | int(state[1])
    inc = (int(state[2]) << 64) | int(state[3])
    s = (s * 0x2360ED051FC65DA44385DF649FCCF645 + inc) % 2**128
    x, rot = ((s >> 64) ^ s) % 2**64, s >> 122
    expected = ((x >> rot) | (x << (64 - rot))) % 2**64
    assert int(sparsify.chunk_generator(3, 1, 5).bit_generator.random_raw()) == expected
