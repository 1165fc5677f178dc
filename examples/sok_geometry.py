"""SoK geometry report: mode convexity, determinism, directedness and connectivity of model sets.

The "common ground" picture of the mode-connectivity SoK: which sets of trained networks lie in one
linearly connected, convex basin, how deterministic training is, and whether the differences are
directed, before and after permutation alignment (weight matching, Ainsworth et al., 2023). Three
sets of MLPs on scikit-learn digits, all evaluated on the original digits task:
- same init: one initialization, different data orders (SGD noise only; Frankle et al., 2020);
- different inits: a different initialization and data order per model;
- fine-tunes: one base trained on digits, fine-tuned on digits-derived tasks (images rotated by
  small angles, shifted by a pixel, with additive noise), each keeping the digit labels.
For every set, the landscape evaluator's `mode_convexity`, `determinism`, `directedness` and
`connectivity` are computed on the raw weights and again after aligning every model to the set's
first model with `merging.alignment.weight_matching`.

    python examples/sok_geometry.py            # full size, a few minutes on 2 cores
    python examples/sok_geometry.py --quick    # seconds
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from evaluations.digits import load_digits_split, make_mlp, train_classifier

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


def build_sets(args: argparse.Namespace) -> dict[str, list[nn.Module]]:
    """The three model sets (see the module docstring); deterministic given the arguments."""
    d = load_digits_split()
    x, y = d.x_train[: args.n_train], d.y_train[: args.n_train]
    widths = [64, args.width, args.width, 10]
    fit = dict(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size)
    sets: dict[str, list[nn.Module]] = {"same init": [], "different inits": [], "fine-tunes": []}
    bar = tqdm(total=3 * args.models + 1, desc="training")
    for s in range(args.models):
        sets["same init"].append(train_classifier(make_mlp(widths, seed=0), x, y, seed=s, **fit))
        sets["different inits"].append(train_classifier(make_mlp(widths, seed=100 + s), x, y, seed=s, **fit))
        bar.update(2)
    base = train_classifier(make_mlp(widths, seed=0), x, y, seed=12345, **fit)
    bar.update(1)
    for i, (_name, task) in enumerate(list(FINETUNE_TASKS.items())[: args.models]):
        tuned = make_mlp(widths)
        tuned.load_state_dict(base.state_dict())
        xt = transform_images(x, seed=i, **task)
        sets["fine-tunes"].append(train_classifier(tuned, xt, y, epochs=args.ft_epochs, lr=args.lr / 3,
                                                   batch_size=args.batch_size, seed=i))
        bar.update(1)
    bar.close()
    return sets


@dataclass
class SetGeometry:
    name: str
    aligned: bool
    n_models: int
    mode_convexity: dict
    determinism: dict
    directedness: dict
    connectivity: dict


@dataclass
class SoKGeometryResult:
    config: dict
    finetune_tasks: list[str]
    rows: list[SetGeometry] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"config": self.config, "finetune_tasks": self.finetune_tasks,
                "rows": [vars(r) | {} for r in self.rows]}

    def to_markdown(self) -> str:
        return "not yet"


def run(args: argparse.Namespace) -> SoKGeometryResult:
    raise NotImplementedError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes for smoke tests")
    p.add_argument("--models", type=int, default=4, help="models per set (fine-tunes: at most 6 tasks)")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--ft-epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--alphas", type=int, default=11, help="points on each linear path")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.width, args.epochs, args.ft_epochs, args.n_train, args.alphas = 3, 16, 2, 1, 200, 5
    return args


def main(argv: list[str] | None = None) -> SoKGeometryResult:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    (args.out / "sok_geometry.json").write_text(json.dumps(result.to_json(), indent=1))
    print(result.to_markdown())
    return result


if __name__ == "__main__":
    main()
