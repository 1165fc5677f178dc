"""`basin moe CONFIG OUT_DIR`: a thin layer over `merging.moe.build_moe` (mergekit-moe's configuration)."""

from __future__ import annotations

import argparse
import json

HELP = "build a mixture-of-experts model from dense models (mergekit-moe's YAML)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML configuration (mergekit-moe schema: base_model, experts, gate_mode...)")
    parser.add_argument("out_dir", nargs="?", help="output folder (not needed with --dry-run)")
    parser.add_argument("--device", default="cpu", help="device of the hidden-state forward passes (default cpu)")
    parser.add_argument("--hidden-dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"],
                        help="dtype of the gate_mode hidden forward passes (mergekit: bfloat16; default float32)")
    parser.add_argument("--shard-size", default="5GB", help="maximum shard size, e.g. 5GB, 500MB (default 5GB)")
    parser.add_argument("--allow-pickle", action="store_true", help="allow pytorch_model.bin (weights_only load)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--dry-run", action="store_true", help="check the inputs and print every output tensor")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from merging.moe import build_moe
    from taxonomy.errors import BasinError

    if args.out_dir is None and not args.dry_run:
        raise BasinError("OUT_DIR is required (or pass --dry-run)")
    report = build_moe(args.config, args.out_dir, overwrite=args.overwrite, dry_run=args.dry_run,
                       device=args.device, shard_size=args.shard_size, hidden_dtype=args.hidden_dtype,
                       allow_pickle=args.allow_pickle, progress=not args.no_progress)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    elif args.dry_run:
        assert report.plan is not None
        print(report.plan.table())
    else:
        print(f"wrote {report.architecture} with {report.experts} experts ({report.tensors} tensors, "
              f"{report.bytes_written / 1e6:.1f} MB) into {report.out_dir} in {report.seconds:.2f} s "
              f"(router weights {report.router_seconds:.2f} s)")
        print(f"content hash {report.content_hash}")
    return 0
