"""`basin hessian`: top Hessian eigenvalues, trace and spectral density of a model's loss.

The model is a digits MLP (`--widths`, trained `--epochs` with `--seed`) or a state dict (`--state`)
loaded into that architecture; data are scikit-learn's digits (train split).
"""

from __future__ import annotations

import argparse
import json

HELP = "top Hessian eigenvalues, trace and spectral density"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--widths", default="64,128,10", help="MLP widths, comma-separated")
    parser.add_argument("--state", help="a torch state dict (.pt) for that MLP; default: train one")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--params", help="restrict to parameters with this name prefix (e.g. '2')")
    parser.add_argument("-k", type=int, default=3, help="how many top eigenvalues")
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--mode", choices=("eval", "train"), default="eval",
                        help="network mode of the Hessian: eval (BatchNorm running statistics) or train (BatchNorm "
                             "batch statistics, running statistics untouched); Dropout off in both")
    parser.add_argument("--trace", action="store_true", help="also estimate the trace (Hutchinson)")
    parser.add_argument("--density", help="also write the SLQ density plot to this PNG")
    parser.add_argument("--json", help="write results to this JSON file")


def build_model(args: argparse.Namespace):
    import pickle

    import torch

    from evaluations.digits import load_digits_split, make_mlp, train_classifier
    from taxonomy.errors import BasinError

    try:
        widths = [int(w) for w in args.widths.split(",")]
    except ValueError:
        raise BasinError(f"--widths: expected integers separated by commas, got {args.widths!r}") from None
    data = load_digits_split()
    model = make_mlp(widths, seed=args.seed)
    if args.state:
        try:
            model.load_state_dict(torch.load(args.state, weights_only=True))  # no pickled code
        except (OSError, RuntimeError, pickle.UnpicklingError) as err:
            raise BasinError(f"--state {args.state}: {str(err).splitlines()[0]}") from None
    else:
        train_classifier(model, *data.train, epochs=args.epochs, seed=args.seed)
    return model.eval(), data


def run(args: argparse.Namespace) -> int:
    from torch import nn

    from evaluations.probes import HessianOperator, hutchinson_trace, lanczos, spectral_density

    model, data = build_model(args)
    op = HessianOperator(model, nn.CrossEntropyLoss(), data.train, params=args.params, mode=args.mode)
    eig = lanczos(op, k=args.k, tol=args.tol)
    out = {"params": op.size, "mode": op.mode, "eigen": eig.to_json()}
    print(f"{op.size} parameters, {op.mode} mode; top-{args.k} eigenvalues (converged={eig.converged}, "
          f"{eig.iterations} HVPs):")
    for v, r in zip(eig.values, eig.residuals):
        print(f"  {float(v):.6g}  (residual {float(r):.2g})")
    if args.trace:
        est = hutchinson_trace(op)
        out["trace"] = est.to_json()
        print(f"trace {est.mean:.6g} +- {est.stderr:.2g} ({est.products} HVPs, converged={est.converged})")
    if args.density:
        dens = spectral_density(op)
        dens.plot(args.density)
        out["density"] = {"converged": dens.converged, "iterations": dens.iterations,
                          "moment_stderr": dens.moment_stderr, "mode": dens.mode}
        print(f"density written to {args.density} (converged={dens.converged}, {dens.iterations} HVPs)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0
