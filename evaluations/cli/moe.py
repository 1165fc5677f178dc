"""`basin moe CONFIG OUT_DIR`: a thin layer over `merging.moe.build_moe` (mergekit-moe's configuration)."""

from __future__ import annotations

import argparse

from evaluations.cli.output_args import add_output_arguments, out_dir, print_report

HELP = "build a mixture-of-experts model from dense models (mergekit-moe's YAML)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML configuration (mergekit-moe schema: base_model, experts, gate_mode...)")
    add_output_arguments(parser, dry_run_help="check the inputs and print every output tensor",
                         device_help="device of the hidden-state forward passes (default cpu)")
    parser.add_argument("--hidden-dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"],
                        help="dtype of the gate_mode hidden forward passes (mergekit: bfloat16; default float32)")


def run(args: argparse.Namespace) -> int:
    from merging.moe import build_moe

    report = build_moe(args.config, out_dir(args), overwrite=args.overwrite, dry_run=args.dry_run,
                       device=args.device, shard_size=args.shard_size, hidden_dtype=args.hidden_dtype,
                       allow_pickle=args.allow_pickle, progress=not args.no_progress)
    print_report(args, report, lambda r: (
        f"wrote {r.architecture} with {r.experts} experts ({r.tensors} tensors, {r.bytes_written / 1e6:.1f} MB) "
        f"into {r.out_dir} in {r.seconds:.2f} s (router weights {r.router_seconds:.2f} s)"))
    return 0
