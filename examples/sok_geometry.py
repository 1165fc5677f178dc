"""SoK geometry report: mode convexity, determinism, directedness and connectivity of model sets.

The "common ground" picture of the mode-connectivity SoK: which sets of trained networks lie in one
linearly connected, convex basin, how deterministic training is, and whether the differences are
directed, before and after permutation alignment (weight matching, Ainsworth et al., 2023). Three
sets of MLPs on scikit-learn digits, all evaluated on the original digits task:
- same init: one initialization, different data orders (SGD noise only; Frankle et al., 2020);
- different inits: a different initialization and data order per model;
- fine-tunes: one base trained on digits, fine-tuned on digits-derived tasks (images rotated by
  small angles, shifted by a pixel, with additive noise), each keeping the digit labels.
For every set, the landscape evaluator's measures (evaluations/landscape/geometry.py) are computed on
the raw weights and again after aligning every model to the set's first model with
`merging.alignment.weight_matching` (its start point permuted alike):
- mode convexity: the largest pairwise linear loss barrier (`mode_convexity`), on the training split;
- connectivity: the pairwise barrier matrix and its linearly connected basins, pairs joined when their
  barrier is at most `--threshold` nats (`connectivity`, single linkage);
- determinism: weight distance between members and, on the test split, function distance and
  prediction disagreement (`determinism`; permutations leave the function-space numbers unchanged);
- directedness: mean cosine similarity of the members' updates theta_i - start_i, start_i being the
  shared init, the member's own init, or the fine-tuning base (`directedness` with those updates).

    python examples/sok_geometry.py            # full size, a few minutes on 2 cores
    python examples/sok_geometry.py --quick    # seconds
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from evaluations.digits import load_digits_split, make_mlp, train_classifier
from evaluations.landscape.geometry import (
    Connectivity,
    ModeConvexity,
    basins_from_matrix,
    determinism,
    directedness,
    pairwise_barriers,
)
from evaluations.landscape.params import subtract
from evaluations.plotting import optional_pyplot, save_figure
from merging.alignment import apply_permutation, infer_spec, weight_matching
from merging.io.atomic import atomic_write_text
from taxonomy.errors import BasinError

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def transform_images(x: torch.Tensor, angle_deg: float = 0.0, shift: tuple[int, int] = (0, 0),
                     noise: float = 0.0, seed: int = 0) -> torch.Tensor:
    """[B, 64] digits rotated by `angle_deg` (bilinear), rolled by `shift` pixels, plus Gaussian noise."""
    img = x.reshape(-1, 1, 8, 8)
    if angle_deg:
        t = math.radians(angle_deg)
        theta = torch.tensor([[math.cos(t), -math.sin(t), 0.0], [math.sin(t), math.cos(t), 0.0]], dtype=x.dtype)
        grid = nn.functional.affine_grid(theta.expand(len(img), 2, 3), list(img.shape), align_corners=False)
        background = float(x.min())  # rotate the offset image so the padding is the (blank) background
        img = nn.functional.grid_sample(img - background, grid, align_corners=False) + background
    if shift != (0, 0):
        img = torch.roll(img, shifts=shift, dims=(2, 3))
    out = img.reshape(-1, 64)
    if noise:
        out = out + noise * torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    return out


FINETUNE_TASKS: dict[str, dict] = {
    "rotate+15": {"angle_deg": 15.0}, "rotate-15": {"angle_deg": -15.0}, "shift-right": {"shift": (0, 1)},
    "shift-down": {"shift": (1, 0)}, "noise": {"noise": 0.3}, "rotate+8": {"angle_deg": 8.0},
}


@dataclass
class ModelSet:
    """Trained models with the weights each one started from (its init, or the base it was fine-tuned from)."""

    name: str
    models: list[nn.Module]
    starts: list[dict[str, torch.Tensor]]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def build_sets(args: argparse.Namespace) -> list[ModelSet]:
    """The three model sets (see the module docstring); deterministic given the arguments."""
    d = load_digits_split()
    x, y = d.x_train[: args.n_train], d.y_train[: args.n_train]
    widths = [64, args.width, args.width, 10]
    fit = dict(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size)
    same = ModelSet("same init", [], [])
    different = ModelSet("different inits", [], [])
    tunes = ModelSet("fine-tunes", [], [])
    bar = tqdm(total=3 * args.models + 1, desc="training", disable=args.quiet)
    for s in range(args.models):
        for group, init_seed in ((same, 0), (different, 100 + s)):
            model = make_mlp(widths, seed=init_seed)
            group.starts.append(_state(model))
            group.models.append(train_classifier(model, x, y, seed=s, **fit))
        bar.update(2)
    base = train_classifier(make_mlp(widths, seed=0), x, y, seed=12345, **fit)
    bar.update(1)
    for i, (_name, task) in enumerate(list(FINETUNE_TASKS.items())[: args.models]):
        tuned = make_mlp(widths)
        tuned.load_state_dict(base.state_dict())
        xt = transform_images(x, seed=i, **task)
        tunes.starts.append(_state(base))
        tunes.models.append(train_classifier(tuned, xt, y, epochs=args.ft_epochs, lr=args.lr / 3,
                                             batch_size=args.batch_size, seed=i))
        bar.update(1)
    bar.close()
    return [same, different, tunes]


@dataclass
class SetGeometry:
    name: str
    aligned: bool
    n_models: int
    member_train_loss: list[float]
    member_test_acc: list[float]
    units_moved: float  # share of hidden units the alignment permuted, averaged over members 1.. (0 unaligned)
    mode_convexity: dict
    connectivity: dict
    determinism: dict
    directedness: dict

    def row(self) -> dict:
        """The table's numbers."""
        m = np.asarray(self.connectivity["matrix"])
        off = m[~np.eye(len(m), dtype=bool)]
        return {"set": self.name, "aligned": self.aligned, "models": self.n_models,
                "mode_convexity": self.mode_convexity["value"], "mean_barrier": float(off.mean()),
                "basins": len(self.connectivity["basins"]),
                "relative_weight_distance": self.determinism["mean_relative_weight_distance"],
                "function_distance": self.determinism["mean_function_distance"],
                "disagreement": self.determinism["mean_disagreement"],
                "directedness": self.directedness["mean_cosine"], "units_moved": self.units_moved,
                "member_train_loss": float(np.mean(self.member_train_loss)),
                "member_test_acc": float(np.mean(self.member_test_acc))}


