"""Streaming (two-phase, chunked) task-vector merges against the whole-tensor reference implementation.

The reference is `generalized_task_arithmetic`, which sorts nothing chunkwise: `topk_mask` on the whole
tensor. Inputs are bf16-valued so that many magnitudes tie at the trim thresholds, across chunk borders.
"""

from __future__ import annotations

import pytest
import torch

from merging.methods.apply import full_params, tensor_rng
from merging.methods.catalog import get_method
from merging.methods.chunking import CHUNK_ELEMENTS, ChunkedInputs, run_chunked
from merging.methods.sparsify import magnitude_cuts, topk_mask
from merging.methods.task_arithmetic import generalized_task_arithmetic

N = 3 * CHUNK_ELEMENTS + 17


def _inputs(seed: int = 0, n_models: int = 3, levels: int | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(N, generator=g) * 0.02).to(torch.bfloat16)
    models = []
    for _ in range(n_models):
        delta = torch.randn(N, generator=g) * 0.002
        if levels is not None:  # few distinct magnitudes: heavy ties at every threshold
            delta = torch.randint(-levels, levels + 1, (N,), generator=g).float()
        models.append((base.float() + delta).to(torch.bfloat16))
    return models, base


@pytest.mark.parametrize("levels", [None, 3])
def test_magnitude_cuts_equal_topk_mask_with_ties_across_chunks(levels):
    models, base = _inputs(1, levels=levels)
    ks = [[int(0.5 * N)], [int(0.1 * N), 7], [N // 3 + 5]]
    cuts, _, _ = magnitude_cuts(ChunkedInputs([m.reshape(-1) for m in models], base.reshape(-1)), ks)
    for i, m in enumerate(models):
        magnitude = (m.float() - base.float()).abs()
        for j, k in enumerate(ks[i]):
            expected = topk_mask(magnitude, k)
            got = torch.cat([cuts[i][j].keep_(magnitude[s:s + CHUNK_ELEMENTS].clone(), c) != 0
                             for c, s in enumerate(range(0, N, CHUNK_ELEMENTS))])
            # keep_() returns magnitudes: exact zeros kept look dropped, so compare on nonzero entries
            assert torch.equal(got, expected & (magnitude != 0)), (i, k)
            assert int(expected.sum()) == k


@pytest.mark.parametrize("method, sparsify, consensus", [
    ("task_arithmetic", None, False), ("ties", "magnitude", True), ("breadcrumbs", "outliers", False),
    ("breadcrumbs_ties", "outliers", True)])
@pytest.mark.parametrize("levels", [None, 3])
def test_streaming_merge_is_bit_identical_to_whole_tensor_reference(method, sparsify, consensus, levels):
    models, base = _inputs(2, levels=levels)
    m = get_method(method)
    raw = {"weight": [0.5, 1.0, 0.3]}
    if sparsify:
        raw["density"] = [0.4, 0.7, 0.25]
    if sparsify == "outliers":
        raw["gamma"] = 0.02
    params = full_params(m, raw, 3)
    got = run_chunked(m, models, base, params, tensor_rng(0, "w"), torch.float32, workers=2)
    expected = generalized_task_arithmetic([x.float() for x in models], base.float(), params, tensor_rng(0, "w"),
                                           sparsify, consensus)
    assert torch.equal(got, expected)


def test_streaming_rescale_matches_reference_and_threads_do_not_matter():
    models, base = _inputs(3)
    m = get_method("ties")
    params = full_params(m, {"weight": [1.0, 0.5, 0.5], "density": 0.3, "rescale": True}, 3)
    one = run_chunked(m, models, base, params, tensor_rng(0, "w"), torch.float32, workers=1)
    two = run_chunked(m, models, base, params, tensor_rng(0, "w"), torch.float32, workers=2)
    assert torch.equal(one, two)
    expected = generalized_task_arithmetic([x.float() for x in models], base.float(), params, tensor_rng(0, "w"),
                                           "magnitude", True)
    torch.testing.assert_close(one, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_streams_deterministically_and_keeps_density(method):
    models, base = _inputs(4, n_models=2)
    m = get_method(method)
    params = full_params(m, {"weight": 1.0, "density": 0.3, "rescale": "unbiased"}, 2)
    one = run_chunked(m, models, base, params, tensor_rng(5, "w"), torch.float32, workers=1)
    two = run_chunked(m, models, base, params, tensor_rng(5, "w"), torch.float32, workers=2)
    assert torch.equal(one, two)
    other = run_chunked(m, models, base, params, tensor_rng(6, "w"), torch.float32, workers=1)
    assert not torch.equal(one, other)
    # one model at a time: the kept fraction is the density, kept entries are tau / density
    single = full_params(m, {"weight": 1.0, "density": 0.3, "rescale": "unbiased"}, 1)
    out = run_chunked(m, models[:1], base, single, tensor_rng(5, "w"), torch.float32)
    tau = models[0].float() - base.float()
    kept = (out - base.float()) != 0
    assert abs(int(kept.sum()) / int((tau != 0).sum()) - 0.3) < 0.005  # 4 sigma is 0.0017
    torch.testing.assert_close((out - base.float())[kept], (tau / 0.3)[kept], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("side", ["above", "below"])
@pytest.mark.parametrize("with_heavy_value", [False, True])
def test_magnitude_cuts_stay_exact_when_the_sampled_bracket_misses(monkeypatch, side, with_heavy_value):
    import merging.methods.sparsify as sparsify

    models, base = _inputs(5, n_models=1)
    magnitude = (models[0].float() - base.float()).abs()
    k = N // 2
    kth = float(magnitude.reshape(-1).kthvalue(N - k + 1).values)
    # a bracket entirely above (or below) the true k-th largest, as a badly unlucky sample would give
    lo, hi = (kth * 1.5, kth * 2.0) if side == "above" else (kth * 0.2, kth * 0.5)
    in_range = magnitude[(magnitude >= lo) & (magnitude <= hi)]
    heavy = float(in_range[0]) if with_heavy_value else None  # a value inside the range, counted rather than kept
    monkeypatch.setattr(sparsify, "_brackets", lambda inputs, ks: [[(lo, hi, heavy)]])
    cuts, totals, kept = magnitude_cuts(ChunkedInputs([models[0].reshape(-1)], base.reshape(-1)), [[k]], sums=True)
    got = torch.cat([cuts[0][0].keep_(magnitude[s:s + CHUNK_ELEMENTS].clone(), c)
                     for c, s in enumerate(range(0, N, CHUNK_ELEMENTS))])
    expected = topk_mask(magnitude, k)
    assert torch.equal(got != 0, expected & (magnitude != 0))
    assert totals[0] == pytest.approx(float(magnitude.double().sum()), rel=1e-6)
    assert kept[0][0] == pytest.approx(float((magnitude * expected).double().sum()), rel=1e-6)


def test_nan_in_a_task_vector_is_a_clear_error_naming_the_tensor():
    from merging.methods.apply import merge_tensor
    from taxonomy.errors import BasinError

    models, base = _inputs(6, n_models=2)
    models[1] = models[1].clone()
    models[1][::1000] = float("nan")
    m = get_method("ties")
    params = full_params(m, {"density": 0.5}, 2)
    with pytest.raises(BasinError, match="layers.0.w: model 1: its task vector has NaN entries"):
        merge_tensor(m, "layers.0.w", models, base, params, 0)


@pytest.mark.parametrize("kth_vs_heavy", ["equal", "above", "below"])
def test_magnitude_cuts_count_a_heavy_value_instead_of_collecting_it(monkeypatch, kth_vs_heavy):
    """The heavy value of a bracket is counted, not collected; the threshold may be that value, or a candidate
    on either side of it. Magnitudes 1..9 with 5 taking 40% of the entries; bracket (3.5, 6.5) around 5."""
    import merging.methods.sparsify as sparsify

    g = torch.Generator().manual_seed(11)
    levels = torch.randint(1, 10, (N,), generator=g).float()
    levels[torch.rand(N, generator=g) < 0.35] = 5.0
    tau = levels * torch.sign(torch.randn(N, generator=g))
    base = torch.zeros(N)
    magnitude = tau.abs()
    above = {"equal": 5.5, "above": 6.5, "below": 4.5}[kth_vs_heavy]  # the k-th largest is the value below this
    k = int((magnitude > above).sum()) + (int((magnitude == above - 0.5).sum()) // 2 if kth_vs_heavy == "equal" else 3)
    kth = float(magnitude.kthvalue(N - k + 1).values)
    assert (kth == 5.0) == (kth_vs_heavy == "equal") and (kth > 5.0) == (kth_vs_heavy == "above")
    monkeypatch.setattr(sparsify, "_brackets", lambda inputs, ks: [[(3.5, 6.5, 5.0)]])
    cuts, _, kept = magnitude_cuts(ChunkedInputs([tau], base), [[k]], sums=True)
    got = torch.cat([cuts[0][0].keep_(magnitude[s:s + CHUNK_ELEMENTS].clone(), c)
                     for c, s in enumerate(range(0, N, CHUNK_ELEMENTS))])
    expected = topk_mask(magnitude, k)
    assert cuts[0][0].threshold == kth
    assert torch.equal(got != 0, expected)
    assert kept[0][0] == pytest.approx(float((magnitude * expected).double().sum()), rel=1e-9)


@pytest.mark.parametrize("bracket", [(0.5, 1.5, None), (0.5, 1.5, 1.0), (float("-inf"), 1.0, 1.0),
                                     (1.0, float("inf"), None)])
def test_bracket_tally_in_numpy_equals_the_torch_ops_used_on_accelerators(bracket):
    from merging.methods.sparsify import _split_at_bracket, _split_at_bracket_torch

    g = torch.Generator().manual_seed(3)
    a = (torch.randint(0, 9, (CHUNK_ELEMENTS,), generator=g) * 0.25 + torch.rand(CHUNK_ELEMENTS, generator=g)
         * (torch.rand(CHUNK_ELEMENTS, generator=g) < 0.5)).float()  # half the entries on a grid of ties
    fast, reference = _split_at_bracket(a, bracket, True), _split_at_bracket_torch(a, bracket, True)
    assert fast[0] == reference[0] and fast[2] == reference[2] and torch.equal(fast[1], reference[1])
    assert fast[3] == pytest.approx(reference[3], rel=1e-12)
    assert fast[2] > 0 if bracket[2] is not None else fast[2] == 0


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 300, CHUNK_ELEMENTS + 3])
def test_packed_masks_unpack_to_the_same_bools_at_an_eighth_of_the_memory(n):
    import numpy as np

    from merging.methods.sparsify import _pack_bits, _unpack_bits, pack_mask, unpack_mask

    mask = np.random.default_rng(n).random(n) < 0.3
    packed = pack_mask(torch.from_numpy(mask))
    assert packed.dtype == torch.uint8 and packed.numel() == -(-n // 8)
    assert np.array_equal(unpack_mask(packed, n).numpy(), mask)
    # entry j is bit j % 8 of byte j // 8, as the kernel reads it
    assert [bool(packed[j // 8] >> (j % 8) & 1) for j in range(min(n, 40))] == list(mask[:40])
    assert torch.equal(_unpack_bits(packed, n), torch.from_numpy(mask))  # the accelerators' unpacking, run here
    assert torch.equal(_pack_bits(torch.from_numpy(mask)), packed)  # the accelerators' packing, run here


def test_mul_mask_equals_torch_multiply_bit_for_bit():
    from merging.methods.sparsify import mul_mask_

    g = torch.Generator().manual_seed(4)
    x = torch.randn(1000, generator=g)
    x[:4] = torch.tensor([float("nan"), -0.0, float("-inf"), 0.0])
    mask = torch.rand(1000, generator=g) < 0.5
    mask[:4] = torch.tensor([False, False, True, False])
    fast = mul_mask_(x.clone(), mask)
    assert torch.equal(fast.view(torch.int32), (x * mask).view(torch.int32))  # signed zeros and NaN included
    assert torch.equal(mul_mask_(x[::2].clone(), mask[::2]).view(torch.int32), (x[::2] * mask[::2]).view(torch.int32))


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "dare_ties", "dare_linear", "task_arithmetic"])
def test_results_do_not_depend_on_the_chunk_size(method):
    """Accelerators merge in chunks of whole matrices, the CPU in cache-sized ones: the same bits either way
    (DARE draws one random stream per CHUNK_ELEMENTS block whatever the chunk; heavy ties span chunk borders)."""
    models, base = _inputs(7, levels=3)
    m = get_method(method)
    raw = {"weight": [0.5, 1.0, 0.3]} | ({} if method == "task_arithmetic" else {"density": [0.4, 0.7, 0.25]})
    params = full_params(m, raw, 3)
    small = run_chunked(m, models, base, params, tensor_rng(0, "w"), torch.float32, workers=2)
    for chunk_elements in (2 * CHUNK_ELEMENTS, 4 * CHUNK_ELEMENTS):  # two chunks, then one holding everything
        large = run_chunked(m, models, base, params, tensor_rng(0, "w"), torch.float32, workers=2,
                            chunk_elements=chunk_elements)
        assert torch.equal(large, small), chunk_elements


@pytest.mark.parametrize("levels", [None, 3])
def test_magnitude_cuts_stay_exact_when_the_sample_is_drawn_in_runs(levels):
    from merging.methods.sparsify import _RUN, _SAMPLE, _sample_positions

    n = _RUN * _SAMPLE + 17  # large enough for runs of consecutive sampled entries
    positions = _sample_positions(n)
    assert positions.numel() == _SAMPLE and int(positions.max()) < n
    assert torch.equal(positions.view(-1, _RUN).diff(dim=1), torch.ones(_SAMPLE // _RUN, _RUN - 1, dtype=torch.long))
    g = torch.Generator().manual_seed(3)
    base = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
    delta = torch.randn(n, generator=g) * 0.002 if levels is None else \
        torch.randint(-levels, levels + 1, (n,), generator=g).float()
    model = (base.float() + delta).to(torch.bfloat16)
    magnitude = (model.float() - base.float()).abs()
    for k in (n // 2, n // 10 + 3):
        cut = magnitude_cuts(ChunkedInputs([model], base), [[k]])[0][0][0]
        got = torch.cat([cut.keep_(magnitude[s:s + CHUNK_ELEMENTS].clone(), c) != 0
                         for c, s in enumerate(range(0, n, CHUNK_ELEMENTS))])
        assert torch.equal(got, topk_mask(magnitude, k) & (magnitude != 0)), k
