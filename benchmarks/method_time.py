"""Per-tensor cost of every data-free tensorwise merge method against TIES (issue 24: "SVD-based ones: report
their time per tensor"). One 5504 x 2048 bf16 weight (kernel_micro's shape, Llama-like) of 4 models plus a base,
merged by `merging.methods.apply.merge_tensor`, the function the streaming engine calls per tensor (elementwise
methods stream it in chunks there, as here). Methods taking fewer models get the first ones. CPU seconds of this
process (less sensitive to other processes than wall time) and wall seconds, best of --repeats (one run when the
first takes over 10 s). TIES is timed again right before each method and the ratio taken to that run,
so a machine whose load changes during the benchmark still gives comparable ratios. Writes
benchmarks/results/method_time.json with the machine block.

    python benchmarks/method_time.py [--repeats 3] [--threads 1] [--methods ties pcb ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import best_of  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PARAMS = {"ties": {"density": 0.2}, "dare_ties": {"density": 0.2}, "dare_linear": {"density": 0.2},
          "della": {"density": 0.2}, "della_linear": {"density": 0.2}, "breadcrumbs": {"density": 0.9},
          "breadcrumbs_ties": {"density": 0.9}, "slerp": {"t": 0.5}, "nearswap": {"t": 0.5},
          "wudi": {"iterations": 20}}  # WUDI's iterations cost the same each: scaled to its default 400 below
SLOW_SECONDS = 10.0


def data_free_methods() -> list[str]:
    """Every registered tensorwise method that needs neither data nor LoRA factors."""
    from merging.methods.catalog import METHODS

    return sorted(n for n, m in METHODS.items() if not (m.info.needs_lora or m.info.needs_data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--methods", nargs="*", default=None,
                        help="method names (default: every data-free one); cart:lowrank / tsv:lowrank for svd: lowrank")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default torch's; 1 gives stable ratios on a shared machine)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/method_time.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from merging.methods.apply import full_params, merge_tensor
    from merging.methods.catalog import get_method

    out_dim, in_dim = 5504, 2048
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(out_dim, in_dim, generator=g) * 0.02).to(torch.bfloat16)
    models = [(base.float() + torch.randn(out_dim, in_dim, generator=g) * 0.002).to(torch.bfloat16)
              for _ in range(args.models)]
    ties = get_method("ties")
    ties_params = full_params(ties, PARAMS["ties"], args.models)
    started_load = round(os.getloadavg()[0], 2)
    rows = []
    for entry in args.methods or data_free_methods():
        name, _, svd = entry.partition(":")  # "cart:lowrank": the method with `svd: lowrank`
        method = get_method(name)
        n = min(args.models, method.info.max_models or args.models)
        params = full_params(method, {**PARAMS.get(name, {}), **({"svd": svd} if svd else {})}, n)
        inputs = models[:n]
        reference = best_of(lambda: merge_tensor(ties, "w", models, base, ties_params, 0), args.repeats, SLOW_SECONDS)
        row = {"method": entry, "models": n, "svd": name in {"iso_c", "iso_cts", "tsv", "cart"},
               **best_of(lambda m=method, x=inputs, p=params: merge_tensor(m, "w", x, base, p, 0), args.repeats,
                          SLOW_SECONDS)}
        row["ties_cpu_seconds"] = reference["cpu_seconds"]
        row["cpu_vs_ties"] = round(row["cpu_seconds"] / reference["cpu_seconds"], 2)
        row["wall_vs_ties"] = round(row["wall_seconds"] / reference["wall_seconds"], 2)
        if "iterations" in params and name in PARAMS:
            scale = method.info.defaults()["iterations"] / params["iterations"]
            row["iterations"] = params["iterations"]
            row["cpu_vs_ties_at_default_iterations"] = round(row["cpu_vs_ties"] * scale, 1)
        row["load_average_1min"] = round(os.getloadavg()[0], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
        write(args.out, args.models, rows, started_load)


def write(path: Path, models: int, rows: list[dict], started_load: float) -> None:
    """The JSON so far (rewritten after each method, so a stopped run keeps what it measured), with the machine's
    1-minute load average at the start and after each method: where other processes add half a core or more to
    this benchmark's threads, the figures are "loaded" (the ratios to TIES, timed beside each, stay comparable)."""
    from merging import profiling
    from merging.io.atomic import atomic_write_text

    machine, threads = profiling.machine(), torch.get_num_threads()
    loads = [started_load] + [r["load_average_1min"] for r in rows]
    notes = (f"loaded: 1-minute load average {min(loads)}-{max(loads)} on {machine.get('usable_cpus')} usable cores, "
             f"this benchmark running {threads} thread(s)" if max(loads) - threads >= 0.5 else "unloaded")
    result = {"benchmark": "method_time", "shape": [5504, 2048], "dtype": "bfloat16", "models": models,
              "torch_threads": threads, "machine": machine, "load_average_1min_at_start": started_load,
              "notes": notes, "runs": rows}
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
