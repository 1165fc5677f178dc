"""KFAC / EKFAC operators vs curvlinops' KFACLinearOperator / EKFACLinearOperator (benchmark only; curvlinops
runs in its own venv, as a second process).

Models (float64, trained 5 epochs with Adam on all 1,797 standardized digits): a 64-256-256-10 ReLU MLP, a
CNN (Conv2d 1->8 3x3 pad 1, Conv2d 8->8 3x3 pad 1 stride 2, Linear 128->10) and a weight-sharing "seq" model
(each digit as 8 positions of 8 features, Linear 8->64 and 64->64 at every position, mean over positions,
Linear 64->10). The seq model and the CNN also run KFAC-reduce (kfac_approx="reduce", Eschenhagen et al. 2023)
beside the default KFAC-expand. Data: the 1,797 digits in 6
batches of 300; cross-entropy (mean) for both, and mse (mean) against one-hot targets for the MLP. Cases: KFAC
and EKFAC, type-2 and empirical Fisher (the MC Fisher draws from different random streams: not compared).
Expected: equal up to float64 rounding, except the mse empirical Fisher, which curvlinops normalises by the
N * k loss terms and basin by the N rows (its rows' losses are (1/k)|f - y|^2): curvlinops' is k = 10 times
basin's (`ratio_to_curvlinops` 0.1). curvlinops runs with separate_weight_and_bias=False
(basin's block is [W | b]), the case's kfac_approx on both sides, check_deterministic=False.

Compared on the same 4 random vectors: K v (relative error), tr K, (K + 1e-3 I)^{-1} v (curvlinops'
KFACInverseLinearOperator with use_exact_damping=True); basin's log det(K + 1e-3 I) is recorded (curvlinops'
logdet is undamped: finite roundoff for a singular K, where basin's is -inf). Timed: operator construction plus the
first matvec (curvlinops computes its factors at the first product), and one more matvec (median of 20).
Rounds alternate peer and basin (best of the rounds per side): the 2-core machine is shared with other jobs,
so timings are noisy. Writes benchmarks/results/curvature_kfac.json.

Set up the peer once: python3 -m venv /work/peers/cl && /work/peers/cl/bin/pip install torch==2.13.0
    && /work/peers/cl/bin/pip install curvlinops-for-pytorch (then reinstall torch==2.13.0 and uninstall
    torchvision and nvidia-* if pip pulled them in)
Usage: python benchmarks/curvature_kfac.py [--peer /work/peers/cl/bin/python] [--rounds 2] [--threads 2]
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
from pathlib import Path

import torch
from torch import nn

from evaluations.digits import load_digits_all, train_classifier
from evaluations.objective import supervised
from evaluations.probes.kfac import KFACOperator

DAMPING = 1e-3
CASES = [(model, loss, kind, fisher, "expand") for model, loss in (("mlp", "cross_entropy"), ("cnn", "cross_entropy"),
                                                                    ("mlp", "mse")) for kind in ("kfac", "ekfac")
         for fisher in ("type-2", "empirical")]
# weight sharing (the sequence model's 8 positions, the CNN's feature-map locations): KFAC-expand vs KFAC-reduce
CASES += [("seq", "cross_entropy", kind, fisher, approx) for approx in ("expand", "reduce")
          for kind in ("kfac", "ekfac") for fisher in ("type-2", "empirical")]
CASES += [("cnn", "cross_entropy", kind, "type-2", "reduce") for kind in ("kfac", "ekfac")]

MODELS = r'''
import torch
from torch import nn

class MeanOverPositions(nn.Module):
    def forward(self, x):
        return x.mean(1)

def build(name):
    if name == "mlp":
        return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    if name == "seq":  # each digit as 8 positions (rows) of 8 features; two position-wise layers, mean, head
        return nn.Sequential(nn.Unflatten(1, (8, 8)), nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                             MeanOverPositions(), nn.Linear(64, 10))
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(128, 10))
'''

PEER = MODELS + r'''
import json, statistics, sys, time
from curvlinops import EKFACLinearOperator, KFACInverseLinearOperator, KFACLinearOperator
torch.set_num_threads(int(sys.argv[3]))
blob = torch.load(sys.argv[1], weights_only=True)
out = {}
for case in json.loads(sys.argv[4]):
    name, loss, kind, fisher, approx = case
    model = build(name).double()
    model.load_state_dict(blob["state"][name])
    model.eval()
    params = list(model.parameters())
    cls = KFACLinearOperator if kind == "kfac" else EKFACLinearOperator
    t = time.perf_counter()
    loss_func = nn.CrossEntropyLoss() if loss == "cross_entropy" else nn.MSELoss()
    op = cls(model, loss_func, params, blob["batches"][loss], fisher_type=fisher,
             separate_weight_and_bias=False, check_deterministic=False, kfac_approx=approx)
    vs = blob["vectors"][name]
    op @ vs[0]  # curvlinops computes its factors lazily, at the first product
    build_s = time.perf_counter() - t
    kv = torch.stack([op @ v for v in vs])
    times = []
    for _ in range(20):
        t = time.perf_counter(); op @ vs[0]; times.append(time.perf_counter() - t)
    res = {"kv": kv, "trace": float(op.trace), "build_s": build_s, "matvec_s": statistics.median(times)}
    if kind == "kfac":
        inv = KFACInverseLinearOperator(op, damping=1e-3, use_exact_damping=True)
        res["inv"] = torch.stack([inv @ v for v in vs])
    out["|".join(case)] = res
torch.save(out, sys.argv[2])
'''

ns: dict = {}
exec(MODELS, ns)  # the same architectures on both sides
build = ns["build"]


def trained(name: str, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    model = build(name)
    return train_classifier(model, x, y, epochs=5, seed=0).double().eval()


def basin_case(model: nn.Module, batches: list, loss: str, kind: str, fisher: str, approx: str,
               vs: torch.Tensor) -> dict:
    t = time.perf_counter()
    op = KFACOperator(model, supervised(loss), batches, kind=kind, fisher_type=fisher, kfac_approx=approx)
    op.matvec(vs[0])
    build_s = time.perf_counter() - t
    kv = op.matmat(vs)
    times = []
    for _ in range(20):
        t = time.perf_counter()
        op.matvec(vs[0])
        times.append(time.perf_counter() - t)
    res = {"kv": kv, "trace": op.trace(), "build_s": build_s, "matvec_s": statistics.median(times),
           "logdet_damped": op.logdet(DAMPING), "inv": op.inverse(DAMPING).matmat(vs)}
    return res


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def compare(ours: dict, theirs: dict) -> dict:
    row = {"matvec_rel_error": rel(ours["kv"], theirs["kv"]),
           "trace": ours["trace"], "trace_rel_diff": abs(ours["trace"] - theirs["trace"]) / abs(theirs["trace"]),
           "logdet_damped_basin": ours["logdet_damped"]}
    row["ratio_to_curvlinops"] = float(ours["kv"].flatten() @ theirs["kv"].flatten() / theirs["kv"].norm() ** 2)
    if "inv" in theirs:
        row["inverse_matvec_rel_error"] = rel(ours["inv"], theirs["inv"])
    return row


def run_peer(python: str, blob_path: str, out_path: str, threads: int) -> dict:
    script = Path(blob_path).with_name("peer.py")
    script.write_text(PEER)
    env = {**os.environ, "PYTHONPATH": ""}
    done = subprocess.run([python, str(script), blob_path, out_path, str(threads), json.dumps(CASES)],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"curvlinops peer failed: {done.stderr[-3000:]}")
    return torch.load(out_path, weights_only=True)


def peer_version(python: str) -> str:
    code = "import importlib.metadata as m; print(m.version('curvlinops-for-pytorch'), m.version('torch'))"
    return subprocess.run([python, "-c", code], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peer", default="/work/peers/cl/bin/python")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/curvature_kfac.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    x, y = load_digits_all()
    models = {name: trained(name, x, y) for name in ("mlp", "cnn", "seq")}
    x = x.double()
    onehot = nn.functional.one_hot(y, 10).double()
    batches = {"cross_entropy": [(x[i : i + 300], y[i : i + 300]) for i in range(0, len(x), 300)],
               "mse": [(x[i : i + 300], onehot[i : i + 300]) for i in range(0, len(x), 300)]}
    gen = torch.Generator().manual_seed(0)
    vectors = {n: torch.randn(4, sum(p.numel() for p in m.parameters()), generator=gen, dtype=torch.float64)
               for n, m in models.items()}
    peer_runs, ours_runs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        blob = f"{tmp}/blob.pt"
        torch.save({"state": {n: m.state_dict() for n, m in models.items()}, "batches": batches,
                    "vectors": vectors}, blob)
        for r in range(args.rounds):
            peer_runs.append(run_peer(args.peer, blob, f"{tmp}/peer{r}.pt", args.threads))
            print(f"round {r}: curvlinops done", file=sys.stderr, flush=True)
            ours_runs.append({"|".join(c): basin_case(models[c[0]], batches[c[1]], *c[1:], vectors[c[0]])
                              for c in CASES})
            print(f"round {r}: basin done", file=sys.stderr, flush=True)
    rows = []
    for case in CASES:
        key = "|".join(case)
        row = {"model": case[0], "loss": case[1], "kind": case[2], "fisher_type": case[3], "kfac_approx": case[4],
               **compare(ours_runs[0][key], peer_runs[0][key])}
        for side, runs in (("basin", ours_runs), ("curvlinops", peer_runs)):
            row[f"{side}_build_s"] = min(run[key]["build_s"] for run in runs)
            row[f"{side}_matvec_ms"] = 1e3 * min(run[key]["matvec_s"] for run in runs)
        rows.append(row)
        print(json.dumps(row))
    result = {"peer": f"curvlinops-for-pytorch, torch ({peer_version(args.peer)})", "basin_torch": torch.__version__,
              "threads": args.threads, "rounds": args.rounds, "dtype": "float64", "damping": DAMPING,
              "data": "1797 digits, 6 batches of 300", "params": {n: vectors[n].shape[1] for n in vectors},
              "note": "shared 2-core machine, other jobs running: timings are noisy (best of the rounds)",
              "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
              "load_average_at_start": [round(v, 2) for v in load_start],
              "cases": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
