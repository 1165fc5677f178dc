"""The per-tensor methods made faster for issues 24 and 26, bit for bit against their previous implementations,
copied here as `reference_*` (whole-tensor torch ops, the code that produced benchmarks/results/merge_hashes.json):
on float32 and bf16 inputs, odd and 1-D shapes, magnitudes with many ties, several seeds, and the compiled kernel
on and off."""

from __future__ import annotations

import itertools

import pytest
import torch

from merging.methods import philox
from merging.methods.apply import full_params, merge_tensor, tensor_rng
from merging.methods.catalog import get_method
from merging.methods.chunking import CHUNK_ELEMENTS
from merging.methods.competition import key_value, order_keys, ranked_values
from merging.methods.float_math import exp32, tanh32
from merging.methods.sparsify import (
    kth_largest,
    mask_and_rescale_,
    rank_keep_probability,
    sign_consensus_disjoint_sum_,
    topk_mask,
)
from merging.reductions import row_dots64, row_norms64, sum_squares64
from taxonomy.errors import BasinError
from tests.merging.conftest import kernel_off

SHAPES = [(37, 53), (301,), (1,), (5, 1), (2, 3, 7), (2 * CHUNK_ELEMENTS // 512 + 3, 512)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32 if t.element_size() == 4 else torch.int16)


def _inputs(shape, dtype, seed, n=3, tied=False):
    """A base and `n` models; `tied`: task vectors on a few magnitudes (ties at every rank and threshold)."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    if tied:
        steps = torch.randint(-3, 4, (n, *shape), generator=g).float() * 2.0**-9
    else:
        steps = torch.randn((n, *shape), generator=g) * 0.003
    return [(base.float() + s).to(dtype) for s in steps], base


def _cases():
    for shape, dtype, tied in itertools.product(SHAPES, (torch.float32, torch.bfloat16), (False, True)):
        name = f"{'x'.join(map(str, shape))}-{str(dtype)[6:]}-{'tied' if tied else 'randn'}"
        yield pytest.param(shape, dtype, tied, id=name)


# ---- previous implementations (references) ----

def reference_rank_keep_probability(magnitude, density, epsilon):
    rows = magnitude.reshape(1, -1) if magnitude.dim() < 2 else magnitude.reshape(magnitude.shape[0], -1)
    width = rows.shape[1]
    order = torch.sort(rows, dim=1, stable=True).indices
    ranks = torch.empty_like(rows)
    positions = torch.arange(width, dtype=rows.dtype, device=rows.device).expand_as(rows)
    ranks.scatter_(1, order, positions)
    scaled = ranks / (width - 1) if width > 1 else torch.full_like(ranks, 0.5)
    return ((density - epsilon) + 2 * epsilon * scaled).reshape(magnitude.shape)


def reference_della(tensors, base, params, rng, consensus):
    """DELLA as before its masks moved to Philox (issue 26: drawn per range of rows), except the draws: the
    uniforms were torch.rand from the tensor's generator, model by model; they are now Philox's for (a key drawn
    from that generator, stream i, entry j), as DARE's (the one change in DELLA's bits)."""
    weights = [float(w) for w in params["weight"]]
    key = int(torch.randint(0, 2**62, (1,), generator=rng))

    def weighted(i):
        delta = tensors[i] - base
        if params["density"][i] < 1:
            keep = reference_rank_keep_probability(delta.abs(), params["density"][i], params["epsilon"][i])
            mask = philox.uniforms(key, i, 0, delta.numel()).view(delta.shape) < keep
            delta = mask_and_rescale_(delta, mask, params["rescale"], keep)
        return delta.mul_(weights[i]) if weights[i] != 1 else delta

    if consensus:
        mixed = sign_consensus_disjoint_sum_([weighted(i) for i in range(len(tensors))], weights, params["normalize"])
    else:
        mixed = weighted(0)
        for i in range(1, len(tensors)):
            mixed.add_(weighted(i))
        if params["normalize"] and abs(sum(weights)) >= 1e-8:
            mixed.div_(sum(weights))
    if params["lambda"] != 1:
        mixed.mul_(params["lambda"])
    return mixed.add_(base)


def reference_model_stock(tensors, base, params):
    n = len(tensors)
    shape = base.shape
    per_row = params["filter_wise"] and base.dim() >= 2

    def rows(x):
        return x.reshape(x.shape[0], -1) if per_row else x.reshape(1, -1)

    b = rows(base)
    offsets = [rows(t) - b for t in tensors]
    lengths = [row_norms64(o) for o in offsets]
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            norms = (lengths[i] * lengths[j]).clamp_(min=1e-6)
            cosines.append((row_dots64(offsets[i], offsets[j]) / norms).clamp_(-1, 1))
    cos = torch.stack(cosines).mean(0).unsqueeze(-1)
    denominator = 1 + (n - 1) * cos
    if bool((denominator.abs() < 1e-6).any()):
        raise BasinError("model_stock: the task vectors point in opposite directions")
    t = (n * cos / denominator).to(b.dtype)
    average = torch.stack([rows(x) for x in tensors]).mean(0)
    return (t * average + (1 - t) * b).reshape(shape)


def reference_sce(tensors, base, params):
    tvs = torch.stack([t - base for t in tensors])
    fraction = params["select_topk"]
    if fraction < 1:
        variance = tvs.var(dim=0, unbiased=False)
        k = int(int(torch.count_nonzero(variance)) * fraction)
        tvs = tvs * topk_mask(variance.abs(), k)
    energy = torch.tensor([sum_squares64(tv) / max(1, tv.numel()) for tv in tvs], dtype=torch.float64)
    total = float(energy.sum())
    weights = (energy / total if abs(total) >= 1e-6 else torch.full_like(energy, 1 / len(tensors))).to(tvs.dtype)
    positive = tvs.sum(0) >= 0
    agree = torch.where(positive, tvs > 0, tvs < 0)
    erased = weights.view(-1, *[1] * base.dim()) * agree
    return base + (tvs * erased).sum(0) / erased.sum(0).clamp(min=1e-6)


def reference_ranked_value(rows, index):
    k = rows.shape[1] - index
    values = []
    for row in rows:
        if k <= int(torch.count_nonzero(row > 0)):
            values.append(kth_largest(torch.where(row > 0, row, 0.0), k))
        else:
            values.append(torch.kthvalue(row, index + 1).values)
    return torch.stack(values).unsqueeze(1)


def reference_pcb_delta(task_vectors, ratio, clamp_ratio):
    """PCB as redefined for issue 24's speed (session 14: basin's float32 exp and tanh, sums in model order,
    clamps by comparisons, sgn(+-0) = +0, zeros ordered -0 below +0), in whole-tensor torch ops with sorts and
    the ranges taken from the data (the previous code, with torch.exp and torch.tanh, is gone with its bits)."""
    rows = torch.stack([t.reshape(-1) for t in task_vectors])
    n, d = rows.shape

    def at(x, index):  # per row, the value of ascending position `index` by order keys
        return key_value(order_keys(x).sort(dim=1).values[:, index:index + 1].contiguous())

    def in_order(parts):
        total = parts[0].clone()
        for part in parts[1:]:
            total = total + part
        return total

    magnitude = rows.abs()
    low = at(magnitude, int(d * clamp_ratio))
    high = at(magnitude, max(0, int(d * (1 - clamp_ratio) - 1)))
    clamped = torch.where(magnitude < high, magnitude, high)
    clamped = torch.where(clamped > low, clamped, low)
    m_low = clamped.amin(dim=1, keepdim=True)
    span = clamped.amax(dim=1, keepdim=True) - m_low
    u = (clamped - m_low) / torch.where(span > 0, span, torch.ones_like(span))
    score = exp32((u * u) * n) * tanh32(rows * in_order(rows))
    cut = at(score, min(d - 1, int(d * (1 - ratio))))
    score = torch.where(score > cut, score, cut)
    s_low, s_high = at(score, 0), at(score, d - 1)
    s_span = s_high - s_low
    scale = (score - s_low) / torch.where(s_span > 0, s_span, torch.ones_like(s_span))
    sign = (rows > 0).float() - (rows < 0).float()
    merged = in_order((sign * clamped) * scale) / in_order(scale).clamp(min=1e-12)
    return merged.view(task_vectors[0].shape)


def reference_magmax(tensors, base, params):
    best = tensors[0] - base
    for t in tensors[1:]:
        tau = t - base
        best = torch.where(tau.abs() >= best.abs(), tau, best)
    return base + params["lambda"] * best


def reference_consensus_ta(tensors, base, params):
    task_vectors = [t - base for t in tensors]
    total = task_vectors[0].clone()
    for tau in task_vectors[1:]:
        total += tau
    masks = [tau.abs() > (total - tau).abs_().mul_(params["tall_lambda"]) for tau in task_vectors]
    votes = torch.stack(masks).sum(0)
    return base + params["lambda"] * (total * (votes >= params["min_agreement"]))


def reference_emr(tensors, base, params):
    task_vectors = [t - base for t in tensors]
    total = task_vectors[0].clone()
    for tau in task_vectors[1:]:
        total += tau
    sign = torch.where(total > 0, 1.0, -1.0)
    masks = [tau * sign > 0 for tau in task_vectors]
    largest = torch.zeros_like(total)
    for tau, mask in zip(task_vectors, masks):
        largest = torch.maximum(largest, tau.abs() * mask)
    return base + largest * sign


def reference_ram(tensors, base, params):
    taus = [t - base for t in tensors]
    masks = [tau.abs() > float(params["epsilon"]) for tau in taus]
    count = torch.zeros(base.shape, dtype=torch.int32)
    for m in masks:
        count.add_(m.to(torch.int32))
    divisor = count.clamp(min=1).to(base.dtype)
    merged = torch.zeros_like(base)
    for tau, m in zip(taus, masks):
        merged.add_(torch.where(m, tau, 0.0) / divisor)
    return base + merged


def reference_ramplus_tl(tensors, base, params):
    epsilon = float(params["epsilon"])
    taus = [t - base for t in tensors]
    masks = [tau.abs() > epsilon for tau in taus]
    count = torch.zeros(base.shape, dtype=torch.int32)
    for m in masks:
        count.add_(m.to(torch.int32))
    unique, overlap = count == 1, count > 1
    divisor = count.clamp(min=1).to(base.dtype)
    merged = torch.zeros_like(base)
    for tau, m in zip(taus, masks):
        shared_n = torch.count_nonzero(m & (count > 1)).to(torch.float32)
        unique_n = torch.count_nonzero(m & (count == 1)).to(torch.float32)
        rho = (shared_n / unique_n.clamp(min=epsilon)).clamp(min=0, max=float(params["alpha"]))
        gain = 1 + float(params["r"]) * rho
        merged.add_(torch.where(m & unique, tau * gain, 0.0))
        merged.add_(torch.where(m & overlap, tau, 0.0) / divisor)
    return base + merged


ELECTIONS = {"magmax": reference_magmax, "consensus_ta": reference_consensus_ta, "emr": reference_emr,
             "ram": reference_ram}


# ---- tests ----

def _merge(name, models, base, raw, seed=0):
    method = get_method(name)
    params = full_params(method, raw, len(models))
    return merge_tensor(method, "w", models, base, params, seed, torch.float32), params


@pytest.mark.parametrize("values", ["randn", "tied", "signed zeros, infinities, NaN"])
@pytest.mark.parametrize("shape", [(37, 53), (301,), (1,), (), (4, 1), (2, 3, 5), (9, 4099)])
def test_row_ranks_equal_the_stable_sort(shape, values):
    g = torch.Generator().manual_seed(len(shape) + len(values))
    x = torch.randn(shape, generator=g)
    if values == "tied":
        x = x.mul(4).round()
    elif values.startswith("signed"):
        x.view(-1)[::5] = -0.0
        x.view(-1)[1::7] = 0.0
        x.view(-1)[2::11] = float("inf")
        x.view(-1)[3::13] = -float("inf")
        x.view(-1)[4::3] = float("nan")
    for magnitude in (x.abs(), x):  # DELLA ranks magnitudes; the ranks are those of any float row
        expected = reference_rank_keep_probability(magnitude, 0.4, 0.15)
        assert torch.equal(_bits(rank_keep_probability(magnitude, 0.4, 0.15)), _bits(expected))
        assert torch.equal(_bits(kernel_off(lambda m=magnitude: rank_keep_probability(m, 0.4, 0.15))), _bits(expected))


@pytest.mark.parametrize("shape, dtype, tied", list(_cases()))
@pytest.mark.parametrize("name, raw", [
    ("della", {"density": 0.4, "epsilon": 0.1}),
    ("della", {"density": [0.3, 1.0, 0.6], "weight": [0.5, 1.0, -0.3], "rescale": "unbiased", "lambda": 1.5}),
    ("della_linear", {"density": [0.5, 0.25, 0.7], "weight": [0.3, 0.4, 0.3], "rescale": False}),
    ("della_linear", {"density": 0.3, "normalize": True}),
])
def test_della_equals_the_whole_tensor_reference(shape, dtype, tied, name, raw):
    models, base = _inputs(shape, dtype, 7, tied=tied)
    got, params = _merge(name, models, base, raw, seed=5)
    expected = reference_della([m.float() for m in models], base.float(), params, tensor_rng(5, "w"),
                               name == "della")
    assert torch.equal(_bits(got), _bits(expected))
    off, _ = kernel_off(lambda: _merge(name, models, base, raw, seed=5))
    assert torch.equal(_bits(off), _bits(expected))


@pytest.mark.parametrize("shape, dtype, tied", list(_cases()))
@pytest.mark.parametrize("n, filter_wise", [(2, False), (3, False), (4, True), (3, True)])
def test_model_stock_equals_the_whole_tensor_reference(shape, dtype, tied, n, filter_wise):
    models, base = _inputs(shape, dtype, 11 + n, n=n, tied=tied)
    models[-1] = base.clone() if tied else models[-1]  # a zero task vector: clamped norms, cos 0
    raw = {"filter_wise": filter_wise}
    params = full_params(get_method("model_stock"), raw, n)
    try:
        expected = reference_model_stock([m.float() for m in models], base.float(), params)
    except BasinError:  # a row of opposite task vectors (rows of one entry): both refuse
        with pytest.raises(BasinError, match="opposite directions"):
            _merge("model_stock", models, base, raw)
        return
    got, _ = _merge("model_stock", models, base, raw)
    assert torch.equal(_bits(got), _bits(expected))
    off, _ = kernel_off(lambda: _merge("model_stock", models, base, raw))
    assert torch.equal(_bits(off), _bits(expected))
    half = [m.to(torch.float16) for m in models]  # a dtype the kernel does not read
    got16, _ = _merge("model_stock", half, base.to(torch.float16), raw)
    expected16 = reference_model_stock([m.float() for m in half], base.to(torch.float16).float(), params)
    assert torch.equal(_bits(got16), _bits(expected16))


@pytest.mark.parametrize("shape, dtype, tied", list(_cases()))
@pytest.mark.parametrize("n, select_topk", [(3, 1.0), (4, 0.3), (2, 0.75), (1, 1.0)])
def test_sce_equals_the_whole_tensor_reference(shape, dtype, tied, n, select_topk):
    models, base = _inputs(shape, dtype, 17 + n, n=n, tied=tied)
    raw = {"select_topk": select_topk}
    got, params = _merge("sce", models, base, raw)
    expected = reference_sce([m.float() for m in models], base.float(), params)
    assert torch.equal(_bits(got), _bits(expected))
    off, _ = kernel_off(lambda: _merge("sce", models, base, raw))
    assert torch.equal(_bits(off), _bits(expected))


def test_sce_with_identical_models_takes_uniform_weights():
    """Zero task vectors: every sum of squares 0, uniform weights, nothing agrees (the clamped divisor)."""
    base = torch.randn(300, 7)
    got, params = _merge("sce", [base.clone(), base.clone()], base, {"select_topk": 0.5})
    assert torch.equal(_bits(got), _bits(reference_sce([base.clone(), base.clone()], base, params)))


@pytest.mark.parametrize("values", ["randn", "tied", "zeros of both signs", "NaN", "all zero"])
def test_ranked_values_equal_the_previous_selection(values):
    g = torch.Generator().manual_seed(len(values))
    rows = torch.randn(3, 4001, generator=g)
    if values == "tied":
        rows = rows.mul(3).round()
    elif values == "zeros of both signs":
        rows = rows.mul(2).round() * 0.0 + torch.where(rows > 1, rows, 0.0)  # -0, +0 and some positives
    elif values == "NaN":
        rows[1, ::17] = float("nan")
    elif values == "all zero":
        rows = torch.zeros(3, 4001)
    indices = [0, 1, 2000, 3999, 4000, 3000]
    for r in (rows, rows.abs(), -rows):
        for index, got in zip(indices, ranked_values(r, indices)):
            assert torch.equal(_bits(got), _bits(reference_ranked_value(r, index))), (values, index)


@pytest.mark.parametrize("shape, dtype, tied", list(_cases()))
@pytest.mark.parametrize("n, raw", [(3, {}), (4, {"pcb_ratio": 0.5, "clamp_ratio": 0.05, "lambda": 0.7}),
                                    (2, {"pcb_ratio": 1.0, "clamp_ratio": 0.0})])
def test_pcb_equals_the_whole_tensor_torch_reference(shape, dtype, tied, n, raw):
    models, base = _inputs(shape, dtype, 23 + n, n=n, tied=tied)
    got, params = _merge("pcb", models, base, raw)
    delta = reference_pcb_delta([m.float() - base.float() for m in models], params["pcb_ratio"],
                                params["clamp_ratio"])
    assert torch.equal(_bits(got), _bits(base.float() + params["lambda"] * delta))


@pytest.mark.parametrize("shape, dtype, tied", list(_cases()))
@pytest.mark.parametrize("name, n, raw", [
    ("magmax", 3, {"lambda": 0.7}), ("magmax", 1, {}),
    ("consensus_ta", 4, {"lambda": 1.3, "tall_lambda": 0.4, "min_agreement": 2}),
    ("consensus_ta", 3, {"min_agreement": 1}), ("consensus_ta", 2, {"min_agreement": 3}),
    ("emr", 3, {}), ("emr", 1, {}),
    ("ram", 4, {"epsilon": 2.0 ** -9}), ("ram", 3, {"epsilon": 0.1}), ("ram", 2, {"epsilon": 0.0}),
])
def test_elections_equal_the_previous_code(shape, dtype, tied, name, n, raw):
    models, base = _inputs(shape, dtype, 29 + n, n=n, tied=tied)
    if tied and n > 1:
        models[1] = base.clone()  # a zero task vector: ties in every magnitude comparison, zero sums
    got, params = _merge(name, models, base, raw)
    expected = ELECTIONS[name]([m.float() for m in models], base.float(), params)
    assert torch.equal(_bits(got), _bits(expected))
    off, _ = kernel_off(lambda: _merge(name, models, base, raw))
    assert torch.equal(_bits(off), _bits(expected))


@pytest.mark.parametrize("name", sorted(ELECTIONS))
def test_elections_with_non_finite_chunks_take_the_torch_bits(name):
    models, base = _inputs((3 * CHUNK_ELEMENTS + 77,), torch.float32, 31, n=3)
    models[0][5] = float("nan")
    models[1][CHUNK_ELEMENTS + 9] = float("inf")
    models[2][-3] = -float("inf")
    base[2 * CHUNK_ELEMENTS + 1] = float("nan")
    got, params = _merge(name, models, base, {})
    expected = ELECTIONS[name]([m.float() for m in models], base.float(), params)
    assert torch.equal(_bits(got), _bits(expected))


@pytest.mark.parametrize("shape, dtype, tied", list(_cases()))
@pytest.mark.parametrize("n, raw", [(4, {}), (3, {"r": 0.7, "alpha": 0.9, "epsilon": 2.0 ** -9}), (1, {"r": 2.0})])
def test_ramplus_tl_equals_the_previous_code(shape, dtype, tied, n, raw):
    models, base = _inputs(shape, dtype, 37 + n, n=n, tied=tied)
    got, params = _merge("ramplus_tl", models, base, raw)
    expected = reference_ramplus_tl([m.float() for m in models], base.float(), params)
    assert torch.equal(_bits(got), _bits(expected))
