"""The digits MLP probed by `basin hessian` and `basin ntk`: its options, checks and loading.

`--widths` (64 inputs ... 10 classes), `--state` (the MLP's weights: a .safetensors file, or a PyTorch
pickle only with `--allow-pickle`, then read with `torch.load(weights_only=True)`), otherwise a fresh MLP
trained `--epochs` with `--seed` on scikit-learn's digits (train split).
"""

from __future__ import annotations

import argparse

from evaluations.cli.args import BYTES_PER_POINT, int_list, memory_budget, nonnegative_int, seed

IN_FEATURES, CLASSES = 64, 10  # 8x8 digits, 10 classes
MAX_WIDTH = 65_536
BYTES_PER_PARAM = 2 * BYTES_PER_POINT  # a probe keeps ~200 float64 Krylov vectors (Lanczos) or Jacobian rows


def mlp_widths(text: str) -> list[int]:
    """An argparse type: comma-separated widths from 64 (inputs) to 10 (classes), each in [1, MAX_WIDTH], with
    few enough parameters for the memory budget."""
    widths = int_list(1, MAX_WIDTH, min_len=2)(text)
    if widths[0] != IN_FEATURES or widths[-1] != CLASSES:
        raise argparse.ArgumentTypeError(f"must start with {IN_FEATURES} (the digits' pixels) and end with "
                                         f"{CLASSES} (their classes), got {text!r}")
    params = sum((a + 1) * b for a, b in zip(widths, widths[1:]))
    if params * BYTES_PER_PARAM > memory_budget():
        raise argparse.ArgumentTypeError(f"{text!r} has {params:,} parameters, too many for the memory budget "
                                         f"({memory_budget() / 2**30:.3g} GiB at {BYTES_PER_PARAM} bytes each)")
    return widths


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--widths", type=mlp_widths, default="64,128,10",
                        help="MLP widths, comma-separated, 64 first and 10 last (default 64,128,10)")
    parser.add_argument("--state", help="the MLP's weights: .safetensors file (a .pt pickle needs --allow-pickle); "
                        "default: train one")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="accept a PyTorch pickle --state (loaded with torch.load(weights_only=True))")
    parser.add_argument("--epochs", type=nonnegative_int, default=5, help="training epochs without --state")
    parser.add_argument("--seed", type=seed, default=0)


def build_model(args: argparse.Namespace, data=None):
    """(model in eval mode, digits split): the MLP of `args.widths` with `--state` loaded, or trained."""
    from evaluations.digits import load_digits_split, make_mlp, train_classifier
    from evaluations.landscape.io import load_into

    data = data if data is not None else load_digits_split()
    model = make_mlp(list(args.widths), seed=args.seed)
    if args.state:
        load_into(args.state, model, allow_pickle=args.allow_pickle)
    else:
        train_classifier(model, *data.train, epochs=args.epochs, seed=args.seed)
    return model.eval(), data
