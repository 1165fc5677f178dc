"""Landscape evaluator speed: path and 2-D slice vs the floor of full-batch forward passes, vs loss-landscapes.

Issue 5's benchmark. A 64-512-512-10 MLP on all 1,797 digits:
- a 25-point linear path evaluation (floor: 25 full-batch forward passes),
- a 21 x 21 filter-normalized 2-D landscape (floor: 441 full-batch forward passes),
each with basin's loop (`batched=False`) and `vmap` (`batched=True`) engines, and the same grid with the
`loss-landscapes` package (run in its own venv, --peer-python; benchmark-only, never a basin dependency).
Then where `vmap` over parameter points helps: a small model and small batch, same 441-point grid.
Timings are the best of --repeats runs, interleaved so that load from other processes hits all alike.

    .venv/bin/python benchmarks/landscape_speed.py [--peer-python /tmp/peer-loss-landscapes/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from evaluations.digits import load_digits_all, make_mlp, train_classifier
from evaluations.landscape import evaluate_path, linear_path, random_directions, slice_2d
from merging.io.atomic import atomic_write_text

RESULTS = Path(__file__).parent / "results" / "landscape_speed.json"

PEER_SCRIPT = r"""
import importlib.metadata, json, sys, time
import torch, loss_landscapes, loss_landscapes.metrics
from torch import nn
state, data = torch.load(sys.argv[1], weights_only=True), torch.load(sys.argv[2], weights_only=True)
steps, repeats = int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(int(sys.argv[5]))
widths = [64, 512, 512, 10]
layers = []
for i in range(len(widths) - 1):
    layers.append(nn.Linear(widths[i], widths[i + 1]))
    if i < len(widths) - 2:
        layers.append(nn.ReLU())
model = nn.Sequential(*layers)
model.load_state_dict(state)
model.eval()
x, y = data
metric = loss_landscapes.metrics.Loss(nn.CrossEntropyLoss(), x, y)
times = []
for _ in range(repeats):
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.no_grad():
        grid = loss_landscapes.random_plane(model, metric, distance=1, steps=steps, normalization="filter",
                                            deepcopy_model=True)
    times.append(time.perf_counter() - t0)
print(json.dumps({"seconds": min(times), "all_seconds": times, "shape": list(grid.shape),
                  "version": importlib.metadata.version("loss-landscapes"), "torch": torch.__version__}))
