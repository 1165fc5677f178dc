"""Streamed PCB-merging (`competition.Pcb`: sampled brackets through the compiled tally, the radix passes where
one misses or without the kernel) against the whole-row `pcb_delta`, bit for bit."""

import numpy as np
import pytest
import torch

from merging.methods import competition, kernels
from merging.methods.apply import full_params, merge_tensor
from merging.methods.catalog import get_method
from merging.methods.chunking import CHUNK_ELEMENTS, run_chunked
from merging.methods.competition import key_value, order_keys, ordered_values, pcb, pcb_delta, select_in_bracket
from taxonomy.errors import BasinError


def _bits(x):
    return x.contiguous().view(torch.int32) if x.dtype == torch.float32 else x.contiguous().view(torch.int16)


def _inputs(d, dtype, kind, n=3, seed=0):
    g = torch.Generator().manual_seed(seed + d)
    base = torch.randn(d, generator=g).to(dtype)
    models = [(base.float() + 0.01 * torch.randn(d, generator=g)).to(dtype) for _ in range(n)]
    if kind == "tied":  # task vectors of few values: ties at every rank, zeros of one sign, equal to the base
        models = [(base.float() + 0.01 * torch.randint(-2, 3, (d,), generator=g)).to(dtype) for _ in range(n)]
        models[0][::3] = base[::3]
    elif kind == "constant":
        models = [(base.float() + 0.5).to(dtype) for _ in range(n)]
    elif kind == "zeros":
        models = [base.clone() for _ in range(n)]
    return models, base


# every size, dtype, input kind and worker count, except the tiny sizes' tied inputs (no ties to speak of) and
# two workers on 7 entries (one chunk): those add nothing the other cases do not hold
CASES = [(d, dtype, kind, workers) for d in (1, 7, 16385, 2 * CHUNK_ELEMENTS + 12347)
         for dtype in (torch.float32, torch.bfloat16) for kind in ("randn", "tied", "constant", "zeros")
         for workers in (1, 2) if not (d == 7 and workers == 2 or (d < 100 and kind == "tied"))]


@pytest.mark.parametrize("d, dtype, kind, workers", CASES)
def test_streamed_pcb_equals_the_whole_row_code(d, dtype, kind, workers):
    models, base = _inputs(d, dtype, kind)
    for params in ({"pcb_ratio": 0.1, "clamp_ratio": 0.01, "lambda": 1.0},
                   {"pcb_ratio": 0.5, "clamp_ratio": 0.05, "lambda": 0.7},
                   {"pcb_ratio": 1.0, "clamp_ratio": 0.0, "lambda": 1.0}):
        got = run_chunked(pcb.fn, models, base, params, torch.Generator(), torch.float32, workers=workers)
        rows = torch.stack([m.float() - base.float() for m in models])
        expected = base.float() + params["lambda"] * pcb_delta(rows, params["pcb_ratio"], params["clamp_ratio"])
        assert torch.equal(_bits(got), _bits(expected)), params


def test_order_keys_order_like_the_floats():
    x = torch.tensor([-float("inf"), -3.5, -1e-30, -0.0, 0.0, 1e-45, 2.0, float("inf")])
    keys = order_keys(x)
    assert bool((keys[1:] > keys[:-1]).all()) and int(keys.min()) >= 0 and int(keys.max()) < 2 ** 32
    assert torch.equal(_bits(key_value(keys)), _bits(x))


