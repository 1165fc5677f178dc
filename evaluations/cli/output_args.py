"""The arguments every `basin` command that writes a model folder shares (merge, moe, extract-lora,
tokensurgeon), defined once: OUT_DIR (optional with --dry-run), --shard-size, --allow-pickle, --overwrite,
--dry-run, --json, --no-progress (--device where the command computes on one); and the one check they share
(`out_dir`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

DEFAULT_HELP = {
    "out_dir": "output folder (not needed with --dry-run)",
    "dry_run": "check the inputs and print what would be written; write nothing",
}


def add_output_arguments(parser: argparse.ArgumentParser, *, out_help: str | None = None,
                         dry_run_help: str | None = None, shard_size: bool = True,
                         json_help: str = "print the report as JSON", device_help: str | None = None) -> None:
    """OUT_DIR and the flags above (`shard_size=False`: a command writing one adapter file has no shards;
    `device_help`: the command computes on a device, --device, default cpu)."""
    parser.add_argument("out_dir", nargs="?", help=out_help or DEFAULT_HELP["out_dir"])
    if device_help:
        parser.add_argument("--device", default="cpu", help=device_help)
    if shard_size:
        parser.add_argument("--shard-size", default="5GB", help="maximum shard size, e.g. 5GB, 500MB (default 5GB)")
    parser.add_argument("--allow-pickle", action="store_true", help="allow pytorch_model.bin (weights_only load)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--dry-run", action="store_true", help=dry_run_help or DEFAULT_HELP["dry_run"])
    parser.add_argument("--json", action="store_true", help=json_help)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def out_dir(args: argparse.Namespace) -> str | None:
    """OUT_DIR, required unless --dry-run (a one-line error, exit 2)."""
    from taxonomy.errors import BasinError

    if args.out_dir is None and not args.dry_run:
        raise BasinError("OUT_DIR is required (or pass --dry-run)")
    return args.out_dir


def print_report(args: argparse.Namespace, report: Any, summary: Callable[[Any], str]) -> None:
    """The report as JSON with --json, the plan's table on a dry run, else `summary(report)` and the content
    hash (`summary` is called only for a written output: a dry run's report has no sizes or times)."""
    import json

    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    elif args.dry_run:
        print(report.plan.table())
    else:
        print(summary(report))
        print(f"content hash {report.content_hash}")
