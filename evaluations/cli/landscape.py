"""`basin landscape MODEL --model-factory module:fn --data module:fn`: a filter-normalized 2-D loss slice."""

from __future__ import annotations

import argparse

from evaluations.cli.args import float_range, grid_size, seed

HELP = "1D/2D loss-landscape slices around a model"
OUT_FILES = ["landscape.json", "contour.png", "surface.png", "slice_1d.png"]
MAX_RANGE = 1e6


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="checkpoint (.safetensors file, folder or Hub id)")
    parser.add_argument("--model-factory", required=True, help="module:fn (or file.py:fn) returning an nn.Module")
    parser.add_argument("--data", required=True, help="module:fn returning (x, y) tensors or a DataLoader")
    parser.add_argument("--grid", type=grid_size(2), default=21,
                        help="points per axis, >= 2; refused when the grid would not fit in memory (default 21)")
    parser.add_argument("--range", type=float_range(0, MAX_RANGE, lo_open=True), default=1.0,
                        help=f"coordinates span [-range, range], 0 < range <= {MAX_RANGE:g} (default 1)")
    parser.add_argument("--seed", type=seed, default=0, help="seed of the random directions")
    parser.add_argument("--keep-biasbn", action="store_true",
                        help="also move biases and norm-layer parameters (zeroed by default, as Li et al. 2018)")
    parser.add_argument("--batched", choices=("auto", "yes", "no"), default="auto")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="accept a PyTorch pickle checkpoint (loaded with torch.load(weights_only=True))")
    parser.add_argument("--out", help="folder for landscape.json, contour.png, surface.png and slice_1d.png")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files in --out")


def run(args: argparse.Namespace) -> int:
    from evaluations.cli.outputs import Outputs
    from evaluations.landscape import random_directions, slice_1d, slice_2d
    from evaluations.landscape.io import build_model, check_runs, load_data, load_state

    with Outputs(args.overwrite, inputs=[args.model]) as outputs:
        out = outputs.folder(args.out, OUT_FILES, "--out") if args.out else None
        model = build_model(args.model_factory)
        center = load_state(args.model, model, args.allow_pickle)
        model.load_state_dict(center)
        data = load_data(args.data)
        check_runs(model, data, args.data)
        d1, d2 = random_directions(model, n=2, normalize="filter", seed=args.seed,
                                   ignore=None if args.keep_biasbn else "biasbn")
        batched = {"auto": "auto", "yes": True, "no": False}[args.batched]
        s1 = slice_1d(model, center, d1, data, alphas=args.grid, span=args.range, batched=batched)
        s2 = slice_2d(model, center, d1, d2, data, alphas=args.grid, span=args.range, batched=batched,
                      progress=True)
        written = _write(outputs, out, args, s1, s2) if out is not None else []
    print(f"loss at the model: {s1.loss[len(s1.loss) // 2]:.5f}; 2-D slice min {s2.loss.min():.5f}, "
          f"max {s2.loss.max():.5f}")
    print(f"{'alpha':>7}  {'loss (d1)':>10}  {'accuracy':>8}")
    for al, lo, ac in zip(s1.alphas, s1.loss, s1.accuracy):
        print(f"{al:7.3f}  {lo:10.5f}  {ac:8.4f}")
    if written:
        print("wrote " + ", ".join(map(str, written)))
    return 0


def _write(outputs, out, args: argparse.Namespace, s1, s2) -> list:
    import json

    from evaluations.landscape.plots import plot_contour, plot_slice_1d, plot_surface

    payload = {"model": args.model, "seed": args.seed, "range": args.range,
               "directions": "Gaussian, filter-normalized (Li et al. 2018)"
                             + ("; biases/norm layers kept" if args.keep_biasbn else "; biases/norm layers zeroed"),
               "slice_1d": s1.to_json(), "slice_2d": s2.to_json()}
    outputs.write_text(out / "landscape.json", json.dumps(payload, indent=2))
    outputs.write(out / "contour.png", lambda tmp: plot_contour(s2, tmp))
    outputs.write(out / "surface.png", lambda tmp: plot_surface(s2, tmp))
    outputs.write(out / "slice_1d.png", lambda tmp: plot_slice_1d(s1, tmp))
    return outputs.commit()
