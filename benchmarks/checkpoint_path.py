"""A 25-point checkpoint path on a ~100M-parameter Llama: wall time vs the forward floor, peak anonymous memory.

Issue 20's benchmark. Two seeded random Llama-shaped checkpoints (safetensors, float32 on disk) and 2,048 tokens
(16 blocks of 128 seeded random token ids, the batch format of `load_data`). Two fresh subprocesses:

- floor: `load_model(A)`, then 25 plain forward passes over the data (`measure` with the causal-LM objective);
- path: `load_model(A)`, then the 25-point line A -> B: each point written into the one model by `write_point`
  (A and B memory-mapped, float64 row chunks) and measured with the same `measure`, the two phases timed apart
  (the loop `evaluate_checkpoint_points` runs).

Memory: anonymous memory above the process's value before `load_model` (RssAnon sampled every millisecond:
`evaluations.peak_memory`), against one model's size in the evaluation dtype; also VmHWM (anonymous + the
checkpoint's file pages mapped at the time). The machine is shared: timings are noisy.

    PYTHONPATH=. .venv/bin/python benchmarks/checkpoint_path.py [--layers 9] [--points 25] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "checkpoint_path.json"
ROOT = Path(__file__).resolve().parents[1]


def build(folder: Path, seed: int, layers: int) -> int:
    """A seeded random Llama (vocab 32000, hidden 768, MLP 2048, 12 heads / 4 KV heads, untied head)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=layers,
                         num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=512,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def data(tokens: int = 2048, seq_len: int = 128, batch: int = 4, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 32000, (tokens // seq_len, seq_len), generator=g)
    return [{"input_ids": ids[s : s + batch], "attention_mask": torch.ones_like(ids[s : s + batch]),
             "labels": ids[s : s + batch]} for s in range(0, len(ids), batch)]


def child(mode: str, a: str, b: str, points: int, threads: int) -> dict:
    """One measured run in this (fresh) process: 'floor' or 'path'."""
    import numpy as np
    import torch
    import transformers  # noqa: F401 - imported before the measurement starts
    from transformers import LlamaForCausalLM  # noqa: F401

    from evaluations.lm_path import measure, open_sources, write_point
    from evaluations.model_losses import CAUSAL_LM
    from evaluations.models import load_model
    from evaluations.peak_memory import PeakMemory

    torch.set_num_threads(threads)
    batches = data()
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        model = load_model(a)
        load_s = time.perf_counter() - t0
        load_anon = mem.anon_peak - mem.anon_start
        write_s, forward_s, write_cpu, forward_cpu, losses = [], [], [], [], []
        sources = open_sources(model, [a, b]) if mode == "path" else None
        t_all, c_all = time.perf_counter(), time.process_time()
        for alpha in np.linspace(0, 1, points).tolist():
            if sources is not None:
                t, c = time.perf_counter(), time.process_time()
                write_point(model, sources, [1.0 - alpha, alpha])
                write_s.append(time.perf_counter() - t)
                write_cpu.append(time.process_time() - c)
            t, c = time.perf_counter(), time.process_time()
            losses.append(measure(model, CAUSAL_LM, batches).loss)
            forward_s.append(time.perf_counter() - t)
            forward_cpu.append(time.process_time() - c)
        total_s, total_cpu = time.perf_counter() - t_all, time.process_time() - c_all
    size = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in model.state_dict().values()}.values())
    return {"mode": mode, "model_bytes": size, "load_s": load_s, "total_s": total_s, "write_s": sum(write_s),
            "forward_s": sum(forward_s), "total_cpu_s": total_cpu, "write_cpu_s": sum(write_cpu),
            "forward_cpu_s": sum(forward_cpu), "losses": losses, "load_anon_bytes": load_anon,
            "anon_growth_bytes": mem.anon_growth, "rss_growth_bytes": mem.rss_growth,
            "tokens": sum(int(x["input_ids"].numel()) for x in batches)}


def run_child(mode: str, a: Path, b: Path, points: int, threads: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(a), str(b), "--points", str(points),
                          "--threads", str(threads)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=9)
    parser.add_argument("--points", type=int, default=25)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--child", nargs=3, metavar=("MODE", "A", "B"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.points, args.threads)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        a, b = Path(tmp) / "a", Path(tmp) / "b"
        params = build(a, 0, args.layers)
        build(b, 1, args.layers)
        floor = run_child("floor", a, a, args.points, args.threads)
        path = run_child("path", a, b, args.points, args.threads)
    size = path["model_bytes"]
    result = {
        "benchmark": "checkpoint_path", "parameters": params, "layers": args.layers, "points": args.points,
        "tokens": path["tokens"], "dtype": "float32",
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads,
                    "load_average": os.getloadavg(), "python": platform.python_version(),
                    "note": "shared machine: the load average (1, 5, 15 min) at the end says how loaded; the "
                            "ratios are within one run, CPU (user + sys) ratios less sensitive to load"},
        "floor": floor, "path": path,
        "time_ratio": path["total_s"] / floor["total_s"],
        "time_ratio_target": 1.2,
        "cpu_time_ratio": path["total_cpu_s"] / floor["total_cpu_s"],
        "write_share": path["write_s"] / path["total_s"],
        "forward_ratio": path["forward_s"] / floor["forward_s"],
        "peak_anon_over_model": path["anon_growth_bytes"] / size,
        "peak_anon_over_model_target": 1.3,
        "load_anon_over_model": path["load_anon_bytes"] / size,
        "floor_anon_over_model": floor["anon_growth_bytes"] / size,
        # the bound is 1.3x one model *plus activations*: the floor's growth beyond its loaded model is
        # the forward's activations (same model, data and batches), so the path's growth less that is what the
        # path itself holds
        "path_anon_less_activations_over_model":
            (path["anon_growth_bytes"] - (floor["anon_growth_bytes"] - floor["load_anon_bytes"])) / size,
        "vmhwm_over_model": path["rss_growth_bytes"] / size,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    keys = ("time_ratio", "cpu_time_ratio", "write_share", "forward_ratio", "peak_anon_over_model",
            "load_anon_over_model", "floor_anon_over_model", "path_anon_less_activations_over_model",
            "vmhwm_over_model")
    print(json.dumps({k: round(result[k], 3) for k in keys}))


if __name__ == "__main__":
    main()
