"""Whole-tensor reductions in float64 (merging.reductions) and the methods that use them, against float64
references on tensors of more than 10M entries and on the real all-MiniLM-L6-v2 word embeddings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from merging.methods.catalog import get_method
from merging.methods.spherical import nuslerp_tensors, slerp_tensors
from merging.reductions import (
    column_mean_std64,
    distance64,
    dot64,
    norm64,
    row_dots64,
    row_norms64,
    sum_squares64,
)

N = 10_500_000  # > 10M entries
WORDS = "embeddings.word_embeddings.weight"


@pytest.fixture(scope="module")
def large() -> tuple[torch.Tensor, torch.Tensor]:
    """Two correlated float32 vectors with a nonzero mean: float32 accumulation visibly loses digits on them."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(N, generator=g).add_(0.5)
    b = (a + 0.3 * torch.randn(N, generator=g)).mul_(1.7)
    return a, b


def exact_dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """The float64 reference: float32 products are exact in float64, summed by BLAS in float64."""
    return float(np.dot(a.double().reshape(-1).numpy(), b.double().reshape(-1).numpy()))


def test_dot_norm_distance_match_float64_on_10m_entries(large):
    a, b = large
    ref = exact_dot(a, b)
    assert abs(dot64(a, b) - ref) <= 1e-11 * abs(ref)
    assert math.isclose(norm64(a), math.sqrt(exact_dot(a, a)), rel_tol=1e-11)
    assert math.isclose(sum_squares64(b), exact_dot(b, b), rel_tol=1e-11)
    d = a.double() - b.double()
    assert math.isclose(distance64(a, b), math.sqrt(exact_dot(d, d)), rel_tol=1e-11)


def test_reductions_in_other_dtypes_and_shapes():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(300, 7, 11, generator=g), torch.randn(300, 77, generator=g)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        x, y = a.to(dtype), b.to(dtype)
        assert math.isclose(dot64(x, y), exact_dot(x.reshape(-1), y.reshape(-1)), rel_tol=1e-12)
        assert math.isclose(norm64(x), float(x.double().norm()), rel_tol=1e-12)
    rows = row_dots64(a.reshape(300, 77), b, chunk=1000)  # blocks of 12 rows
    torch.testing.assert_close(rows, (a.reshape(300, 77).double() * b.double()).sum(-1), rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(row_norms64(a), a.double().norm(dim=-1), rtol=1e-13, atol=0)
    assert dot64(torch.zeros(0), torch.zeros(0)) == 0.0 and norm64(torch.zeros(3, 0)) == 0.0
    with pytest.raises(ValueError):
        dot64(torch.ones(3), torch.ones(4))


def test_reductions_are_bit_identical_across_thread_counts(large):
    a, b = large[0][:2_000_000], large[1][:2_000_000]
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = (dot64(a, b), norm64(a), row_dots64(a.reshape(-1, 1000), b.reshape(-1, 1000)))
        torch.set_num_threads(max(2, old))
        many = (dot64(a, b), norm64(a), row_dots64(a.reshape(-1, 1000), b.reshape(-1, 1000)))
    finally:
        torch.set_num_threads(old)
    assert one[:2] == many[:2] and torch.equal(one[2], many[2])


def test_column_mean_std_against_float64():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5000, 13, generator=g).mul_(1e-3).add_(1e3)  # large mean, small spread: cancellation-prone
    mean, std = column_mean_std64(x, chunk=1024)
    x64 = x.double()
    torch.testing.assert_close(mean, x64.mean(0), rtol=1e-15, atol=0)
    torch.testing.assert_close(std, x64.std(0, unbiased=False), rtol=1e-9, atol=0)


