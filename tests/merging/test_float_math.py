"""basin's float32 exp and tanh (merging/methods/float_math.py; _fused.c's PCB section): the compiled and the torch
versions give the same bits, and both are within a few ulp of float64 numpy over the whole float32 range."""

import numpy as np
import pytest
import torch

from merging.methods import kernels
from merging.methods.float_math import exp32, tanh32

SPECIALS = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 1e-38, 1.17549435e-38, 3.4028235e38,
                     -3.4028235e38, 88.72283, 88.72284, 89.0, 89.5, -87.33655, -103.97, -104.0, -104.5, 9.01, 9.02,
                     10.0, 20.0, -20.0, 0.34657359, -0.34657359, 1e-8, -1e-8, 2.0 ** -12, 0.5, 1.0, 4.0, 64.0],
                    dtype=np.float32)


def _grid(step: int = 997) -> np.ndarray:
    """Every step-th float32 bit pattern (both signs, zeros, subnormals, normals, inf, NaN) and SPECIALS."""
    bits = np.arange(0, 2 ** 32, step, dtype=np.uint64).astype(np.uint32)
    return np.concatenate([bits.view(np.float32), SPECIALS])


def _ulps(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """|got - ref| in units of the float32 spacing at ref (the subnormal spacing 2^-149 near 0)."""
    spacing = np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64)
    return np.abs(got.astype(np.float64) - ref) / spacing


def _compiled(kind: int, x: np.ndarray) -> np.ndarray:
    src = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    out = torch.empty_like(src)
    kernels.compiled.pcb_math(kind, src.data_ptr(), out.data_ptr(), src.numel())
    return out.numpy()


needs_kernel = pytest.mark.skipif(kernels.compiled is None or not hasattr(kernels.compiled, "pcb_math"),
                                  reason="the compiled kernel is not built")


@pytest.mark.parametrize("name, fn, reference, bound", [("exp", exp32, np.exp, 1.0), ("tanh", tanh32, np.tanh, 2.5)])
def test_against_float64_over_the_float32_range(name, fn, reference, bound):
    x = _grid()
    got = fn(torch.from_numpy(x)).numpy()
    with np.errstate(over="ignore", invalid="ignore"):
        ref = reference(x.astype(np.float64))
        ref32 = ref.astype(np.float32)
    finite = np.isfinite(ref32)
    assert _ulps(got[finite], ref[finite]).max() <= bound, name
    # overflow to inf where float32 overflows, NaN for NaN (its bits kept), exact at +-0
    assert np.array_equal(got[~finite & ~np.isnan(x)], ref32[~finite & ~np.isnan(x)])
    nan = np.isnan(x)
    assert np.array_equal(got[nan].view(np.uint32), x[nan].view(np.uint32))
    zeros = fn(torch.tensor([0.0, -0.0])).numpy()
    expected = [1.0, 1.0] if name == "exp" else [0.0, -0.0]
    assert np.array_equal(zeros.view(np.uint32), np.array(expected, dtype=np.float32).view(np.uint32))


def test_tanh_keeps_tiny_values_and_saturates():
    tiny = np.array([1e-45, -1e-45, 1e-40, -3e-39, 1e-30], dtype=np.float32)
    assert np.array_equal(tanh32(torch.from_numpy(tiny)).numpy(), tiny)
    big = torch.tensor([9.1, 50.0, 1e30, float("inf"), -9.1, -float("inf")])
    assert torch.equal(tanh32(big), torch.tensor([1.0, 1.0, 1.0, 1.0, -1.0, -1.0]))
    assert torch.equal(exp32(torch.tensor([-200.0, -float("inf"), 100.0, float("inf")])),
                       torch.tensor([0.0, 0.0, float("inf"), float("inf")]))


@needs_kernel
@pytest.mark.parametrize("kind, fn", [(0, exp32), (1, tanh32)])
def test_compiled_equals_torch_bit_for_bit(kind, fn):
    x = _grid(101)
    assert np.array_equal(_compiled(kind, x).view(np.uint32), fn(torch.from_numpy(x)).numpy().view(np.uint32))


@needs_kernel
def test_pcb_exp_equals_exp_on_its_domain():
    """The kernel's exp without clamps (kind 2), PCB's exponents n u^2 in [0, 64], is exp32 there bit for bit."""
    x = np.concatenate([np.linspace(0, 88, 1_000_003, dtype=np.float32), np.array([0.0, 88.0], dtype=np.float32),
                        np.arange(0x3F800000 - 2 ** 20, 0x3F800000 + 2 ** 20, dtype=np.uint32).view(np.float32)])
    assert np.array_equal(_compiled(2, x).view(np.uint32), exp32(torch.from_numpy(x)).numpy().view(np.uint32))
