"""Streamed PCB-merging (`competition.Pcb`) against the whole-row `pcb_delta` (the previous implementation)."""

import pytest
import torch

from merging.methods.apply import full_params, merge_tensor
from merging.methods.catalog import get_method
from merging.methods.chunking import CHUNK_ELEMENTS, run_chunked
from merging.methods.competition import key_value, order_keys, pcb, pcb_delta
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


@pytest.mark.parametrize("d", [1, 7, 16385, 2 * CHUNK_ELEMENTS + 12347])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["randn", "tied", "constant", "zeros"])
@pytest.mark.parametrize("workers", [1, 2])
def test_streamed_pcb_equals_the_whole_row_code(d, dtype, kind, workers):
    if d == 7 and workers == 2 or (d < 100 and kind == "tied"):
        pytest.skip("covered")
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
