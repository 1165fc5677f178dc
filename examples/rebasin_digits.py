"""Git Re-Basin on scikit-learn's digits: interpolation barriers before and after permutation alignment.

Reproduces the core experiment of Ainsworth et al. 2023 (Git Re-Basin, fig. 2) at digits scale:
two MLPs (3 hidden layers of 512, then of 256) trained from different seeds (init and batch order),
train/test loss and accuracy along 25 points of the linear path, naively and after weight matching
and activation matching; then a small ResNet-style CNN (width multiplier 4, no BatchNorm) aligned
by weight matching, with and without REPAIR (Jordan et al. 2023).

Barrier (Frankle et al. 2020): max over alpha of L(theta_alpha) - ((1 - alpha) L(A) + alpha L(B)).

    python examples/rebasin_digits.py [--quick] [--out benchmarks/results] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from evaluations.digits import load_digits_split, make_mlp, train_classifier
from evaluations.plotting import optional_pyplot, save_figure
from merging.alignment import activation_matching, apply_permutation, infer_spec, repair, weight_matching
from merging.io.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]


class ResCNN(nn.Module):
    """A ResNet-style CNN for 8x8 digits: stem, a residual block, a strided residual block, pooling."""

    def __init__(self, w: int = 4):
        super().__init__()
        c1, c2 = 4 * w, 8 * w
        self.stem = nn.Conv2d(1, c1, 3, padding=1)
        self.b1a, self.b1b = nn.Conv2d(c1, c1, 3, padding=1), nn.Conv2d(c1, c1, 3, padding=1)
        self.b2a, self.b2b = nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.Conv2d(c2, c2, 3, padding=1)
        self.short = nn.Conv2d(c1, c2, 1, stride=2)
        self.head = nn.Linear(c2, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x.reshape(-1, 1, 8, 8)))
        x = torch.relu(x + self.b1b(torch.relu(self.b1a(x))))
        x = torch.relu(self.short(x) + self.b2b(torch.relu(self.b2a(x))))
        return self.head(x.mean((2, 3)))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    out = model(x)
    return float(nn.functional.cross_entropy(out, y)), float((out.argmax(-1) == y).float().mean())


def mix(state_a: dict, state_b: dict, alpha: float) -> dict:
    return {k: (1 - alpha) * v + alpha * state_b[k] if v.is_floating_point() else v for k, v in state_a.items()}


def curve(make, state_a, state_b, split, alphas, fix=None) -> dict:
    """Loss/accuracy along the linear path; `fix(model, alpha)` may repair each interpolated model."""
    rows = {"train_loss": [], "train_acc": [], "test_loss": [], "test_acc": []}
    for alpha in alphas:
        model = make()
        model.load_state_dict(mix(state_a, state_b, alpha))
        if fix is not None and 0 < alpha < 1:
            fix(model, alpha)
        for part, (x, y) in (("train", split.train), ("test", split.test)):
            loss, acc = evaluate(model, x, y)
            rows[f"{part}_loss"].append(loss)
            rows[f"{part}_acc"].append(acc)
    return rows


def barrier(values: list[float], alphas: list[float]) -> float:
    return max(v - ((1 - a) * values[0] + a * values[-1]) for v, a in zip(values, alphas))


def summarize(rows: dict, alphas: list[float]) -> dict:
    return {
        "train_loss_barrier": barrier(rows["train_loss"], alphas),
        "test_loss_barrier": barrier(rows["test_loss"], alphas),
        "train_acc_at_midpoint": rows["train_acc"][len(alphas) // 2],
        "test_acc_at_midpoint": rows["test_acc"][len(alphas) // 2],
    }


def mlp_experiment(width: int, split, alphas, epochs: int) -> dict:
    widths = [64, width, width, width, 10]
    x, y = split.train
    a = train_classifier(make_mlp(widths, seed=0), x, y, epochs=epochs, lr=1e-3, seed=0)
    b = train_classifier(make_mlp(widths, seed=1), x, y, epochs=epochs, lr=1e-3, seed=1)
    spec = infer_spec(a)
    sa, sb = a.state_dict(), b.state_dict()
    wm = weight_matching(sa, sb, spec, seed=0)
    am = activation_matching(a, b, spec, x)
    make = lambda: make_mlp(widths)  # noqa: E731
    permuted = make()
    permuted.load_state_dict(apply_permutation(sb, spec, wm.perms))
    with torch.no_grad():
        identity_error = float((permuted(split.x_test) - b(split.x_test)).abs().max())
    curves = {
        "naive": curve(make, sa, sb, split, alphas),
        "weight_matching": curve(make, sa, apply_permutation(sb, spec, wm.perms), split, alphas),
        "activation_matching": curve(make, sa, apply_permutation(sb, spec, am.perms), split, alphas),
    }
    summary = {k: summarize(v, alphas) for k, v in curves.items()}
    naive = summary["naive"]["train_loss_barrier"]
    return {
        "widths": widths,
        "weight_matching_seconds": wm.seconds,
        "weight_matching_cpu_seconds": wm.cpu_seconds,
        "weight_matching_iterations": wm.iterations,
        "activation_matching_seconds": am.seconds,
        "permuted_model_max_abs_logit_difference": identity_error,
        "barrier_removed_weight_matching": 1 - summary["weight_matching"]["train_loss_barrier"] / naive,
        "barrier_removed_activation_matching": 1 - summary["activation_matching"]["train_loss_barrier"] / naive,
        "summary": summary,
        "curves": curves,
    }


def cnn_experiment(split, alphas, epochs: int, width: int = 4) -> dict:
    x, y = split.train
    torch.manual_seed(0)
    a = train_classifier(ResCNN(width), x, y, epochs=epochs, lr=2e-3, seed=0)
    torch.manual_seed(1)
    b = train_classifier(ResCNN(width), x, y, epochs=epochs, lr=2e-3, seed=1)
    spec = infer_spec(a, example_input=x[:2])
    sa, sb = a.state_dict(), b.state_dict()
    wm = weight_matching(sa, sb, spec, seed=0)
    pb = apply_permutation(sb, spec, wm.perms)
    aligned_b = ResCNN(width)
    aligned_b.load_state_dict(pb)
    stats_data = x[:256]

    def fix(model, alpha):
        repair(model, a, aligned_b, stats_data, alpha=alpha)

    make = lambda: ResCNN(width)  # noqa: E731
    curves = {
        "naive": curve(make, sa, sb, split, alphas),
        "weight_matching": curve(make, sa, pb, split, alphas),
        "weight_matching+repair": curve(make, sa, pb, split, alphas, fix=fix),
    }
    summary = {k: summarize(v, alphas) for k, v in curves.items()}
    return {"width_multiplier": width, "channels": [4 * width, 8 * width], "weight_matching_seconds": wm.seconds,
            "summary": summary, "curves": curves}


def plot(results: dict, alphas: list[float], path: Path) -> bool:
    plt = optional_pyplot()
    if plt is None:
        return False
    panels = [(k, v) for k, v in results["experiments"].items()]
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 6.5), squeeze=False)
    for col, (name, exp) in enumerate(panels):
        for label, rows in exp["curves"].items():
            line = axes[0, col].plot(alphas, rows["train_loss"], label=f"{label} (train)")[0]
            axes[0, col].plot(alphas, rows["test_loss"], "--", color=line.get_color(), label=f"{label} (test)")
            axes[1, col].plot(alphas, rows["train_acc"], color=line.get_color())
            axes[1, col].plot(alphas, rows["test_acc"], "--", color=line.get_color())
        axes[0, col].set_title(name)
        axes[0, col].set_ylabel("loss")
        axes[1, col].set_ylabel("accuracy")
        axes[1, col].set_xlabel("alpha (A -> B)")
        axes[0, col].legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny widths and few epochs (smoke test)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest for these small matrices on a shared machine)")
    parser.add_argument("--epochs", type=int, default=30, help="MLP epochs")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start, cpu_start = time.perf_counter(), time.process_time()
    split = load_digits_split()
    alphas = [i / 24 for i in range(25)]
    widths = (32, 16) if args.quick else (512, 256)
    epochs = 3 if args.quick else args.epochs
    experiments = {}
    stage_seconds = {}
    for width in widths:
        t = time.perf_counter()
        experiments[f"mlp_{width}x3"] = mlp_experiment(width, split, alphas, epochs)
        stage_seconds[f"mlp_{width}x3"] = time.perf_counter() - t
    t = time.perf_counter()
    experiments["rescnn_w4"] = cnn_experiment(split, alphas, 3 if args.quick else 15, width=1 if args.quick else 4)
    stage_seconds["rescnn_w4"] = time.perf_counter() - t
    print("stage seconds:", {k: round(v, 1) for k, v in stage_seconds.items()})
    results = {
        "config": {"alphas": alphas, "epochs": epochs, "optimizer": "adam", "threads": args.threads,
                   "seeds": [0, 1], "quick": args.quick},
        "experiments": experiments,
        "seconds_total": 0.0,
        "stage_seconds": stage_seconds,
        "note": "timings on a 2-core machine shared with other jobs",
    }
    results["seconds_total"] = time.perf_counter() - start
    results["cpu_seconds_total"] = time.process_time() - cpu_start
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "rebasin_digits.json", json.dumps(results, indent=1) + "\n")
    results["plot"] = plot(results, alphas, args.out / "rebasin_digits.png")
    for name, exp in experiments.items():
        line = ", ".join(f"{k}: train barrier {v['train_loss_barrier']:.4f}" for k, v in exp["summary"].items())
        print(f"{name}: {line}")
        if "barrier_removed_weight_matching" in exp:
            print(f"  weight matching removes {100 * exp['barrier_removed_weight_matching']:.1f}% of the barrier "
                  f"in {exp['weight_matching_seconds']:.3f} s (CPU {exp['weight_matching_cpu_seconds']:.3f} s); "
                  f"permuted model max |logit diff| {exp['permuted_model_max_abs_logit_difference']:.2e}")
    print(f"total {results['seconds_total']:.1f} s (CPU {results['cpu_seconds_total']:.1f} s)")
    return results


if __name__ == "__main__":
    main()
