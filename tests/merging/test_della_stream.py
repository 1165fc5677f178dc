"""DELLA's streamed MagPrune (issue 26): entry j of model i is kept when the float32 uniform of Philox's word for
(a key drawn from the tensor's generator, stream i, entry j) is below the entry's keep probability from its per-row
magnitude rank, so each range of rows is drawn on its own (sparsify.magprune_masks). Checked: the uniforms against
the scalar Philox reference; the compiled `della_chunk` against the torch route (packed masks, L1 sums, keep
probabilities) and the keep probabilities against a stable sort; the L1 sums against numpy's whole-tensor sum; the
streamed merge against the whole-tensor `generalized_task_arithmetic`, bit for bit (bf16 and float32; 1-D, 2-D and
>2-D; rows cut by chunk borders and rows wider than a chunk; widths 1 and 2; tied magnitudes; 1 and 2 threads; two
chunk sizes; kernel on and off; rescale true, unbiased and false; della and della_linear); the keep rate within a
binomial bound; what `prepare` holds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from merging.methods import kernels, philox, sparsify
from merging.methods.apply import full_params, tensor_rng
from merging.methods.catalog import get_method
from merging.methods.chunking import CHUNK_ELEMENTS, ChunkedInputs, run_chunked
from merging.methods.task_arithmetic import generalized_task_arithmetic
from tests.merging.conftest import kernel_off
from tests.merging.test_dare_kernel import _philox_scalar

compiled = pytest.mark.skipif(not hasattr(kernels.compiled, "della_chunk"), reason="kernel not built")

# rows cut by chunk borders (5003, 100003 wide: groups of chunks), one row over several chunks, widths 1 and 2
SHAPES = [(37, 53), (301,), (1,), (), (5, 1), (2, 3, 7), (70, 5003), (600001,), (3, 100003), (300001, 1),
          (150001, 2), (2, 3, 50001)]
EMPTY = [(0,), (0, 4), (3, 0)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _inputs(shape, dtype, seed=0, n=3, tied=False, specials=False):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    if tied:  # task vectors on a few magnitudes: ties at every rank
        steps = torch.randint(-3, 4, (n, *shape), generator=g).float() * 2.0**-9
    else:
        steps = torch.randn((n, *shape), generator=g) * 0.003
    models = [(base.float() + s).to(dtype) for s in steps]
    if specials and models[1].numel() > 20:
        models[1].view(-1)[3:8] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0], dtype=dtype)
    return models, base


def _chunked(models, base, workers=1, chunk=CHUNK_ELEMENTS):
    return ChunkedInputs([m.reshape(-1) for m in models], base.reshape(-1), workers, chunk, tuple(base.shape))


def test_uniforms_are_the_scalar_reference_entry_by_entry():
    key, stream = 0x1234_5678_9ABC_DEF0, 3
    k0, k1 = philox.split_key(key)
    start, n = (1 << 33) - 6, 23  # block numbers past 2^32: the counter's high word in use
    expected = []
    for j in range(start, start + n):
        words = _philox_scalar(((j // 4) & 0xFFFFFFFF, (j // 4) >> 32, stream, 0), (k0, k1))
        expected.append(np.float32((words[j % 4] >> 8) * 2.0**-24))
    got = philox.uniforms(key, stream, start, n)
    assert got.dtype == torch.float32 and got.numpy().tolist() == expected
    # DARE's masks are the same uniforms below float32(keep)
    assert torch.equal(got < 0.3, philox.keep_mask(key, stream, start, n, philox.keep_threshold(0.3)))


@compiled
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("values", ["randn", "tied", "specials"])
def test_compiled_masks_and_sums_equal_the_torch_route(shape, dtype, values):
    models, base = _inputs(shape, dtype, seed=len(shape), tied=values == "tied", specials=values == "specials")
    inputs = _chunked(models, base, workers=2)
    drop = [(0.4, 0.15), None, (0.6, 0.3)]
    assert sparsify._della_compiled(inputs, sparsify.row_width(tuple(base.shape)))
    got = sparsify.magprune_masks(inputs, drop, 99, sums=True)
    off = kernel_off(lambda: sparsify.magprune_masks(inputs, drop, 99, sums=True))
    assert np.array_equal(got[1], off[1], equal_nan=True) and np.array_equal(got[2], off[2], equal_nan=True)
    assert got[0][1] == [] and len(got[0][0]) == inputs.num_chunks
    for a, b in zip(got[0], off[0]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    n = inputs.numel
    for start, stop in [(0, n), (n // 3, n - n // 5)]:  # ranges cutting rows
        keep = sparsify.magprune_keep(inputs, 2, drop[2], start, stop)
        off = kernel_off(lambda a=start, b=stop: sparsify.magprune_keep(inputs, 2, drop[2], a, b))
        assert torch.equal(_bits(keep), _bits(off))


def _reference_keep(magnitude: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Ranks by torch's stable sort, mapped onto [density - epsilon, density + epsilon] in float32."""
    rows = magnitude.reshape(1, -1) if magnitude.dim() < 2 else magnitude.reshape(magnitude.shape[0], -1)
    width = rows.shape[1]
    if width == 1:
        return ((density - epsilon) + 2 * epsilon * torch.full_like(rows, 0.5)).reshape(-1)
    ranks = torch.empty_like(rows).scatter_(1, torch.sort(rows, dim=1, stable=True).indices,
                                            torch.arange(width, dtype=rows.dtype).expand_as(rows))
    return (ranks / (width - 1) * (2 * epsilon) + (density - epsilon)).reshape(-1)


