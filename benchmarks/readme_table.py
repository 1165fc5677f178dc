"""Print the README's merge-throughput table (and the per-phase profile) from benchmarks/results/merge_throughput.json.

    python benchmarks/readme_table.py [--json PATH] [--device cpu]

Every figure comes from the JSON, whose `machine` block names the machine: the table's heading says which.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LABELS = {"linear": "linear", "task_arithmetic": "task_arithmetic", "ties": "TIES (density 0.5)",
          "dare_ties": "DARE-TIES (density 0.5)", "dare_linear": "DARE linear (density 0.5)",
          "breadcrumbs": "Breadcrumbs", "breadcrumbs_ties": "Breadcrumbs-TIES", "della": "DELLA",
          "model_stock": "Model Stock"}
TARGETS = {"linear": 1.5, "ties": 2.0}  # over the issues' (safetensors) floor
STRICT_TARGETS = {"ties": 2.0, "dare_ties": 3.0}  # over the strict floor (issue 26)
PHASES = ("read", "sample", "scan", "select", "masks", "apply", "write")


def _seconds(x: float) -> str:
    return f"{x:.2g} s" if x < 10 else f"{x:.0f} s"


def _ratio(x: float, target: float | None) -> str:
    return f"{x:.2g}x" + (f" (target {target:g}x)" if target else "")


def machine_line(machine: dict) -> str:
    cpu = machine.get("cpu_model") or f"a {machine.get('cpus')}-CPU machine (model not recorded)"
    simd = f", {machine['simd']}" if "simd" in machine else ""
    parts = [f"{cpu}, {machine.get('usable_cpus', machine.get('cpus'))} cores{simd}",
             f"Python {machine.get('python')}, torch {machine.get('torch')}"
             + (f", numpy {machine['numpy']}" if "numpy" in machine else "")]
    if "compiled_kernel" in machine:
        parts.append("compiled kernel" if machine["compiled_kernel"] else "no compiled kernel")
    return "; ".join(parts)


def row(r: dict) -> str:
    label = LABELS.get(r["method"], r["method"])
    inputs = f"{r['n_models']} models" + (" + base" if r["inputs_read"] > r["n_models"] else "")
    dtype = "" if r.get("dtype", "bfloat16") == "bfloat16" else f" ({r['dtype']})"
    b = r["basin"]
    cells = [f"{label}, {inputs}{dtype}", f"{_seconds(b['seconds'])}, {b['peak_rss_mb'] / 1000:.2g} GB peak RSS",
             _ratio(r["basin_over_safetensors_floor"], TARGETS.get(r["method"])),
             _ratio(r["basin_over_floor"], STRICT_TARGETS.get(r["method"]))]
    mk = r.get("mergekit")
    cells.append(f"{r['mergekit_over_basin_time']:.2g}x slower, {mk['peak_rss_mb'] / 1000:.2g} GB" if mk else "")
    return "| " + " | ".join(cells) + " |"


def profile_row(r: dict) -> str | None:
    phases = r["basin"].get("phases")
    if not phases:
        return None
    cells = [f"{LABELS.get(r['method'], r['method'])}, {r['n_models']} models", _seconds(r["basin"]["seconds"])]
    for p in PHASES:
        ph = phases.get(p)
        if not ph:
            cells.append("")
            continue
        cell = f"{ph['thread_seconds']:.2f} s"
        if "cpu_seconds" in ph:  # profiles recorded since the CPU seconds were added
            cell += f" ({ph['cpu_seconds']:.2f} CPU)"
        cells.append(cell + (f" / {ph['bytes'] / 1e9:.1f} GB" if ph["bytes"] else ""))
    cpu = r["basin"].get("process", {})
    cells.append(f"{cpu.get('user_seconds', 0) + cpu.get('system_seconds', 0):.1f} s")
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/merge_throughput.json")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    data = json.loads(args.json.read_text())
    runs = sorted((r for r in data["runs"] if r.get("device", "cpu") == args.device),
                  key=lambda r: (list(LABELS).index(r["method"]) if r["method"] in LABELS else 99, -r["n_models"]))
    print(f"Measured on {machine_line(data['machine'])}" + (f" ({data['note']})" if data.get("note") else "")
          + (f"; `{data['command']}`" if data.get("command") else "") + ":\n")
    print("| merge (1 GB Llama-shaped models) | basin | / issues' floor | / strict floor | mergekit 0.1.5 |")
    print("| --- | --- | --- | --- | --- |")
    older = []  # rows of earlier runs (another note or machine): marked, their provenance listed below the table
    for r in runs:
        line = row(r)
        if r.get("note", "") != data.get("note", "") or r.get("machine", data["machine"]) != data["machine"]:
            older.append(r)
            line = line.replace(" |", " (*) |", 1)
        print(line)
    for r in older:
        where = machine_line(r["machine"]) if "machine" in r else "machine not recorded"
        print(f"\n(*) {LABELS.get(r['method'], r['method'])}, {r['n_models']} models: an earlier run ({where}"
              + (f"; {r['note']}" if r.get("note") else "") + ")", end="")
    if older:
        print()
    profiled = [line for line in map(profile_row, runs) if line]
    if profiled:
        print("\nWhere basin's time goes (per phase: thread-seconds summed over threads, the CPU seconds those threads "
              "spent where recorded, and bytes; CPU = the process's user + system seconds):\n")
        print("| merge | wall | " + " | ".join(PHASES) + " | CPU |")
        print("| --- " * (len(PHASES) + 3) + "|")
        for line in profiled:
            print(line)


if __name__ == "__main__":
    main()
