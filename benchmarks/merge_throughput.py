"""Merge throughput and memory: basin vs the read+write floor vs mergekit, on generated checkpoints.

Generates N Llama-shaped checkpoints of about --size-gb each (bf16, sharded, plus a base for
methods that need one: the inputs are base + small random "fine-tuning" deltas), then for each
method and N runs, each in a fresh subprocess:
- two floors, each run 3 times per repeat, the least kept (on a shared machine a slow floor would flatter
  basin's ratio), every run with its output folder deleted first (none pays for an old output's page cache):
  - safetensors floor, the issues' definition and the one their targets refer to: "read every input tensor
    once and write one output with safetensors alone": `safe_open` + `get_tensor` (which only maps the
    file) + `clone()` (which reads the bytes in), and `save_file` of one model's tensors;
  - strict floor, our own stricter yardstick (no target): every input shard mapped and populated from the
    page cache, every byte passed through the CPU once (copied into one reused 4 MB buffer), and one model's
    worth of bytes written with `os.pwrite`; no fresh memory is touched, so it runs 2-3x faster than the
    safetensors floor; its read and write parts are timed apart, and (outside the floor) sha256 of the written
    model, what basin's content hash costs, so each phase of basin's profile has its own yardstick;
- basin: `merging.merge` of the recipe;
- mergekit (if --mergekit points at a `mergekit-yaml`): the same YAML.
Records wall time, peak RSS (VmHWM) and RSS after imports (the interpreter's baseline) per run, and for basin the
profile (`merging.profiling`): per phase (read, sample, scan, select, masks, apply, write) thread-seconds, bytes and
calls, and the process's CPU seconds, page faults and /proc/self/io counters; the JSON names the machine (CPU
model, cores, SIMD level, versions, whether the compiled kernel ran) and the command. `benchmarks/readme_table.py`
prints the README's table from it;
for task_arithmetic and ties, the maximum absolute difference per tensor between basin's and
mergekit's outputs. Data lives under --workdir (default /tmp), never in the repository.

    python benchmarks/merge_throughput.py --size-gb 1 --n 2 4 --methods linear
    python benchmarks/merge_throughput.py --n 4 --methods ties dare_ties task_arithmetic
    python benchmarks/merge_throughput.py --n 4 --methods ties --device cuda --out gpu.json  # another machine
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPARE = {"task_arithmetic", "ties", "linear", "breadcrumbs", "breadcrumbs_ties"}
# methods with top-k trims: (density, gamma); Breadcrumbs keeps ranks gamma n < r <= (density + gamma) n
TRIMMED = {"ties": (0.5, 0.0), "breadcrumbs": (0.5, 0.01), "breadcrumbs_ties": (0.5, 0.01)}


def llama_shapes(size_gb: float, itemsize: int = 2) -> tuple[dict[str, tuple[int, ...]], dict]:
    """Tensor shapes of a Llama-like model of about `size_gb` GB (`itemsize` bytes per weight), and its config.json."""
    hidden, inter, vocab, heads = 2048, 5504, 32000, 16
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    fixed = 2 * vocab * hidden + hidden
    layers = max(1, round((size_gb * 1e9 / itemsize - fixed) / per_layer))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": heads, "vocab_size": vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
        "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16" if itemsize == 2 else "float32",
    }
    return shapes, config


def generate(folder: Path, shapes: dict, config: dict, seed: int, base: Path | None, shard_bytes: int) -> None:
    """Write a sharded checkpoint (config's torch_dtype): random (seed) or `base` + 1% noise."""
    from safetensors.torch import load_file, save_file

    if (folder / "model.safetensors.index.json").exists():
        return
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, config["torch_dtype"])
    base_files = {}
    if base is not None:
        index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
        base_files = index
    shard, size, k, weight_map = {}, 0, 0, {}
    cache: dict[str, dict] = {}

    def flush():
        nonlocal shard, size, k
        if shard:
            k += 1
            name = f"model-{k:05d}.safetensors"
            save_file(shard, tmp / name, metadata={"format": "pt"})
            weight_map.update({n: name for n in shard})
            shard, size = {}, 0

    for name, shape in shapes.items():
        if base is None:
            t = (torch.randn(shape, generator=g) * 0.02).to(dtype)
        else:
            f = base_files[name]
            if f not in cache:
                cache.clear()
                cache[f] = load_file(base / f)
            t = (cache[f][name].float() + 0.0005 * torch.randn(shape, generator=g)).to(dtype)
        if size + t.nbytes > shard_bytes:
            flush()
        shard[name] = t
        size += t.nbytes
    flush()
    total = k
    renamed = {}
    for i in range(1, total + 1):
        new = f"model-{i:05d}-of-{total:05d}.safetensors"
        os.replace(tmp / f"model-{i:05d}.safetensors", tmp / new)
        renamed[f"model-{i:05d}.safetensors"] = new
    total_size = sum(dtype.itemsize * int(torch.tensor(s).prod()) for s in shapes.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": {n: renamed[f] for n, f in weight_map.items()}}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp / "config.json").write_text(json.dumps(config))
    os.replace(tmp, folder)


def needs_base(method: str) -> bool:
    from merging.methods.catalog import get_method

    return get_method(method).info.needs_base


def accepts(method: str, name: str) -> bool:
    from merging.methods.catalog import get_method

    return name in {p.name for p in get_method(method).info.params}


def recipe_for(method: str, models: list[Path], base: Path | None) -> dict:
    if needs_base(method):
        params = {k: v for k, v in (("weight", 1.0 / len(models)), ("density", TRIMMED.get(method, (0.5, 0.0))[0]))
                  if accepts(method, k)}
        r = {"merge_method": method, "base_model": str(base),
             "models": [{"model": str(m), "parameters": dict(params)} for m in models],
             "dtype": "float32", "out_dtype": "bfloat16"}
        return r
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": str(models[0]), "parameters": {"t": 0.5},
                "models": [{"model": str(m)} for m in models[:2]], "dtype": "float32", "out_dtype": "bfloat16"}
    return {"merge_method": method, "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
            "dtype": "float32", "out_dtype": "bfloat16"}