@compiled
@pytest.mark.parametrize("shape", [(37, 53), (301,), (5, 1), (2, 3, 7), (9, 4099), (40, 2)], ids=str)
@pytest.mark.parametrize("values", ["randn", "tied", "specials"])
def test_kernel_keep_probabilities_equal_a_stable_sort(shape, values):
    models, base = _inputs(shape, torch.float32, seed=3, tied=values == "tied", specials=values == "specials")
    inputs = _chunked(models, base)
    for i in range(3):
        magnitude = (models[i] - base).abs()
        expected = _reference_keep(magnitude, 0.5, 0.2)
        n = inputs.numel
        for start, stop in [(0, n), (1, n - 1), (n // 2, n)]:
            got = sparsify.magprune_keep(inputs, i, (0.5, 0.2), start, stop)
            assert torch.equal(_bits(got), _bits(expected[start:stop])), (i, start, stop)


@pytest.mark.parametrize("shape", [(70, 5003), (600001,), (3, 100003)], ids=str)
@pytest.mark.parametrize("kernel", [True, False])
def test_sums_are_numpys_whole_tensor_sums(shape, kernel):
    models, base = _inputs(shape, torch.bfloat16, seed=5)
    inputs = _chunked(models, base, workers=2)
    drop = [(0.3, 0.1)] * 3

    def run():
        return sparsify.magprune_masks(inputs, drop, 7, sums=True)

    masks, totals, kept = run() if kernel else kernel_off(run)
    for i in range(3):
        magnitude = (models[i].float() - base.float()).abs().reshape(-1)
        mask = torch.cat([sparsify.unpack_mask(p, CHUNK_ELEMENTS) for p in masks[i]])[:inputs.numel]
        assert totals[i] == sparsify.sum64(magnitude)  # bit for bit, not approximately
        assert kept[i] == sparsify.sum64(sparsify.mul_mask_(magnitude, mask))


RAWS = [("della", {"density": 0.4, "epsilon": 0.1}),
        ("della", {"density": [0.3, 1.0, 0.6], "weight": [0.5, 1.0, -0.3], "rescale": "unbiased", "lambda": 1.5}),
        ("della_linear", {"density": [0.5, 0.25, 0.7], "weight": [0.3, 0.4, 0.3], "rescale": False}),
        ("della_linear", {"density": 0.3, "epsilon": 0.2, "rescale": "unbiased", "normalize": True}),
        ("della_linear", {"density": 0.6, "epsilon": 0.05})]


@pytest.mark.parametrize("shape", SHAPES + EMPTY, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tied", [False, True])
def test_streamed_merge_equals_the_whole_tensor_reference(shape, dtype, tied):
    models, base = _inputs(shape, dtype, seed=11, tied=tied)
    big = base.numel() > CHUNK_ELEMENTS
    for name, raw in RAWS if not big else RAWS[:3]:
        method = get_method(name)
        params = full_params(method, raw, 3)
        expected = generalized_task_arithmetic([x.float() for x in models], base.float(), params, tensor_rng(0, "w"),
                                               "della", name == "della")
        runs = [(1, None, True), (2, None, True), (2, 2 * CHUNK_ELEMENTS, True), (1, None, False)]
        if not big:
            runs.append((2, None, False))
        for workers, chunk, kernel in runs:
            def merge(m=method, p=params, w=workers, c=chunk):
                return run_chunked(m, models, base, p, tensor_rng(0, "w"), torch.float32, workers=w, chunk_elements=c)

            got = merge() if kernel else kernel_off(merge)
            assert torch.equal(_bits(got), _bits(expected)), (name, raw, workers, chunk, kernel)


def test_keep_rate_is_the_density_within_a_binomial_bound_and_grows_with_the_magnitude():
    rows, width, density, epsilon = 512, 1024, 0.3, 0.1
    models, base = _inputs((rows, width), torch.float32, seed=21, n=1)
    masks, _, _ = sparsify.magprune_masks(_chunked(models, base), [(density, epsilon)], 3)
    kept = torch.cat([sparsify.unpack_mask(p, CHUNK_ELEMENTS) for p in masks[0]])[:rows * width].view(rows, width)
    p = _reference_keep((models[0] - base).abs(), density, epsilon).double().view(rows, width)
    sigma = float((p * (1 - p)).sum().sqrt())
    assert abs(float(kept.sum()) - float(p.sum())) < 5 * sigma
    assert abs(float(p.mean()) - density) < 1e-6  # ranks spread evenly: the mean probability is the density
    # by magnitude: the top quarter of each row is kept at about density + 0.75 epsilon, the bottom at - 0.75
    ranks = (models[0] - base).abs().argsort(dim=1).argsort(dim=1)
    for part in (ranks >= 3 * width // 4, ranks < width // 4):
        expected, spread = float(p[part].sum()), float((p[part] * (1 - p[part])).sum().sqrt())
        assert abs(float(kept[part].sum()) - expected) < 5 * spread
    assert float(kept[ranks >= 3 * width // 4].double().mean()) > density + 0.6 * epsilon


@pytest.mark.parametrize("rescale", [True, "unbiased", False])
def test_prepare_holds_packed_masks_only(rescale):
    """Streaming, not loading: what `prepare` keeps between its passes is one bit per entry and model (DELLA held a
    float32 keep probability per entry and model for `rescale: unbiased`)."""
    models, base = _inputs((70, 5003), torch.bfloat16, seed=2)
    method = get_method("della")
    params = full_params(method, {"density": 0.4, "rescale": rescale}, 3)
    state = method.fn.prepare(_chunked(models, base), params, tensor_rng(0, "w"))
    held = [t for masks in state["masks"] for t in masks]
    assert all(t.dtype == torch.uint8 for t in held)
    assert sum(t.numel() for t in held) == 3 * -(-base.numel() // 8)
    assert "keep" not in state
