"""`basin ntk`: the empirical NTK of a digits MLP on test inputs, and its distance from the kernel at initialization."""

from __future__ import annotations

import argparse
import json
import time

from evaluations.cli.args import positive_int
from evaluations.cli.digits_mlp import add_model_arguments, build_model

HELP = "empirical neural tangent kernel and kernel distances"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("-n", type=positive_int, default=128, help="number of test inputs (at most the test split's)")
    parser.add_argument("--kind", default="trace", choices=["full", "block", "trace"])
    parser.add_argument("--method", default="auto", choices=["auto", "jacobian", "ntk_vp", "structured"])
    parser.add_argument("--json", help="write results to this JSON file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")


def run(args: argparse.Namespace) -> int:
    from evaluations.cli.outputs import Outputs
    from evaluations.digits import load_digits_split, make_mlp
    from evaluations.probes import empirical_ntk, kernel_alignment, kernel_distance
    from taxonomy.errors import BasinError

    with Outputs(args.overwrite, inputs=[args.state]) as outputs:
        json_path = outputs.file(args.json, "--json") if args.json else None
        data = load_digits_split()
        if args.n > len(data.x_test):
            raise BasinError(f"-n {args.n}: the digits test split has {len(data.x_test)} inputs")
        model, data = build_model(args, data)
        x, y = data.x_test[: args.n], data.y_test[: args.n]
        start = time.perf_counter()
        k = empirical_ntk(model, x, kind=args.kind, method=args.method)
        secs = time.perf_counter() - start
        init = make_mlp(list(args.widths), seed=args.seed)
        k0 = empirical_ntk(init, x, kind=args.kind, method=args.method)
        out = {"shape": list(k.shape), "seconds": secs, "distance_from_init": kernel_distance(k0, k)}
        if args.kind != "block":
            out["label_alignment"] = kernel_alignment(k, y, num_classes=10)
            out["label_alignment_init"] = kernel_alignment(k0, y, num_classes=10)
        if json_path is not None:
            outputs.write_text(json_path, json.dumps(out, indent=2))
        outputs.commit()
    for key, value in out.items():
        print(f"{key}: {value}")
    return 0
