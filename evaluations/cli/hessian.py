"""`basin hessian`: top Hessian eigenvalues, trace and spectral density of a model's loss.

The model is a digits MLP (`--widths`, trained `--epochs` with `--seed`) or its weights (`--state`, see
`evaluations.cli.digits_mlp`) loaded into that architecture; data are scikit-learn's digits (train split).
"""

from __future__ import annotations

import argparse
import json

from evaluations.cli.args import float_range, positive_int
from evaluations.cli.digits_mlp import add_model_arguments, build_model

HELP = "top Hessian eigenvalues, trace and spectral density"
__all__ = ["HELP", "add_arguments", "build_model", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--params", help="restrict to parameters matching this regular expression or name prefix "
                        "(e.g. '2', 'layers\\.1\\.')")
    parser.add_argument("-k", type=positive_int, default=3, help="how many top eigenvalues")
    parser.add_argument("--tol", type=float_range(0, 1, lo_open=True), default=1e-3,
                        help="relative eigenvalue tolerance, in (0, 1] (default 1e-3)")
    parser.add_argument("--mode", choices=("eval", "train"), default="eval",
                        help="network mode of the Hessian: eval (BatchNorm running statistics) or train (BatchNorm "
                             "batch statistics, running statistics untouched); Dropout off in both")
    parser.add_argument("--trace", action="store_true", help="also estimate the trace (Hutch++)")
    parser.add_argument("--density", help="also write the SLQ density plot to this PNG")
    parser.add_argument("--json", help="write results to this JSON file")
    parser.add_argument("--overwrite", action="store_true", help="replace existing --json / --density files")


def run(args: argparse.Namespace) -> int:
    from torch import nn

    from evaluations.cli.outputs import Outputs
    from evaluations.probes import HessianOperator, hutchinson_trace, lanczos, spectral_density

    with Outputs(args.overwrite, inputs=[args.state]) as outputs:
        density_png = outputs.file(args.density, "--density") if args.density else None
        json_path = outputs.file(args.json, "--json") if args.json else None
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
        if density_png is not None:
            dens = spectral_density(op)
            outputs.write(density_png, dens.plot)
            out["density"] = {"converged": dens.converged, "iterations": dens.iterations,
                              "moment_stderr": dens.moment_stderr, "mode": dens.mode}
            print(f"density written to {args.density} (converged={dens.converged}, {dens.iterations} HVPs)")
        if json_path is not None:
            outputs.write_text(json_path, json.dumps(out, indent=2))
        outputs.commit()
    return 0
