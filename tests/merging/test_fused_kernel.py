"""The compiled one-pass kernels (merging/methods/_fused.c) against the torch ops of TaskVectorMerge.apply and of
linear / model_soup, bit for bit.

The torch path is the reference (itself tested against the whole-tensor `generalized_task_arithmetic` and against
mergekit); here every option the kernel takes is crossed with inputs holding heavy ties across chunk borders,
signed zeros, NaN and infinities, so that the two agree on every bit, not just on typical values.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from merging.methods import kernels
from merging.methods.apply import full_params, tensor_rng
from merging.methods.catalog import get_method
from merging.methods.chunking import CHUNK_ELEMENTS, ChunkedInputs, run_chunked

N = 2 * CHUNK_ELEMENTS + 1001


def test_the_kernel_is_built_where_ci_runs():
    """setup.py builds it with any C compiler; CI (Linux, gcc) must exercise it, not the fallback."""
    if sys.platform.startswith("linux"):
        assert kernels.compiled is not None


def _inputs(dtype: torch.dtype, seed: int, n_models: int = 3, specials: bool = False):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(N, generator=g) * 0.02).to(dtype)
    base[:50] = -0.0  # base entries that are negative zeros: the sign of a zero sum shows in the output
    models = []
    for i in range(n_models):
        levels = torch.randint(-3, 4, (N,), generator=g).float() * 0.001  # few values: heavy ties at each cut
        x = (base.float() + levels).to(dtype)
        x[i * 7:i * 7 + 40] = base[i * 7:i * 7 + 40]  # zero task-vector entries (signed zeros after the trim)
        models.append(x)
    if specials:  # only in a model the merge does not trim: NaN and inf flow through both paths
        models[-1][100:110] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0] * 2, dtype=dtype)
    return models, base


def _both(method: str, models, base, raw: dict, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    m = get_method(method)
    params = full_params(m, raw, len(models))
    fused = run_chunked(m, models, base, params, tensor_rng(seed, "w"), torch.float32, workers=2)
    saved, kernels.compiled = kernels.compiled, None
    try:
        reference = run_chunked(m, models, base, params, tensor_rng(seed, "w"), torch.float32, workers=2)
    finally:
        kernels.compiled = saved
    return fused, reference


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.skipif(kernels.compiled is None, reason="kernel not built (no C compiler)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method, raw", [
    ("task_arithmetic", {"weight": [0.5, 1.0, -0.3]}),
    ("task_arithmetic", {"weight": [0.5, 0.25, 0.3], "normalize": True, "lambda": 0.7}),
    ("ties", {"weight": [0.5, 1.0, 0.3], "density": [0.4, 0.7, 1.0]}),
    ("ties", {"weight": [1.0, 1.0, 1.0], "density": [0.5, 1e-9, 1.0], "normalize": False, "lambda": 1.3}),
    ("ties", {"weight": [0.6, -0.4, 0.3], "density": [0.5, 0.5, 1.0]}),  # a negative weight: no clamp
    ("ties", {"weight": [0.5, 1.0, 0.3], "density": [0.4, 0.6, 1.0], "rescale": True}),
    ("ties", {"weight": [0.5, 1.0, 0.3], "density": [0.4, 0.6, 1.0], "rescale": "unbiased"}),
    ("dare_ties", {"weight": [0.5, 1.0, 0.3], "density": [0.4, 0.7, 1.0]}),
    ("breadcrumbs", {"weight": [0.5, 1.0, 0.3], "density": [0.4, 0.7, 1.0], "gamma": [0.05, 0.0, 0.01]}),
    ("breadcrumbs_ties", {"weight": [0.5, 1.0, 0.3], "density": [0.4, 0.6, 1.0], "gamma": 0.1, "rescale": True}),
    ("breadcrumbs_ties", {"weight": [0.5, 1.0, 0.3], "density": [0.9, 0.6, 1.0], "gamma": 0.2, "rescale": "unbiased"}),
    ("dare_linear", {"weight": [0.5, 1.0, 0.3], "density": [0.4, 0.7, 1.0], "rescale": "unbiased"}),
    ("dare_linear", {"weight": [0.5, 1.0, 0.3], "density": [0.4, 0.7, 1.0], "rescale": False, "normalize": True}),
])
def test_kernel_equals_the_torch_ops_bit_for_bit(dtype, method, raw):
    models, base = _inputs(dtype, seed=len(str(raw)), specials=True)
    fused, reference = _both(method, models, base, raw)
    assert _same_bits(fused, reference)
    assert torch.isnan(fused).any()  # the specials did flow through


@pytest.mark.skipif(kernels.compiled is None, reason="kernel not built (no C compiler)")
@pytest.mark.parametrize("n_models", range(1, 10))
def test_every_model_count_merges_bit_for_bit(n_models):
    """The kernel's register path is compiled once per model count up to 8 (9 takes the block path)."""
    density = [0.5] * (n_models - 1) + [1.0]  # the last model, holding NaN and inf, is not trimmed
    for dtype in (torch.bfloat16, torch.float32):
        models, base = _inputs(dtype, seed=n_models, n_models=n_models, specials=True)
        for method, raw in [("ties", {"weight": 0.7, "density": density}),
                            ("ties", {"weight": 1.0, "density": density, "normalize": False, "lambda": 0.6}),
                            ("task_arithmetic", {"weight": 0.3, "normalize": True})]:
            fused, reference = _both(method, models, base, raw)
            assert _same_bits(fused, reference), (method, raw, dtype)


