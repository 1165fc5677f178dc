"""The single-tensor microbenchmark of issue 26: one 5504 x 2048 bf16 weight of 4 models plus a base (Llama-like
fine-tuning deltas), each task-arithmetic method merged with the compiled kernel and without (torch ops), per
phase (merging.profiling), in CPU seconds of this process (robust to other processes on a shared machine), best
of --repeats, 1 and 2 chunk threads. Writes benchmarks/results/kernel_micro.json with the machine block.

    python benchmarks/kernel_micro.py [--methods ties dare_ties task_arithmetic] [--repeats 5]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PARAMS = {"task_arithmetic": {}, "ties": {"density": 0.5}, "dare_ties": {"density": 0.5},
          "dare_linear": {"density": 0.5}, "breadcrumbs_ties": {"density": 0.5, "gamma": 0.01}}


def inputs(shape=(5504, 2048), n=4) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    return [(base.float() + 0.0005 * torch.randn(shape, generator=g)).to(torch.bfloat16) for _ in range(n)], base


def measure(method: str, models, base, workers: int, repeats: int, kernel: bool) -> dict:
    from merging import profiling
    from merging.methods import chunking, kernels
    from merging.methods.apply import full_params, merge_tensor
    from merging.methods.catalog import get_method

    m = get_method(method)
    params = full_params(m, {"weight": 0.25, **PARAMS[method]}, len(models))
    saved, old = kernels.compiled, chunking.set_chunk_workers(workers)
    kernels.compiled = saved if kernel else None
    best: dict | None = None
    try:
        for _ in range(repeats):
            cpu, wall = time.process_time(), time.perf_counter()
            with profiling.profiling() as profile:
                out = merge_tensor(m, "w", models, base, params, 0, torch.bfloat16)
            run = {"cpu_seconds": round(time.process_time() - cpu, 4),
                   "wall_seconds": round(time.perf_counter() - wall, 4),
                   "phases": {p: round(s, 4) for p, s in profile.seconds.items()},
                   "phase_cpu_seconds": {p: round(s, 4) for p, s in profile.cpu_seconds.items()},
                   "sha256": hashlib.sha256(out.view(torch.int16).numpy().tobytes()).hexdigest()}
            best = run if best is None or run["cpu_seconds"] < best["cpu_seconds"] else best
    finally:
        kernels.compiled = saved
        chunking.set_chunk_workers(old)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--note", default="", help="free text recorded in the JSON (e.g. machine load)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/kernel_micro.json")
    args = parser.parse_args()
    from merging import profiling

    torch.set_num_threads(1)  # as the engine runs chunked merges: one intra-op thread, chunks on Python threads
    models, base = inputs()
    rows = []
    for method in args.methods:
        for workers in (1, 2):
            for kernel in (True, False):
                row = {"method": method, "workers": workers, "kernel": kernel,
                       **measure(method, models, base, workers, args.repeats, kernel)}
                rows.append(row)
                print(json.dumps(row))
        same = {r["sha256"] for r in rows if r["method"] == method}
        assert len(same) == 1, f"{method}: bits differ between threads or kernel on/off"
    from merging.methods import kernels

    philox = kernels.compiled.philox_version() if hasattr(kernels.compiled, "philox_version") else None
    args.out.write_text(json.dumps({"benchmark": "kernel_micro", "shape": [5504, 2048], "models": 4,
                                    "machine": profiling.machine(), "philox_kernel": philox, "note": args.note,
                                    "runs": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