@dataclass
class SoKGeometryResult:
    config: dict
    finetune_tasks: list[str]
    rows: list[SetGeometry] = field(default_factory=list)
    seconds: float = 0.0

    def table(self) -> list[dict]:
        return [r.row() for r in self.rows]

    def to_json(self) -> dict:
        return {"config": self.config, "finetune_tasks": self.finetune_tasks, "seconds": self.seconds,
                "table": self.table(), "sets": [asdict(r) for r in self.rows]}

    def to_markdown(self) -> str:
        thr = self.config["threshold"]
        lines = [
            f"| set | aligned | mode convexity (max pairwise loss barrier) | mean pairwise barrier "
            f"| basins (barrier <= {thr:g}) | rel. weight distance | function distance | disagreement "
            "| directedness (mean cosine of updates) | units permuted | member train loss | member test acc |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for t in self.table():
            lines.append(
                f"| {t['set']} | {'yes' if t['aligned'] else 'no'} | {t['mode_convexity']:.4f} "
                f"| {t['mean_barrier']:.4f} | {t['basins']} / {t['models']} | {t['relative_weight_distance']:.3f} "
                f"| {t['function_distance']:.4f} | {t['disagreement']:.4f} | {t['directedness']:.3f} "
                f"| {t['units_moved']:.2f} | {t['member_train_loss']:.4f} | {t['member_test_acc']:.3f} |")
        return "\n".join(lines)


def align_set(states: list[dict], starts: list[dict], spec) -> tuple[list[dict], list[dict], float]:
    """Every member aligned to member 0 by weight matching (Ainsworth et al. 2023, Alg. 1); its start point is
    permuted with the same permutation, so its update direction is expressed in the aligned frame too.
    Returns (states, starts, mean share of hidden units moved over members 1..)."""
    out_states, out_starts, moved = [states[0]], [starts[0]], []
    for state, start in zip(states[1:], starts[1:]):
        perms = weight_matching(states[0], state, spec, seed=0).perms
        out_states.append(apply_permutation(state, spec, perms))
        out_starts.append(apply_permutation(start, spec, perms))
        total = sum(len(p) for p in perms.values())
        moved.append(sum(int((p != torch.arange(len(p))).sum()) for p in perms.values()) / total)
    return out_states, out_starts, float(np.mean(moved))


def geometry(name: str, template: nn.Module, states: list[dict], starts: list[dict], aligned: bool,
             units_moved: float, train: tuple, test: tuple, args: argparse.Namespace) -> SetGeometry:
    """The evaluator's four SoK measures of one set: barriers on the training loss, agreement on the test split."""
    matrix = pairwise_barriers(template, states, train, alphas=args.alphas)
    # mode convexity and connectivity as `mode_convexity` / `connectivity` define them, from one barrier matrix
    i, j = np.unravel_index(int(np.argmax(matrix)), matrix.shape)
    mode = ModeConvexity(value=float(matrix[i, j]), pair=(int(min(i, j)), int(max(i, j))), matrix=matrix)
    conn = Connectivity(names=[f"model {k}" for k in range(len(states))], matrix=matrix, threshold=args.threshold,
                        basins=basins_from_matrix(matrix, args.threshold), kind="loss", form="linear")
    det = determinism(template, states, test)
    # update directions theta_i - start_i: with a zero base, directedness' task vectors are exactly these
    updates = [subtract(s, st) for s, st in zip(states, starts)]
    direct = directedness({k: torch.zeros_like(v) for k, v in updates[0].items()}, updates)
    losses, accs = [], []
    for state in states:
        template.load_state_dict(state)
        with torch.no_grad():
            losses.append(float(nn.functional.cross_entropy(template(train[0]), train[1])))
            accs.append(float((template(test[0]).argmax(-1) == test[1]).float().mean()))
    return SetGeometry(name=name, aligned=aligned, n_models=len(states), member_train_loss=losses,
                       member_test_acc=accs, units_moved=units_moved, mode_convexity=mode.to_json(),
                       connectivity=conn.to_json(), determinism=det.to_json(), directedness=direct.to_json())


def run(args: argparse.Namespace) -> SoKGeometryResult:
    begin = time.perf_counter()
    if args.models < 2:
        raise BasinError(f"sok_geometry: --models must be >= 2, got {args.models}")
    d = load_digits_split()
    train = (d.x_train[: args.n_train], d.y_train[: args.n_train])
    test = d.test
    sets = build_sets(args)
    template = make_mlp([64, args.width, args.width, 10])
    spec = infer_spec(template)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result = SoKGeometryResult(config=config | {"n_train": len(train[0]), "n_test": len(test[0])},
                               finetune_tasks=list(FINETUNE_TASKS)[: args.models])
    for group in tqdm(sets, desc="geometry", disable=args.quiet):
        states = [_state(m) for m in group.models]
        result.rows.append(geometry(group.name, template, states, group.starts, False, 0.0, train, test, args))
        a_states, a_starts, moved = align_set(states, group.starts, spec)
        for before, after in zip(states, a_states):  # permuting hidden units must not change a member's function
            template.load_state_dict(before)
            with torch.no_grad():
                ref = template(test[0])
            template.load_state_dict(after)
            with torch.no_grad():
                if not torch.allclose(template(test[0]), ref, atol=1e-4):
                    raise BasinError(f"sok_geometry: aligning set {group.name!r} changed a member's outputs")
        result.rows.append(geometry(group.name, template, a_states, a_starts, True, moved, train, test, args))
    result.seconds = time.perf_counter() - begin
    return result


def plot(result: SoKGeometryResult, out: Path) -> Path | None:
    plt = optional_pyplot()
    if plt is None:
        return None
    names = list(dict.fromkeys(r.name for r in result.rows))
    fig, axes = plt.subplots(2, len(names) + 1, figsize=(4.3 * (len(names) + 1), 8))
    vmax = max(max(float(np.max(r.connectivity["matrix"])) for r in result.rows), 1e-12)
    for col, name in enumerate(names):
        for row, aligned in enumerate((False, True)):
            r = next(r for r in result.rows if r.name == name and r.aligned == aligned)
            m = np.asarray(r.connectivity["matrix"])
            ax = axes[row, col]
            im = ax.imshow(m, vmin=0, vmax=vmax, cmap="magma")
            for i in range(len(m)):
                for j in range(len(m)):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if m[i, j] < 0.6 * vmax else "black")
            ax.set(title=f"{name}, {'aligned' if aligned else 'raw'}: loss barriers", xlabel="model",
                   ylabel="model")
            fig.colorbar(im, ax=ax, fraction=0.046)
    table = result.table()
    xs = np.arange(len(names))
    for row, (keys, title) in enumerate(((("mode_convexity", "mean_barrier"), "barriers: raw vs aligned"),
                                         (("disagreement", "directedness"), "disagreement and directedness"))):
        ax = axes[row, -1]
        for k, key in enumerate(keys):
            for a, aligned in enumerate((False, True)):
                vals = [next(t[key] for t in table if t["set"] == n and t["aligned"] == aligned) for n in names]
                ax.bar(xs + (2 * k + a - 1.5) * 0.2, vals, 0.2, label=f"{key} ({'aligned' if aligned else 'raw'})",
                       hatch="//" if aligned else None, color=f"C{k}", alpha=0.9 if aligned else 0.5)
        ax.set_xticks(xs, names, fontsize=8)
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "sok_geometry.png"
    save_figure(fig, path, dpi=100)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes for smoke tests")
    p.add_argument("--models", type=int, default=6, help="models per set (fine-tunes: at most 6 tasks)")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--ft-epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--alphas", type=int, default=11, help="points on each linear path")
    p.add_argument("--threshold", type=float, default=0.1,
                   help="loss barrier (nats) at or below which two models count as linearly connected")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these small MLPs)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.width, args.epochs, args.ft_epochs, args.n_train, args.alphas = 3, 16, 2, 1, 200, 5
    if not 2 <= args.models <= len(FINETUNE_TASKS):
        p.error(f"--models must be between 2 and {len(FINETUNE_TASKS)}")
    return args


def main(argv: list[str] | None = None) -> SoKGeometryResult:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    markdown = result.to_markdown()
    atomic_write_text(args.out / "sok_geometry.json", json.dumps(result.to_json(), indent=1) + "\n")
    atomic_write_text(args.out / "sok_geometry.md", markdown + "\n")
    print(markdown)
    if not args.no_plot:
        print("plot:", plot(result, args.out))
    print(f"total {result.seconds:.1f} s")
    return result


if __name__ == "__main__":
    main()