def _sequential_weighted_sum(models: list[torch.Tensor], weights: list[float], total: float) -> np.ndarray:
    """The independent reference: numpy float32 ufuncs, each product and sum rounded on its own, left to right."""
    w = [np.float32(x) for x in weights]
    values = [x.float().numpy() for x in models]
    with np.errstate(all="ignore"):
        out = values[0] * w[0]
        for x, wi in zip(values[1:], w[1:]):
            out = out + x * wi
        return out / np.float32(total)


@pytest.mark.skipif(kernels.compiled is None, reason="kernel not built (no C compiler)")
@pytest.mark.parametrize("n_models", range(1, 10))
def test_linear_kernel_equals_the_torch_ops_and_a_numpy_reference_bit_for_bit(n_models):
    """linear and model_soup in the kernel (registers up to 8 inputs of one dtype, else blocks) against their torch
    ops and against numpy's float32 ufuncs: NaN, infinities, signed zeros and negative weights included."""
    g = torch.Generator().manual_seed(n_models)
    weights = [float(w) for w in torch.randn(n_models, generator=g)]
    weights[0] = 1.0
    for dtype in (torch.bfloat16, torch.float32, "mixed"):
        models, _ = _inputs(torch.bfloat16 if dtype == "mixed" else dtype, seed=n_models, n_models=n_models,
                            specials=True)
        if dtype == "mixed":  # inputs of two dtypes take the block path
            models[0] = models[0].float()
        for method, raw, total in [("linear", {"weight": weights, "normalize": True}, sum(weights)),
                                   ("linear", {"weight": weights, "normalize": False}, 1.0),
                                   ("model_soup", {}, float(n_models))]:
            fused, reference = _both(method, models, None, raw)
            assert _same_bits(fused, reference), (method, raw, dtype)
            expected = _sequential_weighted_sum(models, weights if method == "linear" else [1.0] * n_models, total)
            assert np.array_equal(fused.numpy().view(np.int32), expected.view(np.int32)), (method, raw, dtype)


