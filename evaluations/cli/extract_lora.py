"""`basin extract-lora FINETUNED BASE OUT`: a PEFT LoRA adapter of a fine-tune minus its base (mergekit-extract-lora);
a thin layer over `merging.extraction.extract_lora`."""

from __future__ import annotations

import argparse
import json

from evaluations.cli.args import float_range, int_range
from evaluations.cli.output_args import add_output_arguments, out_dir

HELP = "extract a PEFT LoRA adapter from a fine-tune minus its base (truncated SVD per module)"


def _rank(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int_range(1)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("finetuned", help="the fine-tuned model (folder, .safetensors, Hub id, or base+lora)")
    parser.add_argument("base", help="the base model it was fine-tuned from")
    add_output_arguments(parser, out_help="output adapter folder (not needed with --dry-run)", shard_size=False,
                         dry_run_help="print what would be extracted; read no weights")
    parser.add_argument("--rank", type=_rank, default=128,
                        help="LoRA rank of every module (default 128; larger than a matrix is an error), or 'auto': "
                             "per module, the smallest rank keeping --energy of the difference's squared norm")
    parser.add_argument("--energy", type=float_range(0.0, 1.0, lo_open=True),
                        help="with --rank auto: the fraction of energy (sum of squared singular values) to keep "
                             "(default 0.9)")
    parser.add_argument("--sv-epsilon", type=float_range(0.0), default=0.0,
                        help="drop singular values at or below this (default 0: keep all)")
    parser.add_argument("--embed-lora", action="store_true",
                        help="factorise embeddings and output heads too (default: save them whole)")
    parser.add_argument("--include", action="append", default=[], metavar="RE",
                        help="only modules whose name matches this regex (repeatable)")
    parser.add_argument("--exclude", action="append", default=[], metavar="RE",
                        help="skip modules whose name matches this regex (repeatable)")


def run(args: argparse.Namespace) -> int:
    from merging.extraction import extract_lora

    report = extract_lora(args.finetuned, args.base, out_dir(args), rank=args.rank, energy=args.energy,
                          sv_epsilon=args.sv_epsilon, embed_lora=args.embed_lora, include=args.include,
                          exclude=args.exclude, dry_run=args.dry_run, overwrite=args.overwrite,
                          progress=not args.no_progress, allow_pickle=args.allow_pickle)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0
    print(report.table())
    if report.dry_run:
        print(f"dry run: would write {len(report.modules)} LoRA module(s) and up to {len(report.full)} whole "
              "tensor(s); nothing read or written")
    else:
        print(f"extracted {len(report.modules)} LoRA module(s), {len(report.full)} tensor(s) saved whole "
              f"({report.bytes_written / 1e6:.1f} MB) into {report.out_dir} in {report.seconds:.2f} s; "
              f"peak RSS {report.peak_rss_mb:.0f} MB; report in {report.out_dir}/extraction.json")
    return 0
