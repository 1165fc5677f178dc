"""Patch-distributed quantum neural networks: Hessian and landscape at the minimum vs patches and parameters.

Reproduces, at toy scale, the study of patch-distributed QNNs: a classical image is split into
overlapping local patches, each patch is angle-encoded into its own small parameterized circuit
(evaluations.quantum.PatchQNN, a torch state-vector simulator), and a linear readout aggregates
the circuits' Pauli-Z expectations. The study's findings: more parameters give sharper
landscapes (larger top Hessian eigenvalue); more patches lower the top eigenvalue.

Data: scikit-learn digits 0-3 (a 4-class task), each 8x8 image cut into 1, 2, 4 or 8 overlapping
windows, each window average-pooled to 2x2 = 4 angles in [0, pi] for a 4-qubit circuit. Every
(patches, depth, seed) model is trained full-batch with Adam and a cosine schedule; at the
minimum we measure, over the circuit parameters (the readout held at its trained value), the top
Hessian eigenvalues (Lanczos), the trace (Hutchinson), and 1D and 2D filter-normalized slices
(Li et al., 2018) of the training loss.

    python examples/qnn_patches.py            # full size, a few minutes on 2 cores
    python examples/qnn_patches.py --quick    # seconds
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from evaluations.digits import load_digits_split
from evaluations.quantum import PatchQNN, circuit_expvals, extract_patches

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


@dataclass
class QNNRun:
    n_patches: int
    depth: int
    seed: int
    n_params: int  # all trainable parameters (circuits + readout)
    n_circuit_params: int  # the parameters the Hessian is taken over
    train_loss: float
    grad_norm: float
    train_acc: float
    test_acc: float
    top_eigenvalues: list[float]
    lanczos_converged: bool
    trace: float
    trace_stderr: float
    slice_1d: list[float]
    slice_2d: list[list[float]]
    seconds: float


@dataclass
class QNNPatchesResult:
    config: dict
    alphas_1d: list[float]
    alphas_2d: list[float]
    runs: list[QNNRun] = field(default_factory=list)

    def summary(self) -> list[dict]:
        """Mean and standard deviation over seeds per (patches, depth)."""
        rows = []
        for key in sorted({(r.n_patches, r.depth) for r in self.runs}):
            runs = [r for r in self.runs if (r.n_patches, r.depth) == key]
            top = torch.tensor([r.top_eigenvalues[0] for r in runs], dtype=torch.float64)
            tr = torch.tensor([r.trace for r in runs], dtype=torch.float64)
            rows.append({
                "n_patches": key[0], "depth": key[1], "n_params": runs[0].n_params,
                "n_circuit_params": runs[0].n_circuit_params, "seeds": len(runs),
                "top_eig_mean": float(top.mean()), "top_eig_std": float(top.std()) if len(runs) > 1 else 0.0,
                "trace_mean": float(tr.mean()), "trace_std": float(tr.std()) if len(runs) > 1 else 0.0,
                "train_loss_mean": sum(r.train_loss for r in runs) / len(runs),
                "test_acc_mean": sum(r.test_acc for r in runs) / len(runs),
            })
        return rows

    def to_json(self) -> dict:
        return {"config": self.config, "alphas_1d": self.alphas_1d, "alphas_2d": self.alphas_2d,
                "runs": [asdict(r) for r in self.runs], "summary": self.summary()}

    def to_markdown(self) -> str:
        lines = ["| patches | depth | params | circuit params | top eig (mean +- sd) | trace (mean +- sd) "
                 "| train loss | test acc |", "|---|---|---|---|---|---|---|---|"]
        for s in self.summary():
            lines.append(f"| {s['n_patches']} | {s['depth']} | {s['n_params']} | {s['n_circuit_params']} "
                         f"| {s['top_eig_mean']:.4g} +- {s['top_eig_std']:.2g} "
                         f"| {s['trace_mean']:.4g} +- {s['trace_std']:.2g} "
                         f"| {s['train_loss_mean']:.4f} | {s['test_acc_mean']:.3f} |")
        return "\n".join(lines)


class CircuitsWithFrozenReadout(nn.Module):
    """A trained PatchQNN whose only parameters are the circuit weights (readout as buffers)."""

    def __init__(self, model: PatchQNN) -> None:
        super().__init__()
        self.entangler = model.entangler
        self.weights = nn.Parameter(model.weights.detach().clone())
        self.register_buffer("readout_weight", model.readout.weight.detach().clone())
        self.register_buffer("readout_bias", model.readout.bias.detach().clone())

    def forward(self, angles: torch.Tensor) -> torch.Tensor:
        z = circuit_expvals(angles.transpose(0, 1), self.weights, self.entangler)
        return nn.functional.linear(z.transpose(0, 1).flatten(1), self.readout_weight, self.readout_bias)


def load_task(n_classes: int = 4, n_train: int | None = None) -> tuple[torch.Tensor, ...]:
    """Digits < n_classes as [B, 8, 8] angle images in [0, pi] (train min/max), float64."""
    d = load_digits_split()
    lo, hi = d.x_train.min(), d.x_train.max()

    def prep(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = y < n_classes
        return ((x[keep] - lo) / (hi - lo) * math.pi).reshape(-1, 8, 8).double(), y[keep]

    xtr, ytr = prep(d.x_train, d.y_train)
    xte, yte = prep(d.x_test, d.y_test)
    if n_train is not None:
        xtr, ytr = xtr[:n_train], ytr[:n_train]
    return xtr, ytr, xte, yte


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> None:
    """Full-batch Adam with a cosine learning-rate schedule."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()


