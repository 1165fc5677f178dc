"""EMR's per-task side outputs (masks.py `_emr_outputs`, in reused buffers) against the whole-tensor reference
main computed before (kept here): the same bits for every key, float32 and bf16 inputs, with NaN, inf and zeros."""

import pytest
import torch

from merging.methods import masks


def reference_outputs(task_vectors, dtype):
    """main's `_emr_outputs` as of ef11ee9: Huang et al. 2024, Alg. 1 lines 1-4 and the rescalers' sums."""
    unified, ms = masks.emr_elect(task_vectors)
    magnitude = unified.abs().double()
    l1 = [float(tau.abs().double().sum()) for tau in task_vectors]
    masked = [float((magnitude * m).sum()) for m in ms]
    return {"task_vector": unified.to(dtype), **{f"mask.{t}": m for t, m in enumerate(ms)},
            "l1": torch.tensor(l1, dtype=torch.float64), "masked_l1": torch.tensor(masked, dtype=torch.float64),
            "numel": torch.tensor([float(unified.numel())], dtype=torch.float64)}


def task_vectors(shape, n, dtype, seed, special):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype)
    xs = [(base.float() + 0.02 * torch.randn(shape, generator=g)).to(dtype) for _ in range(n)]
    if special:
        flat = [x.view(-1) for x in xs]
        values = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e30, -1e30]).to(dtype)
        k = min(len(values), flat[0].numel())
        flat[0][:k] = values[:k]
        flat[-1][3:5] = base.view(-1)[3:5]  # zero task vectors (where the tensor has those entries)
    b = base.to(torch.float32)
    return [x.to(torch.float32) - b for x in xs]


SHAPES = [((1,), 1), ((33,), 2), ((64, 129), 3), ((1000, 17), 4), ((3, 5, 7), 5), (((1 << 20) + 3,), 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,n", SHAPES)
@pytest.mark.parametrize("special", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_same_bits_as_reference(dtype, shape, n, special, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tv = task_vectors(shape, n, dtype, seed=sum(shape) + n, special=special)
        want = reference_outputs([t.clone() for t in tv], dtype)
        got = masks._emr_outputs([t.clone() for t in tv], {}, dtype)
    finally:
        torch.set_num_threads(previous)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
        a, b = got[key], want[key]
        if a.is_floating_point():
            a, b = a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)
        assert torch.equal(a, b), key


def test_inputs_unchanged():
    tv = task_vectors((50, 3), 3, torch.float32, 0, True)
    copies = [t.clone() for t in tv]
    masks._emr_outputs(tv, {}, torch.float32)
    for t, c in zip(tv, copies):
        assert torch.equal(t.view(torch.int32), c.view(torch.int32))
