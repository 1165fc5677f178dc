"""EMR's per-task side outputs (masks.py `_emr_outputs`, in reused buffers) against the whole-tensor reference
main computed before (kept here): the same bits for the task vector and the masks, float32 and bf16 inputs, with
NaN, inf and zeros; the float64 sums, whose order is now fixed by blocks (`masks.ordered_sum`), against that order
written out here with numpy and against an exact sum (math.fsum)."""

import math

import numpy as np
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


def block_order_sum(values: np.ndarray) -> float:
    """The documented order: per block of 2^18 entries numpy's float64 sum of the float32 values, blocks added left
    to right from 0.0; a NaN total as float("nan")."""
    flat = values.reshape(-1)
    total = 0.0
    for s in range(0, flat.size, 1 << 18):
        total += float(np.sum(flat[s:s + (1 << 18)], dtype=np.float64))
    return math.nan if math.isnan(total) else total


def exact_sum(values: np.ndarray) -> float:
    return math.fsum(values.reshape(-1).astype(np.float64).tolist())


def check_sums(got, task_vectors):
    """l1 and masked_l1 of `got` (EMR's outputs) in the block order bit for bit, and within 1e-12 of exact sums."""
    taus = [t.numpy() for t in task_vectors]
    unified = got["task_vector"]
    magnitude = masks.emr_elect_inplace([t.clone() for t in task_vectors])[0].abs().numpy()
    ms = [got[f"mask.{t}"].numpy() for t in range(len(taus))]
    with np.errstate(invalid="ignore"):  # inf * 0: NaN, as in the method
        masked = [magnitude * m for m in ms]
    for key, terms in (("l1", [np.abs(t) for t in taus]), ("masked_l1", masked)):
        for t, v in enumerate(terms):
            value = float(got[key][t])
            want = block_order_sum(v.astype(np.float32))
            assert np.float64(value).tobytes() == np.float64(want).tobytes(), (key, t, value, want)
            exact = exact_sum(v) if np.isfinite(v).all() else float(np.sum(v, dtype=np.float64))
            if math.isfinite(exact) and exact != 0:
                assert abs(value - exact) <= 1e-12 * exact, (key, t, value, exact)
            else:
                assert value == exact or (math.isnan(value) and math.isnan(exact)), (key, t, value, exact)
    assert float(got["numel"][0]) == unified.numel()


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
        if key in ("l1", "masked_l1"):
            continue
        a, b = got[key], want[key]
        if a.is_floating_point():
            a, b = a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)
        assert torch.equal(a, b), key
    check_sums(got, tv)
    if not special:  # torch's whole-tensor float64 sums: within a few ulps of the block order
        for key in ("l1", "masked_l1"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-13, atol=0)


def test_inputs_unchanged():
    tv = task_vectors((50, 3), 3, torch.float32, 0, True)
    copies = [t.clone() for t in tv]
    masks._emr_outputs(tv, {}, torch.float32)
    for t, c in zip(tv, copies):
        assert torch.equal(t.view(torch.int32), c.view(torch.int32))