def slerp64(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SLERP written out in float64 numpy (Shoemake 1985), the reference."""
    cos = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    omega = math.acos(cos)
    return (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)


def test_slerp_and_nuslerp_on_10m_entries_match_float64(large):
    a, b = large
    ref = torch.from_numpy(slerp64(0.3, a.double().numpy(), b.double().numpy()))
    for out in (slerp_tensors(0.3, a, b), nuslerp_tensors(0.3, a, b)):
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)


def whole_tensor_cases(a: torch.Tensor, b: torch.Tensor, base: torch.Tensor):
    """The methods whose statistics reduce a whole tensor (slerp's and nuslerp's angle are checked apart)."""
    yield "multislerp", [a, b], base, {"weight": [0.4, 0.6]}
    yield "model_stock", [a, b], base, {}


def all_cases(a: torch.Tensor, b: torch.Tensor, base: torch.Tensor):
    yield "slerp", [b], a, {"t": 0.4}
    yield "nuslerp", [a, b], None, {"weight": [0.3, 0.7]}
    yield "karcher", [a, b, base], None, {"weight": [1.0, 2.0, 1.0]}
    yield from whole_tensor_cases(a, b, base)
    yield "nuslerp", [a, b], None, {"weight": [0.3, 0.7], "nuslerp_flatten": False}
    yield "nuslerp", [a, b], None, {"weight": [0.3, 0.7], "nuslerp_flatten": False, "nuslerp_row_wise": True}
    yield "model_stock", [a, b], base, {"filter_wise": True}
    yield "arcee_fusion", [b], a, {}
    yield "sce", [a, b], base, {"select_topk": 1.0}


def check_methods_against_float64(cases) -> None:
    """Each method on float32 inputs equals the same method run on float64 copies (whose reductions and
    elementwise steps are all float64) to float32 precision: no digits lost in the whole-tensor reductions."""
    from merging.methods.apply import full_params

    for name, models, anchor, params in cases:
        method = get_method(name)
        full = full_params(method, params, len(models))
        rng = torch.Generator().manual_seed(0)
        out = method.fn(models, anchor, full, rng)
        ref = method.fn([m.double() for m in models], None if anchor is None else anchor.double(), full, rng)
        scale = float(ref.abs().max())
        if name == "arcee_fusion":  # a selection: the same entries chosen
            assert torch.equal(out, torch.where(ref == models[0].double(), models[0], anchor)), name
            continue
        assert out.dtype == torch.float32
        excess = (out.double() - ref).abs_().sub_(ref.abs().mul_(2e-6)).max()  # |out - ref| <= 2e-6 (|ref| + scale)
        assert float(excess) <= 2e-6 * scale, (name, params)


@pytest.mark.parametrize("shape", [(120, 250), (3000,), (6, 20, 30)])
def test_methods_match_float64(shape):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(shape, generator=g).add_(0.2)
    a = base + 0.3 * torch.randn(base.shape, generator=g).add_(0.3)
    b = base + 0.3 * torch.randn(base.shape, generator=g).add_(0.3)
    check_methods_against_float64(all_cases(a, b, base))


def test_minilm_word_embeddings_match_float64(minilm_dir):
    """The reported case: SLERP's angle on all-MiniLM-L6-v2's 11.7M-entry word embeddings and a perturbed copy."""
    from safetensors.torch import load_file

    base = load_file(str(minilm_dir / "model.safetensors"))[WORDS]
    assert base.numel() > 11_000_000
    g = torch.Generator().manual_seed(4)
    other = base + 0.15 * base.std() * torch.randn(base.shape, generator=g)  # cos 0.989: not colinear
    third = base + 0.15 * base.std() * torch.randn(base.shape, generator=g)
    ref = exact_dot(base.reshape(-1), other.reshape(-1))
    assert abs(dot64(base, other) - ref) <= 1e-11 * abs(ref)
    out = slerp_tensors(0.5, base, other).reshape(-1).double().numpy()
    ref64 = slerp64(0.5, base.double().reshape(-1).numpy(), other.double().reshape(-1).numpy())
    assert np.abs(out - ref64).max() <= 1e-6 * np.abs(ref64).max()
    check_methods_against_float64(whole_tensor_cases(other, third, base))
