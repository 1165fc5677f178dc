"""`basin ntk [MODEL]`: the empirical NTK.

- MODEL (a transformers checkpoint) with `--data calib.txt`: the kernel of the model objective's outputs on the
  first `--rows` predicted tokens (evaluations.probes.objective_ntk: the target logits, or every logit traced);
- none: the digits MLP demo on test inputs, and its distance from the kernel at initialization.
"""

from __future__ import annotations

import argparse
import json
import time

from evaluations.cli.args import positive_int
from evaluations.cli.digits_mlp import add_model_arguments, build_model
from evaluations.cli.hessian import add_checkpoint_arguments

HELP = "empirical neural tangent kernel and kernel distances"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(parser)
    add_model_arguments(parser)
    parser.add_argument("-n", type=positive_int, default=128, help="number of test inputs (at most the test split's)")
    parser.add_argument("--kind", default="trace", choices=["full", "block", "trace"])
    parser.add_argument("--method", default="auto", choices=["auto", "jacobian", "ntk_vp", "structured"])
    parser.add_argument("--params", help="differentiate only the parameters matching this regular expression")
    parser.add_argument("--rows", type=positive_int, default=8, help="with MODEL: predicted tokens in the kernel")
    parser.add_argument("--outputs", choices=("target", "all"), default="target",
                        help="with MODEL: each row's target logit, or every logit (traced over the vocabulary)")
    parser.add_argument("--json", help="write results to this JSON file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")


def run(args: argparse.Namespace) -> int:
    from evaluations.cli.outputs import Outputs

    with Outputs(args.overwrite, inputs=[args.state, args.model]) as outputs:
        json_path = outputs.file(args.json, "--json") if args.json else None
        out = _checkpoint(args) if args.model is not None else _digits(args)
        if json_path is not None:
            outputs.write_text(json_path, json.dumps(out, indent=2))
        outputs.commit()
    for key, value in out.items():
        if key != "kernel":
            print(f"{key}: {value}")
    return 0


def _checkpoint(args: argparse.Namespace) -> dict:
    from evaluations.cli.hessian import load_checkpoint_task
    from evaluations.probes.objective_ntk import objective_ntk

    model, objective, batches, line = load_checkpoint_task(args)
    print(line)
    start = time.perf_counter()
    result = objective_ntk(model, objective, batches, rows=args.rows, params=args.params, outputs=args.outputs)
    return {**result.to_json(), "seconds": time.perf_counter() - start}


def _digits(args: argparse.Namespace) -> dict:
    from evaluations.digits import load_digits_split, make_mlp
    from evaluations.probes import empirical_ntk, kernel_alignment, kernel_distance
    from taxonomy.errors import BasinError

    data = load_digits_split()
    if args.n > len(data.x_test):
        raise BasinError(f"-n {args.n}: the digits test split has {len(data.x_test)} inputs")
    model, data = build_model(args, data)
    x, y = data.x_test[: args.n], data.y_test[: args.n]
    start = time.perf_counter()
    k = empirical_ntk(model, x, kind=args.kind, method=args.method, params=args.params)
    secs = time.perf_counter() - start
    init = make_mlp(list(args.widths), seed=args.seed)
    k0 = empirical_ntk(init, x, kind=args.kind, method=args.method, params=args.params)
    out = {"shape": list(k.shape), "seconds": secs, "distance_from_init": kernel_distance(k0, k)}
    if args.kind != "block":
        out["label_alignment"] = kernel_alignment(k, y, num_classes=10)
        out["label_alignment_init"] = kernel_alignment(k0, y, num_classes=10)
    return out