"""


def forward_floor(model: nn.Module, x: torch.Tensor, n: int) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(n):
            model(x)
    return time.perf_counter() - t0


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def best_of(fns: dict, repeats: int) -> dict:
    """Interleaved repeats; the best time of each."""
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn))
    return {k: {"seconds": min(v), "all_seconds": v} for k, v in times.items()}


def run_peer(peer_python: str, model: nn.Module, x, y, steps: int, repeats: int, threads: int) -> dict:
    if not peer_python or not Path(peer_python).exists():
        return {"skipped": f"no peer interpreter at {peer_python!r}"}
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(model.state_dict(), f"{tmp}/state.pt")
        torch.save((x, y), f"{tmp}/data.pt")
        script = Path(tmp) / "peer.py"
        script.write_text(PEER_SCRIPT)
        proc = subprocess.run([peer_python, str(script), f"{tmp}/state.pt", f"{tmp}/data.pt", str(steps),
                               str(repeats), str(threads)], capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def vmap_study(repeats: int) -> list[dict]:
    """441-point grids: loop vs vmap across model and batch sizes (where batching parameter points pays)."""
    x_all, y_all = load_digits_all()
    rows = []
    for widths, n in [([64, 32, 10], 64), ([64, 32, 10], 1797), ([64, 128, 128, 10], 256),
                      ([64, 512, 512, 10], 64)]:  # 64-512-512-10 x 1,797: the main grid above
        model = make_mlp(widths, seed=0).eval()
        x, y = x_all[:n], y_all[:n]
        d1, d2 = random_directions(model, n=2, seed=0)
        fns = {
            "loop": lambda m=model, a=d1, b=d2, d=(x, y): slice_2d(m, m, a, b, d, alphas=21, batched=False),
            "vmap": lambda m=model, a=d1, b=d2, d=(x, y): slice_2d(m, m, a, b, d, alphas=21, batched=True),
            "floor_441": lambda m=model, d=x: forward_floor(m, d, 441),
        }
        t = best_of(fns, repeats)
        rows.append({"widths": widths, "examples": n, "parameters": sum(p.numel() for p in model.parameters()),
                     "loop_s": t["loop"]["seconds"], "vmap_s": t["vmap"]["seconds"],
                     "floor_s": t["floor_441"]["seconds"],
                     "vmap_speedup_over_loop": t["loop"]["seconds"] / t["vmap"]["seconds"]})
        print(f"  {widths} x {n}: loop {rows[-1]['loop_s']:.3f}s  vmap {rows[-1]['vmap_s']:.3f}s  "
              f"floor {rows[-1]['floor_s']:.3f}s")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", default="/tmp/peer-loss-landscapes/bin/python")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--train-epochs", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    threads = torch.get_num_threads()
    x, y = load_digits_all()
    model_a = train_classifier(make_mlp([64, 512, 512, 10], seed=0), x, y, epochs=args.train_epochs, seed=0)
    model_b = train_classifier(make_mlp([64, 512, 512, 10], seed=1), x, y, epochs=args.train_epochs, seed=1)
    d1, d2 = random_directions(model_a, n=2, normalize="filter", seed=0)
    path = linear_path(model_a, model_b)
    fns = {
        "floor_25": lambda: forward_floor(model_a, x, 25),
        "path_loop": lambda: evaluate_path(model_a, path, (x, y), alphas=25, batched=False),
        "path_vmap": lambda: evaluate_path(model_a, path, (x, y), alphas=25, batched=True),
        "floor_441": lambda: forward_floor(model_a, x, 441),
        "slice_loop": lambda: slice_2d(model_a, model_a, d1, d2, (x, y), alphas=21, batched=False),
        "slice_vmap": lambda: slice_2d(model_a, model_a, d1, d2, (x, y), alphas=21, batched=True),
    }
    print("main grid (best of", args.repeats, "):")
    t = best_of(fns, args.repeats)
    for k, v in t.items():
        print(f"  {k:<11} {v['seconds']:.3f}s")
    print("loss-landscapes (peer venv):")
    peer = run_peer(args.peer_python, model_a, x, y, 21, args.repeats, threads)
    print(" ", peer if "seconds" not in peer else f"{peer['seconds']:.3f}s")
    print("vmap study:")
    study = vmap_study(args.repeats)
    f25, f441 = t["floor_25"]["seconds"], t["floor_441"]["seconds"]
    auto_batched = slice_2d(model_a, model_a, d1, d2, (x[:8], y[:8]), alphas=2).batched
    best_slice = min(t["slice_loop"]["seconds"], t["slice_vmap"]["seconds"])
    out = {
        "benchmark": "landscape_speed (issue 5)",
        "model": "MLP 64-512-512-10 (trained 5 epochs, Adam), all 1,797 digits, full batch",
        "timing": f"best of {args.repeats} interleaved repeats, seconds",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": threads,
                    "torch": torch.__version__, "load_average_at_start": os.getloadavg(),
                    "note": "2-core machine shared with 7 other helpers running tests and benchmarks at the "
                            "same time; absolute times are noisy, ratios within this run are the figures to read"},
        "path_25": {"floor_25_forward_s": f25, "loop_s": t["path_loop"]["seconds"],
                    "vmap_s": t["path_vmap"]["seconds"],
                    "loop_over_floor": t["path_loop"]["seconds"] / f25,
                    "vmap_over_floor": t["path_vmap"]["seconds"] / f25,
                    "best_over_floor": min(t["path_loop"]["seconds"], t["path_vmap"]["seconds"]) / f25},
        "slice_21x21": {"floor_441_forward_s": f441, "loop_s": t["slice_loop"]["seconds"],
                        "vmap_s": t["slice_vmap"]["seconds"],
                        "auto_chose": "vmap" if auto_batched else "loop",
                        "loop_over_floor": t["slice_loop"]["seconds"] / f441,
                        "vmap_over_floor": t["slice_vmap"]["seconds"] / f441,
                        "best_over_floor": best_slice / f441, "target_over_floor": 1.2},
        "loss_landscapes": {**peer, "grid": "random_plane(model, Loss(CrossEntropyLoss, x, y), distance=1, steps=21, "
                                             "normalization='filter')",
                            "basin_best_over_it": (best_slice / peer["seconds"]) if "seconds" in peer else None,
                            "deviations_from_li_et_al_2018": [
                                "random directions drawn uniform on [0, 1] (all non-negative) instead of Gaussian",
                                "biases (all 1-D parameters) are filter-normalized element by element instead of "
                                "being zeroed, so the plane moves biases as much as weights",
                                "after filter normalization each direction is rescaled as a whole to norm "
                                "||theta|| / (distance * steps) per step, so the plane spans about "
                                "||theta|| / distance: a larger `distance` shrinks the plane",
                                "the second direction is made orthogonal to the first (Li et al. use two independent "
                                "Gaussian directions, nearly orthogonal in high dimension)",
                            ],
                            "basin_instead": "Gaussian directions, filter-normalized per output filter (Li et al. "
                                             "2018, Eq. 1), bias and norm-layer directions zeroed by default "
                                             "(ignore=None keeps them), grid exactly [-range, range]^2 centred on "
                                             "the model"},
        "vmap_study_441_points": study,
        "auto_policy": "batched='auto' uses vmap for models with <= 200,000 parameters and no BatchNorm "
                       "(evaluations/landscape/evaluate.py AUTO_MAX_PARAMS); the loop otherwise",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
