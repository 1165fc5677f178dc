"""`basin ntk`: the empirical NTK of a digits MLP on test inputs, and its distance from the kernel at initialization."""

from __future__ import annotations

import argparse
import json
import time

from evaluations.cli.hessian import build_model

HELP = "empirical neural tangent kernel and kernel distances"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--widths", default="64,128,10", help="MLP widths, comma-separated")
    parser.add_argument("--state", help="a torch state dict (.pt) for that MLP; default: train one")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-n", type=int, default=128, help="number of test inputs")
    parser.add_argument("--kind", default="trace", choices=["full", "block", "trace"])
    parser.add_argument("--method", default="auto", choices=["auto", "jacobian", "ntk_vp", "structured"])
    parser.add_argument("--json", help="write results to this JSON file")


def run(args: argparse.Namespace) -> int:
    from evaluations.digits import make_mlp
    from evaluations.probes import empirical_ntk, kernel_alignment, kernel_distance
    from merging.outputs import check_files

    check_files([args.json], [args.state])
    model, data = build_model(args)
    x, y = data.x_test[: args.n], data.y_test[: args.n]
    start = time.perf_counter()
    k = empirical_ntk(model, x, kind=args.kind, method=args.method)
    secs = time.perf_counter() - start
    init = make_mlp([int(w) for w in args.widths.split(",")], seed=args.seed)
    k0 = empirical_ntk(init, x, kind=args.kind, method=args.method)
    out = {"shape": list(k.shape), "seconds": secs, "distance_from_init": kernel_distance(k0, k)}
    if args.kind != "block":
        out["label_alignment"] = kernel_alignment(k, y, num_classes=10)
        out["label_alignment_init"] = kernel_alignment(k0, y, num_classes=10)
    for key, value in out.items():
        print(f"{key}: {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0
