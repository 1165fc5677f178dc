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
(Li et al., 2018) of the training loss, with `evaluations.minimum.measure_minimum`. A "filter" of the
circuit weights [patches, depth, qubits, 3] is one patch's circuit. Rotation angles are periodic, so
before measuring they are wrapped into [-pi, pi) (same function, same Hessian) and the slices span
+-0.25 filter-normalized units by default (+-1 crosses several periods of the angles).

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
from evaluations.minimum import MinimumMeasures, measure_minimum
from evaluations.plotting import optional_pyplot, save_figure
from evaluations.quantum import PatchQNN, extract_patches
from merging.io.atomic import atomic_write_text
from taxonomy.errors import BasinError

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


@dataclass
class QNNRun:
    n_patches: int
    depth: int
    seed: int
    n_params: int  # all trainable parameters (circuits + readout)
    n_circuit_params: int  # the parameters the Hessian and slices are taken over (--hessian circuits)
    train_loss: float
    train_acc: float
    test_acc: float
    grad_norm: float  # of the training loss over all parameters, at the end of training
    minimum: MinimumMeasures
    train_seconds: float
    seconds: float  # training and measuring

    @property
    def top_eig(self) -> float:
        return self.minimum.top_eigenvalues[0]


def _mean_sd(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(t) > 1 else 0.0


@dataclass
class QNNPatchesResult:
    config: dict
    runs: list[QNNRun] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> list[dict]:
        """Mean and standard deviation over seeds per (patches, depth)."""
        rows = []
        for key in sorted({(r.n_patches, r.depth) for r in self.runs}):
            runs = [r for r in self.runs if (r.n_patches, r.depth) == key]
            row = {"n_patches": key[0], "depth": key[1], "n_params": runs[0].n_params,
                   "n_circuit_params": runs[0].n_circuit_params, "seeds": len(runs),
                   "lanczos_converged": all(r.minimum.lanczos_converged for r in runs)}
            for name, values in (("top_eig", [r.top_eig for r in runs]), ("trace", [r.minimum.trace for r in runs]),
                                 ("train_loss", [r.train_loss for r in runs]),
                                 ("train_acc", [r.train_acc for r in runs]), ("test_acc", [r.test_acc for r in runs]),
                                 ("grad_norm", [r.grad_norm for r in runs])):
                row[name + "_mean"], row[name + "_std"] = _mean_sd(values)
            row["top_eig_min"] = min(r.top_eig for r in runs)
            row["top_eig_max"] = max(r.top_eig for r in runs)
            rows.append(row)
        return rows

    def to_json(self) -> dict:
        return {"config": self.config, "seconds": self.seconds, "summary": self.summary(),
                "runs": [asdict(r) for r in self.runs]}

    def to_markdown(self) -> str:
        lines = ["| patches | depth | params | circuit params | top eig (mean +- sd) [min, max] "
                 "| trace (mean +- sd) | train loss | train acc | test acc |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for s in self.summary():
            lines.append(f"| {s['n_patches']} | {s['depth']} | {s['n_params']} | {s['n_circuit_params']} "
                         f"| {s['top_eig_mean']:.3g} +- {s['top_eig_std']:.2g} "
                         f"[{s['top_eig_min']:.3g}, {s['top_eig_max']:.3g}] "
                         f"| {s['trace_mean']:.3g} +- {s['trace_std']:.2g} "
                         f"| {s['train_loss_mean']:.4f} | {s['train_acc_mean']:.3f} | {s['test_acc_mean']:.3f} |")
        return "\n".join(lines)


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


def wrap_angles(model: PatchQNN) -> None:
    """Wrap the circuit angles into [-pi, pi): every gate is 2pi-periodic up to a global phase, so the model's
    function (and its Hessian) is unchanged; only the filter norms that scale the slice directions depend on it."""
    with torch.no_grad():
        model.weights.copy_(torch.remainder(model.weights + math.pi, 2 * math.pi) - math.pi)


def run(args: argparse.Namespace) -> QNNPatchesResult:
    torch.manual_seed(0)
    begin = time.perf_counter()
    xtr, ytr, xte, yte = load_task(args.classes, args.n_train)
    result = QNNPatchesResult(config={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
                              | {"n_train": len(xtr), "n_test": len(xte)})
    grid = [(p, d, s) for p in args.patches for d in args.depths for s in range(args.seeds)]
    for n_patches, depth, seed in tqdm(grid, desc="qnn models", disable=args.quiet):
        start = time.perf_counter()
        a_tr = extract_patches(xtr, n_patches).transpose(0, 1)
        a_te = extract_patches(xte, n_patches).transpose(0, 1)
        model = PatchQNN(n_patches, n_qubits=4, depth=depth, n_classes=args.classes, seed=seed).double()
        train(model, a_tr, ytr, args.steps, args.lr)
        train_seconds = time.perf_counter() - start
        with torch.no_grad():
            before = model(a_tr)
        wrap_angles(model)
        with torch.no_grad():
            out = model(a_tr)
            if not torch.allclose(out, before, atol=1e-9):
                raise BasinError("qnn_patches: wrapping the angles changed the model's outputs")
            train_acc = float((out.argmax(-1) == ytr).double().mean())
            test_acc = float((model(a_te).argmax(-1) == yte).double().mean())
        model.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(a_tr), ytr)
        loss.backward()
        grad_norm = float(torch.cat([p.grad.flatten() for p in model.parameters()]).norm())
        model.zero_grad(set_to_none=True)
        minimum = measure_minimum(model, (a_tr, ytr), params="weights" if args.hessian == "circuits" else None,
                                  top_k=args.top_k,
                                  lanczos_iters=args.lanczos_iters, hutchinson_samples=args.hutchinson,
                                  res_1d=args.res_1d, res_2d=args.res_2d, span=args.span, seed=seed,
                                  batched=args.batched_slices)
        result.runs.append(QNNRun(
            n_patches=n_patches, depth=depth, seed=seed, n_params=sum(p.numel() for p in model.parameters()),
            n_circuit_params=model.weights.numel(), train_loss=float(loss.detach()), train_acc=train_acc,
            test_acc=test_acc, grad_norm=grad_norm, minimum=minimum, train_seconds=train_seconds,
            seconds=time.perf_counter() - start))
    result.seconds = time.perf_counter() - begin
    return result


def plot(result: QNNPatchesResult, out: Path) -> Path | None:
    plt = optional_pyplot()
    if plt is None:
        return None
    from matplotlib.ticker import NullFormatter

    summary = result.summary()
    depths = sorted({s["depth"] for s in summary})
    patches = sorted({s["n_patches"] for s in summary})
    fig, axes = plt.subplots(2, 4, figsize=(21, 9))
    panels = ((axes[0, 0], "n_patches", "top_eig", "top Hessian eigenvalue vs patches"),
              (axes[0, 1], "n_circuit_params", "top_eig", "top Hessian eigenvalue vs circuit parameters"),
              (axes[0, 2], "n_patches", "trace", "Hessian trace vs patches"))
    for ax, xkey, ykey, title in panels:
        for depth in depths:
            rows = [s for s in summary if s["depth"] == depth]
            line = ax.errorbar([s[xkey] for s in rows], [s[ykey + "_mean"] for s in rows],
                               yerr=[s[ykey + "_std"] for s in rows], marker="o", capsize=3, label=f"depth {depth}")
            runs = [r for r in result.runs if r.depth == depth]
            xs = [r.n_patches if xkey == "n_patches" else r.n_circuit_params for r in runs]
            ys = [r.top_eig if ykey == "top_eig" else r.minimum.trace for r in runs]
            ax.scatter(xs, ys, s=10, alpha=0.4, color=line[0].get_color())
        ax.set(xscale="log", yscale="log", xlabel=xkey.replace("n_", "").replace("_", " "), title=title,
               ylabel=ykey.replace("top_eig", "top eigenvalue"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        if xkey == "n_patches":
            ax.set_xticks(patches, labels=[str(p) for p in patches])
        ax.legend(fontsize=8)
    ax = axes[0, 3]  # the cross-entropy Hessian shrinks as the fit gets better: show the confound
    for i, n_patches in enumerate(patches):
        runs = [r for r in result.runs if r.n_patches == n_patches]
        ax.scatter([r.train_loss for r in runs], [r.top_eig for r in runs], s=12 + 8 * i, label=f"{n_patches} patches")
    ax.set(xscale="log", yscale="log", xlabel="final train loss", ylabel="top eigenvalue",
           title="top eigenvalue vs train loss (all runs)")
    ax.legend(fontsize=8)
    deepest = max(depths)
    for r in result.runs:
        if r.depth == deepest and r.seed == 0:
            axes[1, 0].plot(r.minimum.alphas_1d, r.minimum.slice_1d, label=f"{r.n_patches} patches")
    axes[1, 0].set(xlabel="alpha (filter-normalized direction)", ylabel="train loss",
                   title=f"1D slices, depth {deepest}, seed 0")
    axes[1, 0].legend(fontsize=8)
    shown = patches if len(patches) <= 3 else [patches[0], patches[1], patches[-1]]
    for ax, n_patches in zip(axes[1, 1:], shown):
        r = next(r for r in result.runs if r.depth == deepest and r.seed == 0 and r.n_patches == n_patches)
        m = r.minimum
        cs = ax.contour(m.alphas_2d, m.alphas_2d, m.slice_2d, levels=15)
        ax.clabel(cs, fontsize=7)
        ax.plot([0], [0], "k*")
        ax.set(xlabel="alpha (d1)", ylabel="beta (d2)", title=f"2D slice: {n_patches} patch(es), depth {deepest}")
    for ax in axes[1, 1 + len(shown):]:
        ax.axis("off")
    fig.tight_layout()
    path = out / "qnn_patches.png"
    save_figure(fig, path, dpi=100)
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
    p.add_argument("--hessian", choices=("circuits", "all"), default="circuits",
                   help="take the Hessian and slices over the circuit weights (readout fixed) or all parameters")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--lanczos-iters", type=int, default=30)
    p.add_argument("--hutchinson", type=int, default=30)
    p.add_argument("--res-1d", type=int, default=41)
    p.add_argument("--res-2d", type=int, default=21)
    p.add_argument("--span", type=float, default=0.25,
                   help="slice half-width in filter-normalized units (angles are periodic: 1.0 spans several periods)")
    p.add_argument("--batched-slices", action="store_true",
                   help="evaluate slice points stacked under vmap (measured slower here than one at a time)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these tiny tensors)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.quick:
        args.patches, args.depths, args.seeds, args.n_train, args.steps = [1, 2], [1], 2, 64, 20
        args.top_k, args.lanczos_iters, args.hutchinson, args.res_1d, args.res_2d = 2, 6, 4, 5, 3
    return args


def main(argv: list[str] | None = None) -> QNNPatchesResult:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    atomic_write_text(args.out / "qnn_patches.json", json.dumps(result.to_json(), indent=1) + "\n")
    print(result.to_markdown())
    if not args.no_plot:
        print("plot:", plot(result, args.out))
    print(f"total {result.seconds:.1f} s")
    return result


if __name__ == "__main__":
    main()