def measure_minimum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace,
                    seed: int) -> dict:
    """Top Hessian eigenvalues, trace and 1D/2D filter-normalized slices of the training loss."""
    from evaluations.landscape import random_directions, slice_1d, slice_2d
    from evaluations.probes import HessianOperator, hutchinson_trace, lanczos

    loss_fn = nn.functional.cross_entropy
    params = {k: v.detach() for k, v in model.named_parameters()}
    op = HessianOperator(model, loss_fn, (x, y))
    eig = lanczos(op, k=args.top_k, max_iter=args.lanczos_iters, seed=seed)
    tr = hutchinson_trace(op, min_samples=args.hutchinson, max_samples=args.hutchinson, seed=seed)
    d1, d2 = random_directions(params, n=2, normalize="filter", seed=seed)
    s1 = slice_1d(model, params, d1, (x, y), loss_fn, alphas=torch.linspace(-1, 1, args.res_1d))
    s2 = slice_2d(model, params, d1, d2, (x, y), loss_fn, alphas=torch.linspace(-1, 1, args.res_2d))
    return {"top_eigenvalues": [float(v) for v in eig.values], "lanczos_converged": bool(eig.converged),
            "trace": float(tr.mean), "trace_stderr": float(tr.stderr),
            "slice_1d": [float(v) for v in s1.loss], "slice_2d": [[float(v) for v in row] for row in s2.loss]}


