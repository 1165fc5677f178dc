"""basin's own float32 exp and tanh, in torch ops; merging/methods/_fused.c (its PCB section) runs the same IEEE
float32 operations in the same order, so both give the same bits on any machine (torch's own exp and tanh are
library code, Sleef's or libm's, whose last bits a C kernel cannot reproduce and no build promises to keep).

exp(x): Cody and Waite's range reduction x = k ln 2 + r, k = rint(x log2 e) (the round-to-nearest by adding and
subtracting 1.5 * 2^23), r = (x - k LN2_HI) - k LN2_LO (LN2_HI has 15 significant bits, so k LN2_HI is exact for
|k| < 2^8), then expm1(r) = r + r^2 Q(r) on |r| <= ln 2 / 2, Q of degree 5 fitted here (Lawson's iteratively
reweighted least squares for the minimax relative error of r + r^2 Q against float64 expm1; coefficients rounded to
float32), and exp(x) = ((1 + expm1(r)) 2^k1) 2^k2 with k1 = k >> 1, k2 = k - k1 (each factor a normal power of
two, so only the last product rounds, also into subnormals). x is first clamped to [-104, 89] (exp is 0 below,
inf above, in float32); NaN is returned as it came.

tanh(x): copysign(e / (e + 2), x) with e = expm1(2 |x|) = 2^k expm1(r) + (2^k - 1) through the same reduction and
polynomial (no cancellation for small |x|: there k = 0 and e = expm1(r); tanh(+-0) = +-0, subnormals are kept),
|x| clamped to 10 first (tanh is 1.0f from 9.02 on); NaN is returned as it came.

Accuracy against float64 numpy, over every 257th float32 bit pattern (both signs, subnormals to inf and NaN;
benchmarks/float_math_accuracy.py, benchmarks/results/float_math_accuracy.json; tests/merging/test_float_math.py
bounds every 997th at 1 and 2.5 ulp): exp within 0.93 ulp (relative error 1.1e-7), tanh within 2.33 ulp
(1.7e-7), worst near |x| = 0.06 where e + 2 rounds; exact results at +-0 (exp 1, tanh +-0), overflow to inf and
underflow to 0 where float32 does, tanh +-1 from |x| = 9.02, NaN returned with its bits.
"""

from __future__ import annotations

import torch

LOG2E = float.fromhex("0x1.715476p+0")  # float32(1 / ln 2)
LN2_HI = float.fromhex("0x1.62e4p-1")  # ln 2 to 15 significant bits
LN2_LO = float.fromhex("0x1.7f7d1cp-20")  # float32(ln 2 - LN2_HI)
ROUNDER = float.fromhex("0x1.8p+23")  # (t + ROUNDER) - ROUNDER rounds |t| < 2^22 to the nearest integer, ties even
EXPM1_Q = tuple(float.fromhex(c) for c in (  # Q(r) = sum_i EXPM1_Q[i] r^i, Horner from the highest term
    "0x1p-1", "0x1.555554p-3", "0x1.5554b2p-5", "0x1.11118ap-7", "0x1.6d71f4p-10", "0x1.a032bep-13"))
EXP_LOW, EXP_HIGH, TANH_HIGH = -104.0, 89.0, 10.0


def _f32(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32, device=like.device)


def _pow2(k: torch.Tensor) -> torch.Tensor:
    """2^k as float32 for int32 k in [-126, 127] (the exponent field alone)."""
    return ((k + 127) << 23).view(torch.float32)


def _reduce(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, expm1(r)) with x = k ln 2 + r: k an int32 tensor; x float32 with |x| <= 104."""
    kf = x.mul(_f32(LOG2E, x)).add_(_f32(ROUNDER, x)).sub_(_f32(ROUNDER, x))
    r = (x - kf * _f32(LN2_HI, x)) - kf * _f32(LN2_LO, x)
    q = torch.full_like(r, EXPM1_Q[-1])
    for c in reversed(EXPM1_Q[:-1]):
        q = q.mul_(r).add_(_f32(c, x))
    return kf.to(torch.int32), r + (r * r) * q


def exp32(x: torch.Tensor) -> torch.Tensor:
    """exp of a float32 tensor (a new tensor); see the module docstring."""
    xc = torch.where(x > EXP_LOW, x, _f32(EXP_LOW, x))
    xc = torch.where(xc < EXP_HIGH, xc, _f32(EXP_HIGH, x))
    k, p = _reduce(xc)
    k1 = k >> 1
    y = (p.add_(_f32(1.0, x))).mul_(_pow2(k1)).mul_(_pow2(k - k1))
    return torch.where(x == x, y, x)


def tanh32(x: torch.Tensor) -> torch.Tensor:
    """tanh of a float32 tensor (a new tensor); see the module docstring."""
    a = x.abs()
    a = torch.where(a < TANH_HIGH, a, _f32(TANH_HIGH, x))
    k, p = _reduce(a + a)
    s = _pow2(k)
    e = (s * p).add_(s - _f32(1.0, x))
    t = e / (e + _f32(2.0, x))
    return torch.where(x == x, torch.copysign(t, x), x)