RSS_PROBE = (
    "def _rss(key):\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith(key):\n"
    "            return int(line.split()[1]) / 1024\n"
)

BASIN_CHILD = RSS_PROBE + """
import json, sys, time
import torch
from merging import merge, profiling
baseline = _rss('VmRSS')
before = profiling.process_counters()
t0 = time.perf_counter()
with profiling.profiling() as profile:
    report = merge(sys.argv[1], sys.argv[2], overwrite=True, progress=False, device=sys.argv[3])
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "baseline_rss_mb": baseline, "peak_rss_mb": _rss('VmHWM'),
                  "content_hash": report.content_hash, "phases": profile.to_json(),
                  "process": profiling.counters_since(before)}))
"""

SAFETENSORS_FLOOR_CHILD = RSS_PROBE + """
import json, os, sys, time
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from pathlib import Path
baseline = _rss('VmRSS')
t0 = time.perf_counter()
out = {}
for k, folder in enumerate(sys.argv[2:]):
    index = json.loads((Path(folder) / "model.safetensors.index.json").read_text())["weight_map"]
    for shard in sorted(set(index.values())):
        with safe_open(str(Path(folder) / shard), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name).clone()  # get_tensor maps the file; clone reads the bytes in
                if k == 0:
                    out[name] = t
save_file(out, sys.argv[1] + "/model.safetensors", metadata={"format": "pt"})
print(json.dumps({"seconds": time.perf_counter() - t0, "baseline_rss_mb": baseline, "peak_rss_mb": _rss('VmHWM'),
                  "process": {"user_seconds": os.times().user, "system_seconds": os.times().system}}))
"""

STRICT_FLOOR_CHILD = RSS_PROBE + """
import hashlib, json, mmap, os, sys, time
import numpy as np
from pathlib import Path
baseline = _rss('VmRSS')
t0 = time.perf_counter()
scratch = np.empty(1 << 22, dtype=np.uint8)
out = os.open(sys.argv[1] + "/model.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
written, reading, writing = 0, 0.0, 0.0
for k, folder in enumerate(sys.argv[2:]):
    index = json.loads((Path(folder) / "model.safetensors.index.json").read_text())["weight_map"]
    for shard in sorted(set(index.values())):
        started = time.perf_counter()
        with open(Path(folder) / shard, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            mapped.madvise(getattr(mmap, "MADV_POPULATE_READ", 22))
        except OSError:
            pass
        data = np.frombuffer(mapped, dtype=np.uint8)
        for start in range(0, data.size, scratch.size):  # every byte through the CPU once
            piece = data[start:start + scratch.size]
            scratch[:piece.size] = piece
        reading += time.perf_counter() - started
        if k == 0:  # write one model's worth of bytes
            started = time.perf_counter()
            done = 0
            while done < data.size:
                done += os.pwrite(out, data[done:], written + done)
            written += data.size
            writing += time.perf_counter() - started
        del data, piece
        mapped.close()
os.close(out)
seconds = time.perf_counter() - t0
# not part of the floor: what sha256 of one model's bytes costs (basin hashes every output tensor for its content hash
# and resume journal, on a thread of its own); timed on the bytes just written, from the page cache
started = time.perf_counter()
with open(sys.argv[1] + "/model.bin", "rb") as f:
    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    hashlib.sha256(memoryview(mapped))
    mapped.close()
print(json.dumps({"seconds": seconds, "read_seconds": reading, "write_seconds": writing,
                  "sha256_one_model_seconds": time.perf_counter() - started,
                  "baseline_rss_mb": baseline, "peak_rss_mb": _rss('VmHWM'),
                  "process": {"user_seconds": os.times().user, "system_seconds": os.times().system}}))
"""


