"""Accuracy of basin's float32 exp and tanh (merging/methods/float_math.py) over every float32 input: the compiled
versions (_fused.c `pcb_math`, the same bits as the torch ones: tests/merging/test_float_math.py) against float64
numpy, per range of |x|. Prints and writes benchmarks/results/float_math_accuracy.json: the largest error in ulp of
the float32 result (the spacing at the float64 value; subnormal spacing near 0) and the largest relative error, per
function and range, and the inputs whose results are not finite or NaN (checked exactly).

    python benchmarks/float_math_accuracy.py [--step 1]   # step > 1: every step-th bit pattern only
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from merging.methods import kernels

RESULT = Path(__file__).resolve().parent / "results" / "float_math_accuracy.json"
RANGES = [(0.0, 2.0 ** -126), (2.0 ** -126, 2.0 ** -12), (2.0 ** -12, 0.5), (0.5, 10.0), (10.0, 89.0),
          (89.0, np.inf)]  # |x|: subnormal, tiny, small, moderate, large, huge (inf included)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--step", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    worst = {f: {f"{lo:g}..{hi:g}": [0.0, 0.0, None] for lo, hi in RANGES} for f in ("exp", "tanh")}
    special_mismatches = {"exp": 0, "tanh": 0}
    chunk = 1 << 24
    for first in range(0, 2 ** 32, chunk * args.step):
        bits = np.arange(first, min(2 ** 32, first + chunk * args.step), args.step, dtype=np.uint64).astype(np.uint32)
        x = bits.view(np.float32)
        src = torch.from_numpy(x)
        out = torch.empty_like(src)
        for kind, (name, reference) in enumerate((("exp", np.exp), ("tanh", np.tanh))):
            kernels.compiled.pcb_math(kind, src.data_ptr(), out.data_ptr(), src.numel())
            got = out.numpy().astype(np.float64)
            with np.errstate(over="ignore", invalid="ignore"):
                ref = reference(x.astype(np.float64))
                ref32 = ref.astype(np.float32)
            finite = np.isfinite(ref32)
            nan = np.isnan(x)
            special_mismatches[name] += int(np.count_nonzero(
                got[~finite & ~nan] != ref32[~finite & ~nan])) + int(np.count_nonzero(~np.isnan(got[nan])))
            spacing = np.spacing(np.abs(ref32).astype(np.float32)).astype(np.float64)
            ulp = np.where(finite, np.abs(got - ref) / spacing, 0.0)
            rel = np.where(finite & (ref != 0), np.abs(got - ref) / np.abs(np.where(ref != 0, ref, 1)), 0.0)
            a = np.abs(x.astype(np.float64))
            for lo, hi in RANGES:
                sel = (a >= lo) & (a < hi) if hi < np.inf else a >= lo
                if not sel.any():
                    continue
                entry = worst[name][f"{lo:g}..{hi:g}"]
                i = int(np.argmax(np.where(sel, ulp, -1)))
                if ulp[i] > entry[0]:
                    entry[0], entry[2] = float(ulp[i]), float(x[i])
                entry[1] = max(entry[1], float(np.max(np.where(sel, rel, 0))))
    result = {"inputs": "every float32 bit pattern" if args.step == 1 else f"every {args.step}th bit pattern",
              "reference": "numpy float64", "columns": ["max ulp", "max relative error", "at x"],
              "by_abs_x": worst, "non_finite_or_nan_mismatches": special_mismatches}
    text = json.dumps(result, indent=1)
    print(text)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