def test_streamed_pcb_refuses_a_nan_task_vector_naming_the_model():
    base = torch.zeros(64)
    models = [torch.randn(64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    models[2][5] = float("nan")
    with pytest.raises(BasinError, match="model 2"):
        merge_tensor(get_method("pcb"), "w", models, base, full_params(get_method("pcb"), {}, 3), 0, torch.float32)


def _expected(models, base, params):
    rows = torch.stack([m.float() - base.float() for m in models])
    return base.float() + params["lambda"] * pcb_delta(rows, params["pcb_ratio"], params["clamp_ratio"])


PARAMS = ({"pcb_ratio": 0.1, "clamp_ratio": 0.01, "lambda": 1.0},
          {"pcb_ratio": 0.5, "clamp_ratio": 0.05, "lambda": 0.7})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["randn", "tied"])
def test_streamed_pcb_without_the_kernel_equals_the_whole_row_code(monkeypatch, dtype, kind):
    monkeypatch.setattr(kernels, "compiled", None)  # the torch ops and the radix selection alone
    models, base = _inputs(CHUNK_ELEMENTS + 4099, dtype, kind)
    for params in PARAMS:
        got = run_chunked(pcb.fn, models, base, params, torch.Generator(), torch.float32, workers=2)
        assert torch.equal(_bits(got), _bits(_expected(models, base, params))), params


needs_kernel = pytest.mark.skipif(kernels.compiled is None, reason="the compiled kernel is not built")


@needs_kernel
@pytest.mark.parametrize("miss", ["below", "above", "wrong heavy", "overflow"])
def test_a_missed_bracket_falls_back_to_the_radix_passes(monkeypatch, miss):
    calls = []
    radix = competition.streamed_ranks

    def counted(*args, **kwargs):
        calls.append(1)
        return radix(*args, **kwargs)

    def bad(sample_keys, d, ranks):
        bracket = {"below": (2 ** 32 - 2, 2 ** 32 - 1, None), "above": (0, 1, None),
                   "wrong heavy": (0, 2 ** 32 - 1, 2 ** 31 + 5), "overflow": (0, 2 ** 32 - 1, None)}[miss]
        return [[bracket] * len(ranks) for _ in sample_keys]

    monkeypatch.setattr(competition, "streamed_ranks", counted)
    monkeypatch.setattr(competition, "brackets_for", bad)
    if miss == "overflow":
        monkeypatch.setattr(competition, "candidate_cap", lambda d: 1000)
    models, base = _inputs(CHUNK_ELEMENTS + 4099, torch.bfloat16, "tied")
    got = run_chunked(pcb.fn, models, base, PARAMS[0], torch.Generator(), torch.float32, workers=2)
    assert torch.equal(_bits(got), _bits(_expected(models, base, PARAMS[0])))
    assert len(calls) == (0 if miss == "wrong heavy" else 2)  # a heavy key that is absent only counts 0


@needs_kernel
def test_the_brackets_hold_the_ranks_without_fallback(monkeypatch):
    monkeypatch.setattr(competition, "streamed_ranks", lambda *a, **k: pytest.fail("a bracket missed"))
    for kind in ("randn", "tied", "zeros"):
        models, base = _inputs(3 * CHUNK_ELEMENTS + 77, torch.bfloat16, kind, n=4)
        got = run_chunked(pcb.fn, models, base, PARAMS[0], torch.Generator(), torch.float32, workers=2)
        assert torch.equal(_bits(got), _bits(_expected(models, base, PARAMS[0]))), kind


def test_select_in_bracket_against_a_sort():
    g = np.random.default_rng(0)
    for trial in range(200):
        keys = g.integers(0, 40, size=int(g.integers(1, 300))).astype(np.uint32)
        lo, hi = sorted(int(v) for v in g.integers(0, 41, size=2))
        heavy = int(g.integers(lo, hi + 1)) if trial % 2 else None
        inside = (keys >= lo) & (keys <= hi)
        is_heavy = inside & (keys == heavy) if heavy is not None else np.zeros_like(inside)
        ordered = np.sort(keys)
        for rank in range(keys.size):
            got = select_in_bracket(rank, (lo, hi, heavy), int(np.count_nonzero(keys < lo)),
                                    int(np.count_nonzero(is_heavy)), keys[inside & ~is_heavy])
            if lo <= ordered[rank] <= hi:
                assert got == ordered[rank], (trial, rank)
            else:
                assert got is None


def test_ordered_values_order_minus_zero_below_plus_zero():
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(3, 5001, generator=g).mul(2).round()  # ties, and zeros of both signs
    rows[1, ::7] = -0.0
    indices = [0, 1, 2500, 4999, 5000]
    expected = key_value(order_keys(rows).sort(dim=1).values[:, indices])
    for c, got in enumerate(ordered_values(rows, indices)):
        assert torch.equal(_bits(got), _bits(expected[:, c:c + 1].contiguous()))


def test_streamed_pcb_refuses_an_infinite_task_vector():
    base = torch.zeros(64)
    models = [torch.randn(64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    models[1][9] = float("inf")
    with pytest.raises(BasinError, match="model 1"):
        merge_tensor(get_method("pcb"), "w", models, base, full_params(get_method("pcb"), {}, 3), 0, torch.float32)