def run_child(code: str, args: list[str]) -> dict:
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_mergekit(exe: str, recipe_path: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen([exe, str(recipe_path), str(out), "--allow-crimes", "--out-shard-size", "5B"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, _, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode not in (0, None) or not any(out.glob("*.safetensors")):
        raise RuntimeError(err[-3000:])
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024}


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def compare(a: Path, b: Path) -> dict:
    ta, tb = load_folder(a), load_folder(b)
    diffs, differing, total = {}, 0, 0
    for n in sorted(ta):
        if n in tb:
            d = (ta[n].float() - tb[n].float()).abs()
            diffs[n] = float(d.max())
            differing += int((d > 0).sum())
            total += d.numel()
    return {"max_abs_diff": max(diffs.values()) if diffs else None, "missing_in_mergekit": sorted(set(ta) - set(tb)),
            "fraction_of_entries_differing": differing / total if total else None, "per_tensor": diffs}


def threshold_ties(models: list[Path], base: Path, trim: tuple[float, float], out_a: Path, out_b: Path) -> dict:
    """Where two top-k merges differ, is it only where some model's |tau| equals its trim threshold?

    mergekit keeps the entries its (unstable) argsort puts first among those tied at the threshold, basin
    the lowest flat indices; anything else differing would be a real disagreement.
    """
    from safetensors import safe_open

    def reader(folder: Path):
        index = folder / "model.safetensors.index.json"
        files = json.loads(index.read_text())["weight_map"] if index.exists() else None

        def get(name: str) -> torch.Tensor:
            f = files[name] if files else next(p.name for p in folder.glob("*.safetensors"))
            with safe_open(str(folder / f), framework="pt") as h:
                return h.get_tensor(name)
        return get

    def names(folder: Path) -> list[str]:
        out = []
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                out += list(h.keys())
        return out

    get_a, get_b, get_base = reader(out_a), reader(out_b), reader(base)
    gets = [reader(m) for m in models]
    differing = outside = 0
    for name in names(out_a):
        diff = get_a(name).float() != get_b(name).float()
        if not bool(diff.any()):
            continue
        b = get_base(name).float()
        tied = torch.zeros_like(diff)
        for get in gets:
            magnitude = (get(name).float() - b).abs().reshape(-1)
            n = magnitude.numel()
            for k in (int(trim[0] * n) + int(trim[1] * n), int(trim[1] * n)):
                if 0 < k < n:
                    threshold = magnitude.kthvalue(n - k + 1).values
                    tied |= (magnitude == threshold).view(diff.shape)
        differing += int(diff.sum())
        outside += int((diff & ~tied).sum())
    return {"entries_differing": differing, "differing_where_no_model_ties_at_its_threshold": outside}


def machine_block() -> dict:
    """The machine these figures come from (merging.profiling.machine), and whether the compiled kernel ran."""
    from merging import profiling
    from merging.methods import kernels

    return {**profiling.machine(), "compiled_kernel": kernels.compiled is not None,
            "kernel_functions": sorted(n for n in dir(kernels.compiled) if not n.startswith("_"))
            if kernels.compiled is not None else [],
            "philox_kernel": kernels.compiled.philox_version() if hasattr(kernels.compiled, "philox_version") else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--n", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--methods", nargs="+", default=["linear"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/basin-bench"))
    parser.add_argument("--mergekit", default="/tmp/peer-mergekit/bin/mergekit-yaml")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/merge_throughput.json")
    parser.add_argument("--note", default="", help="free text recorded in the JSON (e.g. machine load)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="of the generated checkpoints (float32 deltas have no ties at trim thresholds)")
    parser.add_argument("--device", default="cpu", help="where basin computes (reads and writes stay on the CPU)")
    args = parser.parse_args()

    itemsize = 2 if args.dtype == "bfloat16" else 4
    shapes, config = llama_shapes(args.size_gb, itemsize)
    size = sum(int(torch.tensor(s).prod()) for s in shapes.values()) * itemsize
    data = args.workdir / f"llama-{args.size_gb:g}gb-{args.dtype}"
    with_base = any(needs_base(m) for m in args.methods)
    n_max = max(args.n)
    print(f"generating {n_max} checkpoints of {size / 1e9:.2f} GB in {data}", file=sys.stderr)
    base = data / "base"
    if with_base:
        generate(base, shapes, config, 1000, None, 500 * 10**6)
    models = []
    for i in range(n_max):
        models.append(data / f"m{i}")
        generate(models[-1], shapes, config, i, base if with_base else None, 500 * 10**6)
    mergekit = args.mergekit if Path(args.mergekit).exists() else None
    results = []
    for method in args.methods:
        for n in args.n:
            inputs = models[:n]
            recipe = recipe_for(method, inputs, base if needs_base(method) else None)
            recipe_path = args.workdir / f"recipe-{method}-{n}.yaml"
            recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
            n_read = n + (1 if needs_base(method) else 0)
            row: dict = {"method": method, "n_models": n, "inputs_read": n_read, "model_gb": round(size / 1e9, 3),
                         "dtype": args.dtype, "device": args.device, "note": args.note, "machine": machine_block()}
            out_floor, out_basin, out_mk = (args.workdir / x for x in ("out-floor", "out-basin", "out-mergekit"))
            floors: dict[str, list[dict]] = {"safetensors_floor": [], "floor": []}
            basins, mks = [], []
            for _ in range(args.repeats):
                floor_inputs = [str(p) for p in inputs] + ([str(base)] if needs_base(method) else [])
                for _ in range(3):  # a floor is the denominator: a slow one would flatter basin
                    for key, child in (("safetensors_floor", SAFETENSORS_FLOOR_CHILD), ("floor", STRICT_FLOOR_CHILD)):
                        shutil.rmtree(out_floor, ignore_errors=True)
                        out_floor.mkdir(parents=True)
                        floors[key].append(run_child(child, [str(out_floor), *floor_inputs]))
                shutil.rmtree(out_basin, ignore_errors=True)  # as for the floor: no old output holding page cache
                basins.append(run_child(BASIN_CHILD, [str(recipe_path), str(out_basin), args.device]))
            for _ in range(args.repeats if mergekit else 0):  # after basin's runs: its 6 GB evicts the inputs' cache
                try:
                    mks.append(run_mergekit(mergekit, recipe_path, out_mk))
                except RuntimeError as err:
                    row["mergekit_error"] = str(err)[-800:]
            best = min(basins, key=lambda r: r["seconds"])
            row["basin"] = best
            for key, runs_of_floor in floors.items():
                row[key] = min(runs_of_floor, key=lambda r: r["seconds"])
                row[f"basin_over_{key}"] = round(best["seconds"] / row[key]["seconds"], 3)
            row["basin_rss_above_baseline_mb"] = round(best["peak_rss_mb"] - best["baseline_rss_mb"], 1)
            if mks:
                mk = min(mks, key=lambda r: r["seconds"])
                row["mergekit"] = mk
                row["mergekit_over_basin_time"] = round(mk["seconds"] / best["seconds"], 3)
                if method in COMPARE:
                    row["vs_mergekit"] = compare(out_basin, out_mk)
                    if method in TRIMMED:
                        row["vs_mergekit"]["at_threshold_ties"] = threshold_ties(inputs, base, TRIMMED[method],
                                                                                 out_basin, out_mk)
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "vs_mergekit"}), file=sys.stderr)
            shutil.rmtree(out_floor, ignore_errors=True)
            shutil.rmtree(out_basin, ignore_errors=True)
            shutil.rmtree(out_mk, ignore_errors=True)
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    runs = [r for r in previous.get("runs", [])
            if not any(r["method"] == x["method"] and r["n_models"] == x["n_models"]
                       and r.get("dtype", "bfloat16") == x["dtype"] and r.get("device", "cpu") == x["device"]
                       for x in results)]
    payload = {
        "benchmark": "merge_throughput",
        "command": "python benchmarks/merge_throughput.py " + " ".join(sys.argv[1:]),
        "machine": machine_block(),
        "note": args.note or previous.get("note", ""),
        "floors": {"safetensors_floor": "the issues' floor (their targets refer to it): every input tensor read once "
                                        "with safetensors get_tensor + clone, one model written with save_file",
                   "floor": "strict, no target: inputs mapped + populated, each byte copied once into a reused 4 MB "
                            "buffer, one model pwritten; its read and write parts timed apart, and (outside the floor) "
                            "sha256 of one model's bytes, what basin's content hash costs"},
        "targets": {"linear_time_over_safetensors_floor": 1.5, "ties_time_over_safetensors_floor": 2.0,
                    "rss_above_baseline_mb": 1500, "mergekit_over_basin_time": 2.0},
        "runs": runs + results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
