"""`basin landscape MODEL`: 1-D/2-D loss slices around a model, or the plane through it and two more.

Two forms, as `basin barrier`: `--model-factory module:fn --data module:fn` (any nn.Module, (x, y) data, the
in-memory evaluator), or, for a transformers checkpoint with a config.json, `--data calib.txt`: the model of
MODEL's config (`--dtype`, `--device`), its own objective (`objective_for`), every grid point streamed into
the one model (`evaluations.checkpoint_landscape`). Without `--through`, slices along two seeded,
filter-normalised Gaussian directions (Li et al. 2018) over [-range, range]; with `--through A B`
(checkpoint form only), the plane through MODEL, A and B (Garipov et al. 2018, Sec. 5) on a grid covering the
three points with `--margin` on each side."""

from __future__ import annotations

import argparse

from evaluations.cli.args import float_range, grid_size, int_range, seed
from merging.dtypes import EVAL_DTYPES

HELP = "1D/2D loss-landscape slices around a model"
OUT_FILES = ["landscape.json", "contour.png", "surface.png", "slice_1d.png"]
MAX_RANGE = 1e6


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="checkpoint (.safetensors file, folder or Hub id)")
    parser.add_argument("--model-factory", help="module:fn (or file.py:fn) returning an nn.Module (default: the "
                        "transformers model of MODEL's config.json)")
    parser.add_argument("--data", required=True, help="module:fn returning (x, y) tensors or a DataLoader; without "
                        "--model-factory, a .txt file of calibration text")
    parser.add_argument("--through", nargs=2, metavar=("A", "B"),
                        help="the plane through MODEL, A and B instead of random directions (checkpoint form)")
    parser.add_argument("--margin", type=float_range(0, 10), default=0.2,
                        help="with --through: grid margin around the three points, a fraction of their extent")
    parser.add_argument("--seq-len", type=int_range(2),
                        help="tokens per text block (default 128, or the model's positions where it has fewer)")
    parser.add_argument("--max-examples", type=int_range(1), help="at most this many blocks (seeded draw)")
    parser.add_argument("--batch-size", type=int_range(1), default=8, help="blocks per batch (default 8)")
    parser.add_argument("--dtype", choices=EVAL_DTYPES, default="float32", help="model dtype (default float32)")
    parser.add_argument("--device", default="cpu", help="torch device for the model (default cpu)")
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
    if args.model_factory is None:
        return run_checkpoint(args)
    if args.through is not None:
        from taxonomy.errors import BasinError

        raise BasinError("--through needs checkpoints with a config.json (not --model-factory)")
    return run_factory(args)


def run_checkpoint(args: argparse.Namespace) -> int:
    """MODEL (and --through A B) are transformers checkpoints, --data a text file: streamed grid points."""
    from evaluations.checkpoint_landscape import checkpoint_plane, checkpoint_slices
    from evaluations.cli.barrier import load_text_model, used_line
    from evaluations.cli.outputs import Outputs

    with Outputs(args.overwrite, inputs=[args.model, *(args.through or [])]) as outputs:
        out = outputs.folder(args.out, OUT_FILES, "--out") if args.out else None
        model, data, _ = load_text_model(args, args.model)
        if args.through:
            land = checkpoint_plane(model, args.model, *args.through, data, grid=args.grid, margin=args.margin,
                                    progress=True)
        else:
            land = checkpoint_slices(model, args.model, data, grid=args.grid, span=args.range, seed=args.seed,
                                     ignore=None if args.keep_biasbn else "biasbn", progress=True)
        written = _write(outputs, out, args, land.slice_1d, land.slice_2d, land) if out is not None else []
    print(used_line(model, args, land.objective, land.tokens, land.examples, land.unit))
    _print(land.slice_1d, land.slice_2d)
    if written:
        print("wrote " + ", ".join(map(str, written)))
    return 0


def run_factory(args: argparse.Namespace) -> int:
    from evaluations.cli.outputs import Outputs
    from evaluations.landscape import random_directions, slice_1d, slice_2d
    from evaluations.landscape.io import build_model, check_runs, load_data, load_into
    from evaluations.landscape.params import as_params

    with Outputs(args.overwrite, inputs=[args.model]) as outputs:
        out = outputs.folder(args.out, OUT_FILES, "--out") if args.out else None
        model = build_model(args.model_factory)
        center = as_params(load_into(args.model, model, args.allow_pickle))  # the model's own tensors, no copy
        data = load_data(args.data)
        check_runs(model, data, args.data)
        d1, d2 = random_directions(model, n=2, normalize="filter", seed=args.seed,
                                   ignore=None if args.keep_biasbn else "biasbn")
        batched = {"auto": "auto", "yes": True, "no": False}[args.batched]
        s1 = slice_1d(model, center, d1, data, alphas=args.grid, span=args.range, batched=batched)
        s2 = slice_2d(model, center, d1, d2, data, alphas=args.grid, span=args.range, batched=batched,
                      progress=True)
        written = _write(outputs, out, args, s1, s2) if out is not None else []
    _print(s1, s2)
    if written:
        print("wrote " + ", ".join(map(str, written)))
    return 0


def _print(s1, s2) -> None:
    if s1 is None:  # the plane through three checkpoints
        print(f"plane: loss min {s2.loss.min():.5f}, max {s2.loss.max():.5f} on {s2.loss.size} points")
        return
    print(f"loss at the model: {s1.loss[len(s1.loss) // 2]:.5f}; 2-D slice min {s2.loss.min():.5f}, "
          f"max {s2.loss.max():.5f}")
    print(f"{'alpha':>7}  {'loss (d1)':>10}  {'accuracy':>8}")
    for al, lo, ac in zip(s1.alphas, s1.loss, s1.accuracy):
        print(f"{al:7.3f}  {lo:10.5f}  {ac:8.4f}")


def _directions(args: argparse.Namespace) -> str:
    if getattr(args, "through", None):
        return f"the plane through MODEL, {args.through[0]} and {args.through[1]} (Garipov et al. 2018, Sec. 5)"
    return ("Gaussian, filter-normalized (Li et al. 2018)"
            + ("; biases/norm layers kept" if args.keep_biasbn else "; biases/norm layers zeroed"))


def _write(outputs, out, args: argparse.Namespace, s1, s2, land=None) -> list:
    import json

    from evaluations.landscape.plots import plot_contour, plot_slice_1d, plot_surface

    payload = {"model": args.model, "seed": args.seed, "range": args.range, "directions": _directions(args),
               "slice_2d": s2.to_json()}
    if land is not None:
        payload.update(land.to_json())
    elif s1 is not None:
        payload["slice_1d"] = s1.to_json()
    outputs.write_text(out / "landscape.json", json.dumps(payload, indent=2))
    outputs.write(out / "contour.png", lambda tmp: plot_contour(s2, tmp))
    outputs.write(out / "surface.png", lambda tmp: plot_surface(s2, tmp))
    if s1 is not None:
        outputs.write(out / "slice_1d.png", lambda tmp: plot_slice_1d(s1, tmp))
    return outputs.commit()