@pytest.mark.skipif(kernels.compiled is None, reason="kernel not built (no C compiler)")
def test_kernel_reads_mixed_dtypes_and_falls_back_where_it_does_not_apply():
    models, base = _inputs(torch.bfloat16, seed=3)
    models[1] = models[1].float()  # one float32 model among bf16 ones: each input read in its own dtype
    fused, reference = _both("ties", models, base, {"weight": 0.5, "density": 0.5})
    assert _same_bits(fused, reference)
    m = get_method("ties")
    params = full_params(m, {"weight": 0.5, "density": 0.5}, 3)
    inputs = ChunkedInputs([x.half() for x in models], base.half())
    assert m.fused(inputs, params, m.fn.prepare(inputs, params, tensor_rng(0, "w"))) is None  # float16
    strided = ChunkedInputs([x[::2] for x in models], base[::2])
    assert m.fused(strided, params, m.fn.prepare(strided, params, tensor_rng(0, "w"))) is None
    linear = get_method("linear")
    linear_params = full_params(linear, {"weight": 0.5}, 3)
    assert linear.fused(ChunkedInputs([x.half() for x in models], None), linear_params) is None
    assert linear.fused(ChunkedInputs([x[::2] for x in models], None), linear_params) is None


@pytest.mark.skipif(kernels.compiled is None, reason="kernel not built (no C compiler)")
@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_kernel_keeps_exactly_the_allowed_ties_in_the_chunk_where_they_run_out(method):
    """Every task-vector magnitude is one of 4 values: the trim threshold is shared by a quarter of all entries,
    and the chunk where the kept ties run out is cut mid-chunk (KEEP_PARTIAL_TIES)."""
    g = torch.Generator().manual_seed(5)
    base = torch.zeros(N)
    models = [(torch.randint(1, 5, (N,), generator=g) * torch.sign(torch.randn(N, generator=g))).float()
              for _ in range(2)]
    m = get_method(method)
    raw = {"weight": 1.0, "density": 0.6} | ({"gamma": 0.1} if method == "breadcrumbs_ties" else {})
    params = full_params(m, raw, 2)
    state = m.fn.prepare(ChunkedInputs(models, base), params, tensor_rng(0, "w"))
    rules = [cut.rule(c)[0] for i in range(2) for cut in state["cuts"][i] for c in range(3)]
    assert 2 in rules  # some chunk keeps only part of its ties
    fused, reference = _both(method, models, base, raw)
    assert _same_bits(fused, reference)
    kept = [int(((x - base).abs() > 0).sum()) for x in models]
    assert all(k > 0 for k in kept)


@pytest.mark.skipif(kernels.compiled is None, reason="kernel not built (no C compiler)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bracket", [(0.0005, 0.0015, None), (0.0005, 0.0015, 0.001), (float("-inf"), 0.001, 0.001),
                                     (0.001, float("inf"), None), (float("inf"), float("inf"), None)])
def test_compiled_tally_equals_the_numpy_tally(dtype, bracket):
    from merging.methods.sparsify import _split_at_bracket, _tally_compiled

    models, base = _inputs(dtype, seed=9)
    start, stop = CHUNK_ELEMENTS, 2 * CHUNK_ELEMENTS
    # every cut in one call: this bracket on two models, and a second bracket on the first (as Breadcrumbs)
    cuts = [(models[0], bracket), (models[1], bracket), (models[0], (0.0002, 0.0008, None))]
    got = _tally_compiled(cuts, base, start, stop)
    for (x, b), tally in zip(cuts, got):
        magnitude = (x[start:stop].float() - base[start:stop].float()).abs()
        above, inside, heavy, _ = _split_at_bracket(magnitude, b, False)
        assert (tally[0], tally[2], tally[4]) == (above, heavy, False)
        assert torch.equal(tally[1], inside)  # the same candidates, in the same order
    nan_model = models[1].clone()
    nan_model[start + 5] = float("nan")
    flags = [t[4] for t in _tally_compiled([(models[0], bracket), (nan_model, bracket)], base, start, stop)]
    assert flags == [False, True]


