"""Hessian and NTK probe speed vs PyHessian (benchmark only; PyHessian runs in its own venv, side by side).

Model: 64-512-512-10 ReLU MLP trained 10 epochs (Adam) on all 1,797 standardized digits; Hessian of the
cross-entropy over the full batch. PyHessian runs as a second process that waits for commands, so each
timed basin call is followed at once by the same PyHessian call (interleaved rounds on a shared machine;
best and median of the rounds for both). Every eigenvalue is checked against a tightly converged Lanczos
reference (random start, rigorous residual bound 1e-9). Writes benchmarks/results/probe_speed.json.

Set up the peer once: python3 -m venv /tmp/peer-pyhessian && /tmp/peer-pyhessian/bin/pip install torch pyhessian
Usage: python benchmarks/probe_speed.py [--peer /tmp/peer-pyhessian/bin/python] [--rounds 5] [--skip-ntk]
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

from evaluations.digits import load_digits_all, make_mlp, train_classifier
from evaluations.probes import HessianOperator, empirical_ntk, hutchinson_trace, lanczos, spectral_density

PEER = r'''
import json, sys, time, torch
from torch import nn
import pyhessian
ph = sys.modules["pyhessian.hessian"]  # the module (the package re-exports the class under the same name)
torch.set_num_threads(int(sys.argv[3]))
calls = [0]
hvp = ph.hessian_vector_product
def counted(*a, **k):
    calls[0] += 1
    return hvp(*a, **k)
ph.hessian_vector_product = counted
layers = [nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)]
model = nn.Sequential(*layers)
model.load_state_dict(torch.load(sys.argv[1], weights_only=True))
model.eval()
x, y = torch.load(sys.argv[2], weights_only=True)
h = ph.hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    cmd = line.strip()
    calls[0] = 0
    t = time.perf_counter()
    if cmd.startswith("top"):
        vals, _ = h.eigenvalues(top_n=int(cmd[3:]), tol=1e-3)
        out = {"values": [float(v) for v in vals]}
    elif cmd.startswith("cold"):
        fresh = ph.hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
        vals, _ = fresh.eigenvalues(top_n=int(cmd[4:]), tol=1e-3)
        out = {"values": [float(v) for v in vals]}
    elif cmd == "trace":
        out = {"samples": [float(v) for v in h.trace(maxIter=100, tol=1e-3)]}
    elif cmd == "density":
        try:
            h.density(iter=20, n_v=1); out = {"density": "ok"}
        except Exception as err:
            out = {"density": f"{type(err).__name__}: {err}"}
    else:
        break
    out.update({"seconds": time.perf_counter() - t, "hvps": calls[0]})
    print(json.dumps(out), flush=True)
'''

BIG_NTK = r'''
import json, sys, time, torch
from evaluations.digits import load_digits_all, make_mlp
from evaluations.probes import empirical_ntk
torch.set_num_threads(int(sys.argv[3]))
model = make_mlp([64, 512, 512, 10])
model.load_state_dict(torch.load(sys.argv[1], weights_only=True))
model.eval()
n = int(sys.argv[2])
x, _ = load_digits_all()
gen = torch.Generator().manual_seed(0)
extra = x[: n - len(x)] + 0.1 * torch.randn(max(0, n - len(x)), x.shape[1], generator=gen)
xs = torch.cat([x, extra])[:n]  # the 1,797 digits, then noisy copies of the first ones
def status_gb(field):  # VmHWM: this process's peak resident set (ru_maxrss would carry the parent's over exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1e6
base = status_gb("VmHWM")
t = time.perf_counter()
k = empirical_ntk(model, xs, kind="full")
secs = time.perf_counter() - t
peak = status_gb("VmHWM")
rows = torch.randperm(n, generator=gen)[:12]
check = empirical_ntk(model, xs[rows], kind="full", method="jacobian")
c = 10
got = k.view(n, c, n, c)[rows][:, :, rows].reshape(len(rows) * c, len(rows) * c)
print(json.dumps({"inputs": n, "outputs": c, "kind": "full", "method": "auto (structured)", "seconds": secs,
                  "peak_rss_gb": peak, "rss_before_gb": base, "kernel_gb": k.numel() * k.element_size() / 1e9,
                  "spot_check_rows": len(rows),
                  "spot_check_max_rel_diff_vs_jacobian": float((got - check).norm() / check.norm())}))
'''


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def rel_error(values, ref: torch.Tensor) -> float:
    vals = torch.tensor(sorted((float(v) for v in values), reverse=True), dtype=torch.float64)
    return float(((vals - ref[: len(vals)]).abs() / ref[: len(vals)].abs()).max())


class Peer:
    """PyHessian in its own interpreter, answering one command per line."""

    def __init__(self, python: str, model: nn.Module, x, y, threads: int, tmp: str):
        torch.save(model.state_dict(), f"{tmp}/m.pt")
        torch.save((x, y), f"{tmp}/d.pt")
        script = Path(tmp) / "peer.py"
        script.write_text(PEER)
        env = {**os.environ, "PYTHONPATH": ""}
        self.proc = subprocess.Popen([python, str(script), f"{tmp}/m.pt", f"{tmp}/d.pt", str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        self.ask_raw()

    def ask_raw(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"PyHessian peer died: {self.proc.stderr.read()[-2000:]}")
        return json.loads(line)

    def ask(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.ask_raw()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def summary(times: list[float]) -> dict:
    return {"best_s": min(times), "median_s": statistics.median(times), "runs_s": times}


def hvp_profile(model, loss_fn, x, y) -> dict:
    """Seconds per Hessian-vector product by each route (best of 5 after a warm-up)."""
    out = {}
    gen = torch.Generator().manual_seed(1)
    for method in ("double_backward", "forward_over_reverse"):
        op = HessianOperator(model, loss_fn, (x, y), method=method)
        v = torch.randn(op.size, generator=gen)
        op.matvec(v)
        out[f"{method}_s"] = min(timed(lambda op=op, v=v: op.matvec(v))[1] for _ in range(5))
        vs = torch.randn(8, op.size, generator=gen)
        out[f"{method}_batched8_per_vector_s"] = min(timed(lambda op=op, vs=vs: op.matmat(vs))[1] for _ in range(2)) / 8
    uncached = HessianOperator(model, loss_fn, (x, y), cache_graph=False)
    v = torch.randn(uncached.size, generator=gen)
    out["double_backward_rebuilding_graph_each_call_s"] = min(timed(lambda: uncached.matvec(v))[1] for _ in range(3))
    out["note"] = ("double backward (the default) goes through the full-batch gradient graph built once and kept: "
                   "one backward pass per product; forward-over-reverse (torch.func jvp of grad) recomputes the "
                   "forward and backward each call; batched8: 8 products in one vmap pass (HessianOperator.matmat)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peer", default="/tmp/peer-pyhessian/bin/python")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ntk-inputs", type=int, default=256)
    parser.add_argument("--ntk-big", type=int, default=2048)
    parser.add_argument("--skip-ntk", action="store_true", help="keep the NTK figures of an earlier --out")
    parser.add_argument("--out", default="benchmarks/results/probe_speed.json")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    bench_start = time.perf_counter()
    x, y = load_digits_all()
    model = train_classifier(make_mlp([64, 512, 512, 10], seed=0), x, y, epochs=10, lr=1e-3, seed=0)
    loss_fn = nn.CrossEntropyLoss()
    op = HessianOperator(model, loss_fn, (x, y))
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    result: dict = {"model": "64-512-512-10 ReLU MLP, 10 epochs Adam on 1,797 digits", "params": op.size,
                    "threads": threads, "loadavg_at_start": load,
                    "machine": "shared 2-core CPU (other helpers running): timings are noisy, so basin and "
                               "PyHessian calls are interleaved round by round",
                    "accuracy_target": "1e-3 relative to the reference, for every eigenvalue asked"}

    ref = lanczos(op, k=5, tol=1e-9, max_iter=300, start="random", seed=123)
    result["reference_top5"] = ref.to_json()
    ref_vals = torch.from_numpy(ref.values)
    result["hvp"] = hvp_profile(model, loss_fn, x, y)
    result["lanczos_steps_to_1e-3"] = {}
    for start in ("random", "gradient"):
        for k in (1, 5):
            eig = lanczos(op, k=k, tol=1e-3, start=start)
            result["lanczos_steps_to_1e-3"][f"top{k}_{start}_start"] = {
                "iterations": eig.iterations, "converged": eig.converged,
                "max_rel_error": rel_error(eig.values, ref_vals)}

    peer = None
    tmp = tempfile.TemporaryDirectory()
    if Path(args.peer).exists():
        peer = Peer(args.peer, model, x, y, threads, tmp.name)
    basin_t: dict[str, list[float]] = {"top1": [], "top5": [], "cold_top1": []}
    peer_t: dict[str, list[float]] = {"top1": [], "top5": [], "cold_top1": []}
    last: dict[str, object] = {}
    for _ in range(args.rounds):
        for k in (1, 5):
            eig, secs = timed(lambda k=k: lanczos(op, k=k, tol=1e-3))
            basin_t[f"top{k}"].append(secs)
            last[f"basin_top{k}"] = eig
            if peer:
                ans = peer.ask(f"top{k}")
                peer_t[f"top{k}"].append(ans["seconds"])
                last[f"peer_top{k}"] = ans

        def cold():
            fresh = HessianOperator(model, loss_fn, (x, y))
            return lanczos(fresh, k=1, tol=1e-3)

        eig, secs = timed(cold)
        basin_t["cold_top1"].append(secs)
        last["basin_cold_top1"] = eig
        if peer:
            ans = peer.ask("cold1")
            peer_t["cold_top1"].append(ans["seconds"])
            last["peer_cold_top1"] = ans
    for key in basin_t:
        eig = last[f"basin_{key}"]
        entry = {**eig.to_json(), **summary(basin_t[key]), "max_rel_error": rel_error(eig.values, ref_vals)}
        result[f"basin_{key}"] = entry
        if peer:
            ans = last[f"peer_{key}"]
            result[f"pyhessian_{key}"] = {"values": ans["values"], "hvps": ans["hvps"], **summary(peer_t[key]),
                                          "max_rel_error": rel_error(ans["values"], ref_vals)}
            result[f"speedup_{key}"] = {"best": min(peer_t[key]) / min(basin_t[key]),
                                        "median": statistics.median(peer_t[key]) / statistics.median(basin_t[key])}
    result["timing"] = ("'warm': the gradient graph (basin) / gradsH (PyHessian) was built before timing, as both "
                        "keep it; 'cold_top1' includes building it (a fresh HessianOperator / pyhessian.hessian)")

    if peer:
        ans = peer.ask("trace")
        s = torch.tensor(ans["samples"], dtype=torch.float64)
        result["pyhessian_trace"] = {"seconds": ans["seconds"], "hvps": ans["hvps"], "mean": float(s.mean()),
                                     "stderr": float(s.std() / len(s) ** 0.5) if len(s) > 1 else None,
                                     "samples": len(s), "stops_on": "running mean changes < 1e-3 relative"}
        result["pyhessian_density"] = peer.ask("density")["density"]
        peer.close()
    tmp.cleanup()

    target = (result.get("pyhessian_trace") or {}).get("stderr") or 0.01 * ref_vals[0].item()
    est, secs = timed(lambda: hutchinson_trace(op, atol=target, rtol=0.0, min_samples=10, max_samples=500))
    result["basin_trace"] = {**est.to_json(), "seconds": secs, "target_stderr": target}

    dens, secs = timed(lambda: spectral_density(op, steps=80, runs=1))
    result["basin_density"] = {
        "seconds": secs, "steps": 80, "runs": 1, "converged": dens.converged, "iterations": dens.iterations,
        "edge_residuals": dens.edge_residuals.tolist(),
        "integral": float(torch.trapezoid(torch.from_numpy(dens.density), torch.from_numpy(dens.grid))),
        "top_node": float(dens.nodes.max()),
        "top_node_rel_error": float((float(dens.nodes.max()) - ref_vals[0]) / ref_vals[0]),
        "trace_from_density": dens.moment(1) * op.size, "hutchinson_trace": est.mean,
        "check": "no dense Hessian at 300k parameters: checked against the converged Lanczos top eigenvalue and "
                 "the trace; the dense checks are in tests/evaluations/test_probes_hessian.py",
    }

    out_path = Path(args.out)
    if args.skip_ntk:
        old = json.loads(out_path.read_text()) if out_path.exists() else {}
        result.update({k: old[k] for k in ("ntk", "ntk_big") if k in old})
    else:
        result["ntk_big"] = ntk_big(model, args.ntk_big, threads)
        result["ntk"] = ntk_speed(model, x[: args.ntk_inputs])
    result["benchmark_seconds"] = time.perf_counter() - bench_start
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def ntk_speed(model: nn.Module, xs: torch.Tensor) -> dict:
    """Full NTK of `xs` by the three methods; the structured one best of 3, the others once (tens of seconds)."""
    kernels, ntk = {}, {}
    for method in ("structured", "ntk_vp", "jacobian"):
        runs = [timed(lambda m=method: empirical_ntk(model, xs, kind="full", method=m))
                for _ in range(3 if method == "structured" else 1)]
        kernels[method] = runs[0][0]
        ntk[method] = {"seconds": min(r[1] for r in runs), "runs": len(runs)}
    base = kernels["jacobian"]
    for method in kernels:
        ntk[method]["max_rel_diff_vs_jacobian"] = float((kernels[method] - base).norm() / base.norm())
    ntk["speedup_structured_vs_jacobian"] = ntk["jacobian"]["seconds"] / ntk["structured"]["seconds"]
    return {"inputs": len(xs), "outputs": 10, "kind": "full", **ntk}


def ntk_big(model: nn.Module, n: int, threads: int) -> dict:
    """The n-input full NTK in a fresh process: seconds and peak resident memory (VmHWM, in GB of 1e9 bytes)."""
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(model.state_dict(), f"{tmp}/m.pt")
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        proc = subprocess.run([sys.executable, "-c", BIG_NTK, f"{tmp}/m.pt", str(n), str(threads)],
                               capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"inputs": n, "error": proc.stderr[-2000:]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["fits_24gb"] = out["peak_rss_gb"] < 24
    return out


if __name__ == "__main__":
    main()
