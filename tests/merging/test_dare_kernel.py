"""DARE's random source and prepare pass: Philox4x32-10 (`merging.methods.philox`) against Random123's published
known-answer vectors and a scalar pure-Python reference written from the paper (Salmon et al. 2011); the compiled
kernel (`_fused.dare_chunk`) against the torch route of `sparsify.random_masks`, bit for bit: the packed masks and
the float64 L1 sums (numpy's buffered pairwise order), on bf16 and float32, odd sizes (the last byte's padding),
chunks of several blocks, 1 and 2 threads, NaN and infinities; the keep rate and independence of the streams."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from merging.methods import kernels, philox, sparsify
from merging.methods.chunking import CHUNK_ELEMENTS, ChunkedInputs

pytestmark = pytest.mark.skipif(not hasattr(kernels.compiled, "dare_chunk"), reason="kernel not built")


def _inputs(n: int, dtype: torch.dtype, seed: int = 0, specials: bool = False):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=g) * 0.02).to(dtype)
    models = [(base.float() + 0.0005 * torch.randn(n, generator=g)).to(dtype) for _ in range(3)]
    if specials and n > 20:
        models[1][3:8] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0], dtype=dtype)
    return models, base


def _torch_route(inputs, keep, key, sums):
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
def test_compiled_dare_masks_and_sums_equal_the_torch_route(n, dtype):
    models, base = _inputs(n, dtype, seed=n)
    inputs = ChunkedInputs(models, base)
    assert sparsify._dare_compiled(inputs)
    keep = [0.5, 0.3, 1.0]  # the last model: no mask
    got = sparsify.random_masks(inputs, keep, 12345, sums=True)
    _same(got, _torch_route(inputs, keep, 12345, sums=True))
    assert got[0][2] == [None] * inputs.num_chunks
    density = float(sparsify.unpack_mask(got[0][0][0], min(n, CHUNK_ELEMENTS)).float().mean())
    assert n < 1000 or abs(density - 0.5) < 0.01


@pytest.mark.parametrize("workers, chunk_blocks, sums", [(1, 1, False), (2, 1, True), (2, 3, True), (1, 2, False)])
def test_compiled_dare_is_independent_of_threads_and_chunk_size(workers, chunk_blocks, sums):
    n = 3 * CHUNK_ELEMENTS + 13
    models, base = _inputs(n, torch.bfloat16, specials=True)
    inputs = ChunkedInputs(models, base, workers, chunk_blocks * CHUNK_ELEMENTS)
    got = sparsify.random_masks(inputs, [0.25, 0.9, 0.6], 7, sums)
    _same(got, _torch_route(inputs, [0.25, 0.9, 0.6], 7, sums))
    single = sparsify.random_masks(ChunkedInputs(models, base), [0.25, 0.9, 0.6], 7, sums)
    whole = [torch.cat([sparsify.unpack_mask(p, CHUNK_ELEMENTS * chunk_blocks) for p in row])[:n] for row in got[0]]
    parts = [torch.cat([sparsify.unpack_mask(p, CHUNK_ELEMENTS) for p in row])[:n] for row in single[0]]
    assert all(torch.equal(a, b) for a, b in zip(whole, parts))
    if sums:
        assert np.isnan(got[1][1]) and got[1][0] == single[1][0]  # NaN flows into the sum as in numpy


KNOWN_ANSWERS = [  # Random123's kat_vectors for philox4x32 10: counter, key, output
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def _philox_scalar(counter, key):
    """Philox4x32-10 on Python integers, one counter at a time (the paper's round: two 32 x 32 -> 64-bit products,
    the halves swapped and xored with the other words and the key; key bumped by the Weyl constants)."""
    x, k = list(counter), list(key)
    for _ in range(10):
        p0, p1 = 0xD2511F53 * x[0], 0xCD9E8D57 * x[2]
        x = [(p1 >> 32) ^ x[1] ^ k[0], p1 & 0xFFFFFFFF, (p0 >> 32) ^ x[3] ^ k[1], p0 & 0xFFFFFFFF]
        k = [(k[0] + 0x9E3779B9) & 0xFFFFFFFF, (k[1] + 0xBB67AE85) & 0xFFFFFFFF]
    return tuple(x)


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_philox_matches_random123s_known_answers(counter, key, expected):
    assert _philox_scalar(counter, key) == expected
    assert tuple(philox.philox4x32(torch.tensor([counter]), key)[0].tolist()) == expected


def test_keep_mask_is_the_scalar_reference_entry_by_entry():
    key, stream, keep = 0x1234_5678_9ABC_DEF0, 3, 0.3
    threshold = philox.keep_threshold(keep)
    assert threshold == int(np.ceil(np.float64(np.float32(keep)) * 2**24))  # u = (r >> 8) 2^-24 < float32(keep)
    k0, k1 = philox.split_key(key)
    start, n = (1 << 33) - 6, 23  # block numbers past 2^32: the counter's high word in use
    expected = []
    for j in range(start, start + n):
        words = _philox_scalar(((j // 4) & 0xFFFFFFFF, (j // 4) >> 32, stream, 0), (k0, k1))
        expected.append((words[j % 4] >> 8) < threshold)
    assert philox.keep_mask(key, stream, start, n, threshold).tolist() == expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_masks_equal_keep_mask_at_any_start(dtype):
    n = 1000
    models, base = _inputs(n, dtype)
    for start in (0, 8, 1 << 20, (1 << 34) + 16):
        out = torch.empty(-(-n // 8), dtype=torch.uint8)
        kernels.compiled.dare_chunk(base.data_ptr(), kernels.DTYPE_CODES[dtype], n, start,
                                    ((models[0].data_ptr(), kernels.DTYPE_CODES[dtype], *philox.split_key(99), 2,
                                      philox.keep_threshold(0.4), out.data_ptr()),), False)
        assert torch.equal(out, sparsify.pack_mask(philox.keep_mask(99, 2, start, n, philox.keep_threshold(0.4))))
    with pytest.raises(ValueError, match="multiple of 8"):
        kernels.compiled.dare_chunk(base.data_ptr(), 0, n, 4, (), False)


def test_masks_keep_at_the_rate_asked_and_streams_are_independent():
    n = 1 << 20
    a = philox.keep_mask(5, 0, 0, n, philox.keep_threshold(0.5)).double()
    b = philox.keep_mask(5, 1, 0, n, philox.keep_threshold(0.5)).double()
    c = philox.keep_mask(6, 0, 0, n, philox.keep_threshold(0.1)).double()
    sigma = (0.25 / n) ** 0.5
    assert abs(a.mean() - 0.5) < 5 * sigma and abs(b.mean() - 0.5) < 5 * sigma
    assert abs(c.mean() - 0.1) < 5 * (0.09 / n) ** 0.5
    assert abs(((a - 0.5) * (b - 0.5)).mean()) < 5 * 0.25 / n ** 0.5  # streams uncorrelated
    assert abs(((a[1:] - 0.5) * (a[:-1] - 0.5)).mean()) < 5 * 0.25 / n ** 0.5  # neighbours uncorrelated
    assert philox.keep_mask(5, 0, 0, 10, 0).sum() == 0 and philox.keep_mask(5, 0, 0, 10, 1 << 24).all()


def test_every_philox_kernel_version_this_processor_has_gives_the_same_masks():
    """The AVX-512, AVX2 and plain C versions (chosen when the module loads) against keep_mask, at a start whose
    blocks cross 2^32 (the counter's high word changes inside a vector) and an odd length."""
    chosen = kernels.compiled.philox_version()
    n, start = 3000 + 5, (1 << 34) - 1000 * 8
    expected = sparsify.pack_mask(philox.keep_mask(42, 1, start, n, philox.keep_threshold(0.3)))
    models, base = _inputs(n, torch.float32)
    ran = []
    try:
        for version in ("avx512f", "avx2", "plain"):
            if not kernels.compiled.philox_use(version):
                continue
            ran.append(version)
            out = torch.empty(-(-n // 8), dtype=torch.uint8)
            kernels.compiled.dare_chunk(base.data_ptr(), 0, n, start, ((models[0].data_ptr(), 0, *philox.split_key(42),
                                        1, philox.keep_threshold(0.3), out.data_ptr()),), False)
            assert torch.equal(out, expected), version
    finally:
        kernels.compiled.philox_use(chosen)
    assert "plain" in ran and kernels.compiled.philox_version() == chosen


def test_philox_numpy_route_equals_the_torch_ops():
    """keep_mask on the CPU runs numpy uint64 products; accelerators run the 16-bit-split int64 torch ops."""
    g = torch.Generator().manual_seed(1)
    counters = torch.randint(0, 2**32, (1000, 4), generator=g, dtype=torch.int64)
    counters[:3] = torch.tensor([[0, 0, 0, 0], [2**32 - 1] * 4, [5, 2**32 - 1, 7, 0]])
    key = (0xA4093822, 0xFFFFFFFF)
    via_numpy = philox._philox4x32_numpy(counters.numpy().astype(np.uint64), key).astype(np.int64)
    assert np.array_equal(via_numpy, philox.philox4x32(counters, key).numpy())
