"""Adversarial training and flatness: do FGSM/PGD-trained minima look flatter than standard ones?

Li et al. (2018, "Visualizing the Loss Landscape of Neural Nets") introduced filter-normalized
loss-surface plots; a later study applied them to adversarially trained networks and found that
adversarial augmentation does not make the minima flatter. Reproduced here on scikit-learn digits
(8x8) with a small CNN trained three ways from the same initialization and batch order:
- standard: cross-entropy on clean images;
- FGSM (Goodfellow et al., 2015): half clean, half x + eps * sign(grad_x loss) per batch;
- PGD (Madry et al., 2018): half clean, half projected gradient ascent in the L-inf ball of radius
  eps (random start, `pgd_steps` steps of size 2.5 eps / steps), clipped to the pixel range.
For each model: clean, FGSM and PGD test accuracy; at the minimum, on the clean training loss, the
top Hessian eigenvalues (Lanczos), the Hessian trace (Hutchinson), 1D and 2D filter-normalized
slices (`evaluations.minimum.measure_minimum`). Sharpness is compared on the same clean loss every
model was partly trained on.

    python examples/adversarial_flatness.py            # full size, a few minutes on 2 cores
    python examples/adversarial_flatness.py --quick    # seconds
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from evaluations.digits import load_digits_split
from evaluations.minimum import MinimumMeasures, measure_minimum
from evaluations.plotting import optional_pyplot, save_figure
from merging.io.atomic import atomic_write_text

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
METHODS = ("standard", "fgsm", "pgd")


def make_cnn(seed: int, channels: tuple[int, int] = (8, 16)) -> nn.Sequential:
    """Two 3x3 conv layers, a 2x2 max-pool and a linear classifier, for [B, 64] digits."""
    torch.manual_seed(seed)
    c1, c2 = channels
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(c2 * 16, 10),
    )


def _input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), x)
    return g


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, lo: float, hi: float) -> torch.Tensor:
    """x + eps * sign(grad_x loss), clipped to [lo, hi]."""
    return (x + eps * _input_grad(model, x, y).sign()).clamp(lo, hi).detach()


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, lo: float, hi: float,
        gen: torch.Generator) -> torch.Tensor:
    """L-inf PGD with a uniform random start, step 2.5 eps / steps, projected to the eps-ball and [lo, hi]."""
    step = 2.5 * eps / steps
    adv = (x + (torch.rand(x.shape, generator=gen, dtype=x.dtype) * 2 - 1) * eps).clamp(lo, hi)
    for _ in range(steps):
        adv = adv + step * _input_grad(model, adv, y).sign()
        adv = torch.minimum(torch.maximum(adv, x - eps), x + eps).clamp(lo, hi).detach()
    return adv


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, method: str, args: argparse.Namespace, seed: int,
          lo: float, hi: float) -> None:
    """Minibatch Adam; the batch order and PGD starts are drawn from `seed` (same for every method)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    for _ in range(args.epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), args.batch_size):
            idx = order[start: start + args.batch_size]
            xb, yb = x[idx], y[idx]
            if method == "fgsm":
                xb, yb = torch.cat([xb, fgsm(model, xb, yb, args.eps, lo, hi)]), torch.cat([yb, yb])
            elif method == "pgd":
                xb, yb = torch.cat([xb, pgd(model, xb, yb, args.eps, args.pgd_steps, lo, hi, gen)]), torch.cat([yb, yb])
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    model.eval()


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


@dataclass
class AdversarialRun:
    method: str
    seed: int
    n_params: int
    train_loss: float  # clean training loss at the end of training
    train_acc: float
    clean_acc: float  # test accuracies
    fgsm_acc: float
    pgd_acc: float
    minimum: MinimumMeasures
    train_seconds: float
    seconds: float  # training and measuring

    @property
    def top_eig(self) -> float:
        return self.minimum.top_eigenvalues[0]

    @property
    def slice_curvature(self) -> float:
        """Second difference of the 1D slice at its centre (filter-normalized units)."""
        v, a = self.minimum.slice_1d, self.minimum.alphas_1d
        mid, h = len(v) // 2, a[1] - a[0]
        return (v[mid + 1] - 2 * v[mid] + v[mid - 1]) / h**2


