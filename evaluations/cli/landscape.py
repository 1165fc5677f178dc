"""`basin landscape MODEL --model-factory module:fn --data module:fn`: a filter-normalized 2-D loss slice."""

from __future__ import annotations

import argparse

HELP = "1D/2D loss-landscape slices around a model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="checkpoint (.safetensors file, folder or Hub id)")
    parser.add_argument("--model-factory", required=True, help="module:fn (or file.py:fn) returning an nn.Module")
    parser.add_argument("--data", required=True, help="module:fn returning (x, y) tensors or a DataLoader")
    parser.add_argument("--grid", type=int, default=21, help="points per axis (default 21)")
    parser.add_argument("--range", type=float, default=1.0, help="coordinates span [-range, range] (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random directions")
    parser.add_argument("--keep-biasbn", action="store_true",
                        help="also move biases and norm-layer parameters (zeroed by default, as Li et al. 2018)")
    parser.add_argument("--batched", choices=("auto", "yes", "no"), default="auto")
    parser.add_argument("--out", help="folder for landscape.json, contour.png, surface.png and slice_1d.png")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from evaluations.landscape import random_directions, slice_1d, slice_2d
    from evaluations.landscape.io import build_model, load_data, load_state, write_json
    from evaluations.landscape.plots import plot_contour, plot_slice_1d, plot_surface
    from merging.outputs import check_files
    from taxonomy.errors import BasinError

    names = ("landscape.json", "contour.png", "surface.png", "slice_1d.png")
    check_files([Path(args.out) / n for n in names] if args.out else [], [args.model])
    if args.grid < 2:
        raise BasinError(f"--grid {args.grid}: need at least 2 points per axis")
    model = build_model(args.model_factory)
    center = load_state(args.model, model)
    model.load_state_dict(center)
    data = load_data(args.data)
    d1, d2 = random_directions(model, n=2, normalize="filter", seed=args.seed,
                               ignore=None if args.keep_biasbn else "biasbn")
    batched = {"auto": "auto", "yes": True, "no": False}[args.batched]
    s1 = slice_1d(model, center, d1, data, alphas=args.grid, span=args.range, batched=batched)
    s2 = slice_2d(model, center, d1, d2, data, alphas=args.grid, span=args.range, batched=batched, progress=True)
    print(f"loss at the model: {s1.loss[len(s1.loss) // 2]:.5f}; 2-D slice min {s2.loss.min():.5f}, "
          f"max {s2.loss.max():.5f}")
    print(f"{'alpha':>7}  {'loss (d1)':>10}  {'accuracy':>8}")
    for al, lo, ac in zip(s1.alphas, s1.loss, s1.accuracy):
        print(f"{al:7.3f}  {lo:10.5f}  {ac:8.4f}")
    if args.out:
        out = Path(args.out)
        path = write_json(out, "landscape.json", {
            "model": args.model, "seed": args.seed, "range": args.range,
            "directions": "Gaussian, filter-normalized (Li et al. 2018)"
                          + ("; biases/norm layers kept" if args.keep_biasbn else "; biases/norm layers zeroed"),
            "slice_1d": s1.to_json(), "slice_2d": s2.to_json()})
        plots = [plot_contour(s2, out / "contour.png"), plot_surface(s2, out / "surface.png"),
                 plot_slice_1d(s1, out / "slice_1d.png")]
        print(f"wrote {path}" + "".join(f", {p}" for p in plots if p))
    return 0