@pytest.mark.skipif(kernels.compiled is None, reason="kernel not built (no C compiler)")
@pytest.mark.parametrize("miss", [None, "above", "below"])
def test_compiled_scan_gives_the_same_cuts_also_when_a_bracket_misses(monkeypatch, miss):
    import merging.methods.sparsify as sparsify

    models, base = _inputs(torch.bfloat16, seed=10)
    ks = [[int(0.5 * N)], [int(0.2 * N), 9], [0]]
    if miss:
        magnitude = (models[0].float() - base.float()).abs()
        kth = float(magnitude.kthvalue(N - ks[0][0] + 1).values)
        lo, hi = (kth * 1.5, kth * 2.0) if miss == "above" else (kth * 0.2, kth * 0.5)
        real = sparsify._brackets
        monkeypatch.setattr(sparsify, "_brackets", lambda inputs, ks: [[(lo, hi, None)]] + real(inputs, ks)[1:])
    inputs = ChunkedInputs(models, base, workers=2)
    compiled, _, _ = sparsify.magnitude_cuts(inputs, ks)
    monkeypatch.setattr(kernels, "compiled", None)
    reference, _, _ = sparsify.magnitude_cuts(inputs, ks)
    assert compiled == reference
    for i, m in enumerate(models):
        magnitude = (m.float() - base.float()).abs()
        for j, k in enumerate(ks[i]):
            kept = torch.cat([compiled[i][j].keep_(magnitude[s:s + CHUNK_ELEMENTS].clone(), c) != 0
                              for c, s in enumerate(range(0, N, CHUNK_ELEMENTS))])
            assert torch.equal(kept, sparsify.topk_mask(magnitude, k) & (magnitude != 0))


@pytest.mark.skipif(kernels.compiled is None, reason="kernel not built (no C compiler)")
@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties", "task_arithmetic", "linear"])
def test_streamed_merges_have_the_same_content_hash_with_and_without_the_kernel(tmp_path, monkeypatch, method):
    from merging import merge
    from tests.merging.conftest import write_safetensors

    g = torch.Generator().manual_seed(12)
    base = {f"layers.{i}.w": (torch.randn(700, 900, generator=g) * 0.02).to(torch.bfloat16) for i in range(3)}
    base["norm"] = torch.ones(900, dtype=torch.bfloat16)
    base_dir = write_safetensors(base, tmp_path / "base")
    models = []
    for k in range(3):
        state = {n: (t.float() + 0.001 * torch.randn(t.shape, generator=g)).to(torch.bfloat16) for n, t in base.items()}
        models.append(str(write_safetensors(state, tmp_path / f"m{k}")))
    recipe = {"merge_method": method, "seed": 4,
              "models": [{"model": m, "parameters": {"weight": 0.4} | ({} if method in ("task_arithmetic", "linear")
                                                                      else {"density": 0.5})} for m in models]}
    if method != "linear":
        recipe["base_model"] = str(base_dir)
    with_kernel = merge(recipe, tmp_path / "on", progress=False).content_hash
    monkeypatch.setattr(kernels, "compiled", None)
    assert merge(recipe, tmp_path / "off", progress=False).content_hash == with_kernel


@pytest.mark.parametrize("n_models", [3, 20])
@pytest.mark.parametrize("n", [0, 1, 7, 300])
@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties", "task_arithmetic", "linear"])
def test_empty_and_tiny_tensors(method, n, n_models):
    """An empty tensor (a checkpoint may hold one) once failed in TIES' sampling and DARE's draws; 3 models
    take the kernel's register path where it applies, 20 its block path, past its per-model buffers."""
    from merging.methods.apply import merge_tensor

    g = torch.Generator().manual_seed(n)
    base = torch.randn(n, generator=g).to(torch.bfloat16)
    models = [(base.float() + 0.01 * torch.randn(n, generator=g)).to(torch.bfloat16) for _ in range(n_models)]
    m = get_method(method)
    params = full_params(m, {"weight": 0.05} | ({} if method in ("task_arithmetic", "linear") else {"density": 0.5}),
                         n_models)
    fused = merge_tensor(m, "w", models, base, params, 0, torch.float32)
    saved, kernels.compiled = kernels.compiled, None
    try:
        reference = merge_tensor(m, "w", models, base, params, 0, torch.float32)
    finally:
        kernels.compiled = saved
    assert fused.shape == (n,) and _same_bits(fused, reference)
