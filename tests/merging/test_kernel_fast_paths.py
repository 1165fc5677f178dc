"""The compiled kernel's register paths added for speed (issue 26), bit for bit against the whole-tensor reference
(`generalized_task_arithmetic`) and against the torch ops (kernel off):
- TIES' chunk where a model's kept ties run out, split at that model's allowed-th tie into plain cuts (several
  models running out in the same chunk, ties across chunk borders);
- DARE's masked chunks in registers (masks expanded per block of 256);
- Breadcrumbs' bands in registers (beside a model kept whole, with NaN and infinities);
- the threshold scan's candidate collection (bf16 magnitudes on few values: heavy ties at every cut).
On bf16 and float32, 1 and 2 threads, cache-sized and larger chunks."""

from __future__ import annotations

import pytest
import torch

from merging.methods import kernels
from merging.methods.apply import full_params, tensor_rng
from merging.methods.catalog import get_method
from merging.methods.chunking import CHUNK_ELEMENTS, ChunkedInputs, run_chunked
from merging.methods.task_arithmetic import generalized_task_arithmetic
from tests.merging.conftest import kernel_off

pytestmark = pytest.mark.skipif(kernels.compiled is None, reason="kernel not built (no C compiler)")
N = 3 * CHUNK_ELEMENTS + 101


def _leveled(dtype: torch.dtype, seed: int, n_models: int = 3):
    """Task vectors on 5 magnitudes: every trim threshold is shared by a fifth of all entries."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(N, generator=g) * 0.02).to(dtype)
    models = [(base.float() + torch.randint(-2, 3, (N,), generator=g).float() * 2.0**-10).to(dtype)
              for _ in range(n_models)]
    return models, base


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("workers, chunk", [(1, CHUNK_ELEMENTS), (2, CHUNK_ELEMENTS), (2, 2 * CHUNK_ELEMENTS)])
def test_ties_where_kept_ties_run_out_equals_the_whole_tensor_reference(dtype, workers, chunk):
    models, base = _leveled(dtype, 3)
    m = get_method("ties")
    raw = {"weight": [0.5, 1.0, 0.3], "density": [0.45, 0.5, 0.55]}  # each model's ties run out in some chunk
    params = full_params(m, raw, 3)
    state = m.fn.prepare(ChunkedInputs(models, base, workers, chunk), params, tensor_rng(0, "w"))
    partial = [[c for c in range(-(-N // chunk)) if state["cuts"][i][0].rule(c)[0] == 2] for i in range(3)]
    assert all(partial), partial  # every model has a chunk that keeps only part of its ties
    got = run_chunked(m, models, base, params, tensor_rng(0, "w"), torch.float32, workers, chunk)
    expected = generalized_task_arithmetic([x.float() for x in models], base.float(), params, tensor_rng(0, "w"),
                                           "magnitude", True)
    assert torch.equal(_bits(got), _bits(expected))
    off = kernel_off(lambda: run_chunked(m, models, base, params, tensor_rng(0, "w"), torch.float32, workers, chunk))
    assert torch.equal(_bits(got), _bits(off))


def test_ties_running_out_in_the_same_chunk_for_several_models():
    """Identical models: their kept ties run out at the same chunk, at the same entry (a zero-length segment)."""
    models, base = _leveled(torch.bfloat16, 4, n_models=1)
    models = [models[0].clone() for _ in range(3)]
    m = get_method("ties")
    params = full_params(m, {"weight": [0.2, 0.3, 0.5], "density": [0.5, 0.5, 0.4]}, 3)
    got = run_chunked(m, models, base, params, tensor_rng(0, "w"), torch.float32, 2)
    expected = generalized_task_arithmetic([x.float() for x in models], base.float(), params, tensor_rng(0, "w"),
                                           "magnitude", True)
    assert torch.equal(_bits(got), _bits(expected))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method, raw", [
    ("dare_ties", {"weight": [0.5, 1.0, 0.3], "density": [0.4, 0.7, 1.0]}),
    ("dare_ties", {"weight": [0.6, -0.4, 0.3], "density": 0.5, "rescale": False, "lambda": 1.5}),
    ("dare_linear", {"weight": [0.5, 0.25, 0.3], "density": [0.4, 0.7, 0.9], "normalize": True}),
])
def test_dare_in_registers_equals_the_torch_ops(dtype, method, raw):
    models, base = _leveled(dtype, 5)
    m = get_method(method)
    params = full_params(m, raw, 3)
    one = run_chunked(m, models, base, params, tensor_rng(7, "w"), torch.float32, 1)
    two = run_chunked(m, models, base, params, tensor_rng(7, "w"), torch.float32, 2, 2 * CHUNK_ELEMENTS)
    off = kernel_off(lambda: run_chunked(m, models, base, params, tensor_rng(7, "w"), torch.float32, 2))
    assert torch.equal(_bits(one), _bits(off)) and torch.equal(_bits(two), _bits(off))
    other = run_chunked(m, models, base, params, tensor_rng(8, "w"), torch.float32, 1)
    assert not torch.equal(one, other)  # the masks (seeded per tensor) shape the result


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("workers", [1, 2])
def test_breadcrumbs_bands_in_registers_equal_the_reference_and_the_torch_ops(method, dtype, workers):
    """Breadcrumbs' bands (outer cut minus inner cut) in the register path, beside a model kept whole (density 1)
    whose task vector holds infinities, signed zeros and a NaN: the same bits as the whole-tensor reference and the
    kernel-off torch ops, including the chunks where a cut's ties run out (the block path)."""
    models, base = _leveled(dtype, 5)
    models[2][10:15] = torch.tensor([float("inf"), -float("inf"), float("nan"), -0.0, 0.0], dtype=dtype)
    m = get_method(method)
    params = full_params(m, {"weight": [0.5, 1.0, 0.3], "density": [0.45, 0.5, 1.0], "gamma": [0.01, 0.2, 0.0]}, 3)
    got = run_chunked(m, models, base, params, tensor_rng(0, "w"), torch.float32, workers)
    expected = generalized_task_arithmetic([x.float() for x in models], base.float(), params, tensor_rng(0, "w"),
                                           "outliers", method == "breadcrumbs_ties")
    assert torch.equal(_bits(got), _bits(expected))
    off = kernel_off(lambda: run_chunked(m, models, base, params, tensor_rng(0, "w"), torch.float32, workers))
    assert torch.equal(_bits(got), _bits(off))
    assert bool(torch.isnan(got[12])) and torch.isinf(got[10:12]).all()