def run(args: argparse.Namespace) -> QNNPatchesResult:
    torch.manual_seed(0)
    xtr, ytr, xte, yte = load_task(args.classes, args.n_train)
    result = QNNPatchesResult(config=vars(args).copy() | {"out": str(args.out)},
                              alphas_1d=torch.linspace(-1, 1, args.res_1d).tolist(),
                              alphas_2d=torch.linspace(-1, 1, args.res_2d).tolist())
    grid = [(p, d, s) for p in args.patches for d in args.depths for s in range(args.seeds)]
    for n_patches, depth, seed in tqdm(grid, desc="qnn models"):
        start = time.perf_counter()
        a_tr = extract_patches(xtr, n_patches).transpose(0, 1)
        a_te = extract_patches(xte, n_patches).transpose(0, 1)
        model = PatchQNN(n_patches, n_qubits=4, depth=depth, n_classes=args.classes, seed=seed).double()
        train(model, a_tr, ytr, args.steps, args.lr)
        model.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(a_tr), ytr)
        loss.backward()
        grad_norm = float(torch.cat([p.grad.flatten() for p in model.parameters()]).norm())
        with torch.no_grad():
            train_acc = float((model(a_tr).argmax(-1) == ytr).double().mean())
            test_acc = float((model(a_te).argmax(-1) == yte).double().mean())
        circuits = CircuitsWithFrozenReadout(model)
        probes = measure_minimum(circuits, a_tr, ytr, args, seed)
        result.runs.append(QNNRun(
            n_patches=n_patches, depth=depth, seed=seed, n_params=sum(p.numel() for p in model.parameters()),
            n_circuit_params=model.weights.numel(), train_loss=float(loss), grad_norm=grad_norm,
            train_acc=train_acc, test_acc=test_acc, seconds=time.perf_counter() - start, **probes))
    return result


def plot(result: QNNPatchesResult, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result.summary()
    depths = sorted({s["depth"] for s in summary})
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    for depth in depths:
        rows = [s for s in summary if s["depth"] == depth]
        for ax, key in ((axes[0], "n_patches"), (axes[1], "n_params")):
            ax.errorbar([s[key] for s in rows], [s["top_eig_mean"] for s in rows],
                        yerr=[s["top_eig_std"] for s in rows], marker="o", capsize=3, label=f"depth {depth}")
        runs = [r for r in result.runs if r.depth == depth]
        axes[1].scatter([r.n_params for r in runs], [r.top_eigenvalues[0] for r in runs], s=8, alpha=0.4)
    axes[0].set(xscale="log", xlabel="patches", ylabel="top Hessian eigenvalue", title="top eigenvalue vs patches")
    axes[1].set(xscale="log", xlabel="trainable parameters", ylabel="top Hessian eigenvalue",
                title="top eigenvalue vs parameters (dots: seeds)")
    axes[0].set_xticks(sorted({s["n_patches"] for s in summary}), labels=sorted({s["n_patches"] for s in summary}))
    for ax in axes[:2]:
        ax.legend()
    deepest = max(depths)
    for r in result.runs:
        if r.depth == deepest and r.seed == 0:
            axes[2].plot(result.alphas_1d, r.slice_1d, label=f"{r.n_patches} patches")
    axes[2].set(xlabel="alpha (filter-normalized direction)", ylabel="train loss",
                title=f"1D slices, depth {deepest}, seed 0")
    axes[2].legend()
    first = next(r for r in result.runs if r.depth == deepest and r.seed == 0)
    grid = torch.tensor(first.slice_2d)
    cs = axes[3].contour(result.alphas_2d, result.alphas_2d, grid.T.numpy(), levels=15)
    axes[3].clabel(cs, fontsize=7)
    axes[3].set(xlabel="alpha", ylabel="beta", title=f"2D slice, {first.n_patches} patch(es), depth {deepest}")
    fig.tight_layout()
    path = out / "qnn_patches.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes for smoke tests")
    p.add_argument("--patches", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--n-train", type=int, default=None, help="cap on training examples")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--lanczos-iters", type=int, default=30)
    p.add_argument("--hutchinson", type=int, default=30)
    p.add_argument("--res-1d", type=int, default=41)
    p.add_argument("--res-2d", type=int, default=21)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.patches, args.depths, args.seeds, args.n_train, args.steps = [1, 2], [1], 2, 64, 20
        args.top_k, args.lanczos_iters, args.hutchinson, args.res_1d, args.res_2d = 2, 6, 4, 5, 3
    return args


def main(argv: list[str] | None = None) -> QNNPatchesResult:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    (args.out / "qnn_patches.json").write_text(json.dumps(result.to_json(), indent=1))
    print(result.to_markdown())
    if not args.no_plot:
        print("plot:", plot(result, args.out))
    return result


if __name__ == "__main__":
    main()