def _mean_sd(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(t) > 1 else 0.0


@dataclass
class AdversarialFlatnessResult:
    config: dict
    runs: list[AdversarialRun] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> list[dict]:
        rows = []
        for method in METHODS:
            runs = [r for r in self.runs if r.method == method]
            if not runs:
                continue
            row: dict = {"method": method, "seeds": len(runs),
                         "lanczos_converged": all(r.minimum.lanczos_converged for r in runs)}
            for key in ("train_loss", "train_acc", "clean_acc", "fgsm_acc", "pgd_acc", "top_eig", "slice_curvature"):
                row[key + "_mean"], row[key + "_std"] = _mean_sd([getattr(r, key) for r in runs])
            row["trace_mean"], row["trace_std"] = _mean_sd([r.minimum.trace for r in runs])
            row["grad_norm_mean"], _ = _mean_sd([r.minimum.grad_norm for r in runs])
            rows.append(row)
        return rows

    def to_json(self) -> dict:
        return {"config": self.config, "seconds": self.seconds, "summary": self.summary(),
                "runs": [asdict(r) | {"slice_curvature": r.slice_curvature} for r in self.runs]}

    def to_markdown(self) -> str:
        lines = ["| training | clean acc | FGSM acc | PGD acc | train loss | train acc | top eig (mean +- sd) "
                 "| trace (mean +- sd) | 1D slice curvature |", "|---|---|---|---|---|---|---|---|---|"]
        for s in self.summary():
            lines.append(f"| {s['method']} | {s['clean_acc_mean']:.3f} | {s['fgsm_acc_mean']:.3f} "
                         f"| {s['pgd_acc_mean']:.3f} | {s['train_loss_mean']:.4f} | {s['train_acc_mean']:.3f} "
                         f"| {s['top_eig_mean']:.3g} +- {s['top_eig_std']:.2g} "
                         f"| {s['trace_mean']:.3g} +- {s['trace_std']:.2g} "
                         f"| {s['slice_curvature_mean']:.3g} +- {s['slice_curvature_std']:.2g} |")
        return "\n".join(lines)


def run(args: argparse.Namespace) -> AdversarialFlatnessResult:
    begin = time.perf_counter()
    d = load_digits_split()
    xtr, ytr, xte, yte = d.x_train, d.y_train, d.x_test, d.y_test
    if args.n_train is not None:
        xtr, ytr = xtr[: args.n_train], ytr[: args.n_train]
    lo, hi = float(d.x_train.min()), float(d.x_train.max())
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result = AdversarialFlatnessResult(config=config | {"pixel_range": [lo, hi], "n_train": len(xtr)})
    for seed, method in tqdm([(s, m) for s in range(args.seeds) for m in METHODS], desc="cnn models",
                             disable=args.quiet):
        start = time.perf_counter()
        model = make_cnn(seed)
        train(model, xtr, ytr, method, args, seed, lo, hi)
        train_seconds = time.perf_counter() - start
        gen = torch.Generator().manual_seed(1000 + seed)
        with torch.no_grad():
            out = model(xtr)
            train_loss = float(nn.functional.cross_entropy(out, ytr))
            train_acc = float((out.argmax(-1) == ytr).float().mean())
        record = {
            "clean_acc": _accuracy(model, xte, yte),
            "fgsm_acc": _accuracy(model, fgsm(model, xte, yte, args.eps, lo, hi), yte),
            "pgd_acc": _accuracy(model, pgd(model, xte, yte, args.eps, args.pgd_eval_steps, lo, hi, gen), yte),
        }
        minimum = measure_minimum(model, (xtr, ytr), top_k=args.top_k, lanczos_iters=args.lanczos_iters,
                                  hutchinson_samples=args.hutchinson, res_1d=args.res_1d, res_2d=args.res_2d,
                                  span=args.span, seed=seed,
                                  batched=args.batched_slices)
        result.runs.append(AdversarialRun(method=method, seed=seed, n_params=sum(p.numel() for p in model.parameters()),
                                          train_loss=train_loss, train_acc=train_acc, minimum=minimum,
                                          train_seconds=train_seconds, seconds=time.perf_counter() - start, **record))
    result.seconds = time.perf_counter() - begin
    return result


def plot(result: AdversarialFlatnessResult, out: Path) -> Path | None:
    plt = optional_pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2 + len(METHODS), figsize=(5 * (2 + len(METHODS)), 4.5))
    colors = dict(zip(METHODS, ("C0", "C1", "C2")))
    for r in result.runs:
        axes[0].plot(r.minimum.alphas_1d, r.minimum.slice_1d, color=colors[r.method], alpha=0.8,
                     label=r.method if r.seed == 0 else None)
    axes[0].set(xlabel="alpha (filter-normalized direction)", ylabel="clean train loss", title="1D slices (all seeds)")
    axes[0].legend()
    summary = result.summary()
    xs = range(len(summary))
    axes[1].bar([x - 0.2 for x in xs], [s["top_eig_mean"] for s in summary], 0.4,
                yerr=[s["top_eig_std"] for s in summary], capsize=3, label="top eigenvalue")
    ax2 = axes[1].twinx()
    ax2.bar([x + 0.2 for x in xs], [s["trace_mean"] for s in summary], 0.4,
            yerr=[s["trace_std"] for s in summary], capsize=3, color="C3", label="trace")
    axes[1].set_xticks(list(xs), [s["method"] for s in summary])
    axes[1].set(ylabel="top Hessian eigenvalue", title="sharpness at the minimum (clean train loss)")
    ax2.set_ylabel("Hessian trace")
    axes[1].legend(loc="upper left")
    ax2.legend(loc="upper right")
    for ax, method in zip(axes[2:], METHODS):
        r = next((r for r in result.runs if r.method == method and r.seed == 0), None)
        if r is None:
            continue
        m = r.minimum
        cs = ax.contour(m.alphas_2d, m.alphas_2d, m.slice_2d, levels=15)
        ax.clabel(cs, fontsize=7)
        ax.plot([0], [0], "k*")
        ax.set(xlabel="alpha (d1)", ylabel="beta (d2)", title=f"2D slice: {method} (seed 0)")
    fig.tight_layout()
    path = out / "adversarial_flatness.png"
    save_figure(fig, path, dpi=100)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes for smoke tests")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eps", type=float, default=0.3, help="L-inf radius in standardized pixel units")
    p.add_argument("--pgd-steps", type=int, default=5)
    p.add_argument("--pgd-eval-steps", type=int, default=20)
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--lanczos-iters", type=int, default=30)
    p.add_argument("--hutchinson", type=int, default=30)
    p.add_argument("--res-1d", type=int, default=41)
    p.add_argument("--res-2d", type=int, default=15)
    p.add_argument("--span", type=float, default=1.0, help="slice half-width in filter-normalized units")
    p.add_argument("--batched-slices", action="store_true",
                   help="evaluate slice points stacked under vmap (measured slower here than one at a time)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this small CNN)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.n_train, args.pgd_steps, args.pgd_eval_steps = 1, 2, 128, 2, 3
        args.top_k, args.lanczos_iters, args.hutchinson, args.res_1d, args.res_2d = 2, 6, 4, 5, 3
    return args


def main(argv: list[str] | None = None) -> AdversarialFlatnessResult:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    atomic_write_text(args.out / "adversarial_flatness.json", json.dumps(result.to_json(), indent=1) + "\n")
    print(result.to_markdown())
    if not args.no_plot:
        print("plot:", plot(result, args.out))
    print(f"total {result.seconds:.1f} s")
    return result


if __name__ == "__main__":
    main()
