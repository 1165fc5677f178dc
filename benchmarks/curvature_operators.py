"""Curvature operators side by side with curvlinops (benchmarks only; curvlinops lives in its own venv).

Same model (a 64-128-128-10 tanh MLP, 26,122 parameters, seeded), same data (512 examples, one batch,
cross-entropy), same vectors: basin's Hessian / GGN / empirical Fisher against curvlinops'
HessianLinearOperator / GGNLinearOperator / EFLinearOperator. Reported: the largest relative difference of
the products, the median time per matrix-vector product, and the time of the top-3 eigenvalues (basin's
Lanczos at tol 1e-3, its `converged` confirmed by a second Krylov run; curvlinops through scipy's eigsh at tol
1e-3; each the best of `--topk-repeats` runs by CPU time, `benchmarks/_timing.best_of`, with its products
counted), one thread each, float32 products checked in float64 too. Both top-3s are compared with basin's Lanczos run
to tol 1e-10 (float64; 1e-6 in float32), untimed.

    python benchmarks/curvature_operators.py --curvlinops-python /work/peers/cl/bin/python

The curvlinops side is this file run with `--side curvlinops` by that interpreter (torch and curvlinops only).
Timings are of a shared machine: read them as ratios measured seconds apart, not as absolute figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from _timing import best_of
from torch import nn

OPERATORS = ("hessian", "ggn", "fisher")
REPS = 7
REFERENCE_TOL = {torch.float64: 1e-10, torch.float32: 1e-6}  # basin's Lanczos, run to this tolerance


def make_problem(dtype: torch.dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))
    model = model.to(dtype).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(512, 64, generator=gen, dtype=dtype)
    y = torch.randint(0, 10, (512,), generator=gen)
    vs = torch.randn(4, sum(p.numel() for p in model.parameters()), generator=gen, dtype=dtype)
    return model, x, y, vs


def _median_time(fn, reps: int = REPS) -> float:
    fn()  # warm-up (graphs, allocations)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def basin_side(dtype: torch.dtype, repeats: int) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

    from evaluations.probes import curvature_operator, lanczos

    model, x, y, vs = make_problem(dtype)
    out = {}
    for name in OPERATORS:
        op = curvature_operator(name, model, nn.CrossEntropyLoss(), (x, y))
        products = torch.stack([op.matvec(v) for v in vs])
        per = _median_time(lambda op=op: op.matvec(vs[0]))
        runs = []
        timing = best_of(partial(_record, runs, partial(lanczos, op, k=3, tol=1e-3)), repeats)
        eig, wall, cpu = runs[0], timing["wall_seconds"], timing["cpu_seconds"]  # deterministic: every run the same
        ref = lanczos(op, k=3, tol=REFERENCE_TOL[dtype])  # untimed: the values both sides are measured against
        out[name] = {"products": products, "matvec_s": per, "topk_s": wall, "topk_cpu_s": cpu,
                     "top3": [float(v) for v in eig.values], "reference_top3": [float(v) for v in ref.values],
                     "reference_converged": ref.converged, "converged": eig.converged,
                     "topk_products": eig.iterations, "confirmation_products": eig.extra["confirmation_steps"]}
    return out


def _record(runs: list, fn) -> None:
    runs.append(fn())


class _Counted:
    """A scipy operator whose products are counted (one Python call per product: microseconds)."""

    def __init__(self, op, linear_operator):
        self.op, self.count = op, 0
        self.scipy = linear_operator(op.shape, matvec=self._matvec, dtype=op.dtype)

    def _matvec(self, x):
        self.count += 1
        return self.op.matvec(x)

    def eigsh(self, eigsh):
        self.count = 0
        top = eigsh(self.scipy, k=3, which="LA", tol=1e-3, return_eigenvectors=False)
        return top, self.count


def curvlinops_side(dtype: torch.dtype, repeats: int) -> dict:
    from curvlinops import EFLinearOperator, GGNLinearOperator, HessianLinearOperator
    from scipy.sparse.linalg import LinearOperator, eigsh

    model, x, y, vs = make_problem(dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    classes = {"hessian": HessianLinearOperator, "ggn": GGNLinearOperator, "fisher": EFLinearOperator}
    out = {}
    for name in OPERATORS:
        op = classes[name](model, nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False)
        products = torch.stack([op @ v for v in vs])
        per = _median_time(lambda op=op: op @ vs[0])
        counting, runs = _Counted(op.to_scipy(), LinearOperator), []
        # ARPACK's random start differs per run (so do its products): the run with the fewest CPU seconds is kept
        timing = best_of(partial(_record, runs, partial(counting.eigsh, eigsh)), repeats)
        out[name] = {"products": products, "matvec_s": per, "topk_s": timing["wall_seconds"],
                     "topk_cpu_s": timing["cpu_seconds"], "topk_products": [r[1] for r in runs],
                     "top3": sorted((float(v) for v in runs[0][0]), reverse=True)}
    return out


def _rel_error(values: list[float], reference: list[float]) -> float:
    return max(abs(v - r) / abs(r) for v, r in zip(values, reference))


def compare(ours: dict, theirs: dict, dtype: str) -> dict:
    rows = {}
    for name in OPERATORS:
        a, b = ours[name]["products"].double(), theirs[name]["products"].double()
        rows[name] = {
            "dtype": dtype,
            "max_rel_diff": float(((a - b).norm(dim=1) / b.norm(dim=1)).max()),
            "basin_matvec_ms": 1e3 * ours[name]["matvec_s"], "curvlinops_matvec_ms": 1e3 * theirs[name]["matvec_s"],
            "matvec_speedup": theirs[name]["matvec_s"] / ours[name]["matvec_s"],
            "basin_top3_s": ours[name]["topk_s"], "curvlinops_top3_s": theirs[name]["topk_s"],
            "top3_speedup": theirs[name]["topk_s"] / ours[name]["topk_s"],
            "top3_cpu_speedup": theirs[name]["topk_cpu_s"] / ours[name]["topk_cpu_s"],
            "basin_top3": ours[name]["top3"], "curvlinops_top3": theirs[name]["top3"],
            "reference_top3": ours[name]["reference_top3"], "reference_converged": ours[name]["reference_converged"],
            "basin_top3_max_rel_error": _rel_error(ours[name]["top3"], ours[name]["reference_top3"]),
            "curvlinops_top3_max_rel_error": _rel_error(theirs[name]["top3"], ours[name]["reference_top3"]),
            "basin_top3_converged": ours[name]["converged"], "basin_top3_products": ours[name]["topk_products"],
            "basin_confirmation_products": ours[name]["confirmation_products"],
            "curvlinops_top3_products": theirs[name]["topk_products"],
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--side", choices=("basin", "curvlinops"), default="basin")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--out", help="(curvlinops side) where to save its results")
    parser.add_argument("--curvlinops-python", default="/work/peers/cl/bin/python")
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "curvature_operators.json"))
    parser.add_argument("--topk-repeats", type=int, default=3, help="top-3 runs per side (the best by CPU time)")
    parser.add_argument("--note", default="shared 2-core machine: timings are noisy, compare ratios (see the load "
                        "averages)")
    args = parser.parse_args()
    if args.topk_repeats < 1:
        parser.error(f"--topk-repeats: must be at least 1, got {args.topk_repeats}")
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    if args.side == "curvlinops":
        torch.save(curvlinops_side(dtype, args.topk_repeats), args.out)
        return
    results = {"note": args.note, "topk_repeats": args.topk_repeats,
               "load_average_at_start": [round(v, 2) for v in os.getloadavg()], "runs": {}}
    for name in ("float64", "float32"):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "cl.pt"
            subprocess.run([args.curvlinops_python, __file__, "--side", "curvlinops", "--dtype", name, "--out",
                            str(path), "--topk-repeats", str(args.topk_repeats)], check=True)
            theirs = torch.load(path, weights_only=True)
        ours = basin_side(getattr(torch, name), args.topk_repeats)
        results["runs"][name] = compare(ours, theirs, name)
        for op, row in results["runs"][name].items():
            print(f"{name} {op:8s} rel diff {row['max_rel_diff']:.2e}  matvec {row['basin_matvec_ms']:.2f} ms vs "
                  f"{row['curvlinops_matvec_ms']:.2f} ms (x{row['matvec_speedup']:.2f})  top-3 "
                  f"{row['basin_top3_s']:.2f} s vs {row['curvlinops_top3_s']:.2f} s (x{row['top3_speedup']:.2f})")
    results["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
