"""`basin tokensurgeon MODEL DONOR OUT_DIR`: a thin layer over `merging.tokensurgeon.token_surgery`
(mergekit-tokensurgeon)."""

from __future__ import annotations

import argparse

from evaluations.cli.args import int_range
from evaluations.cli.output_args import add_output_arguments, out_dir, print_report

HELP = "give a model a donor's tokenizer (shared rows copied, new rows by OMP)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="the model (folder, .safetensors, Hub id, or base+lora)")
    parser.add_argument("donor", help="the model whose tokenizer (and embedding space) is transplanted")
    add_output_arguments(parser, dry_run_help="print the token counts and every output tensor; read no weights")
    parser.add_argument("-a", "--approximation-method", dest="method", default="omp",
                        help="rows of the donor-only tokens: omp (default: orthogonal matching pursuit over the "
                             "donor's embeddings), mean, zero, subword (mean of the model's rows of its pieces)")
    parser.add_argument("-k", "--k", type=int_range(1), default=64,
                        help="omp: shared tokens per new token (default 64, mergekit's; at most the shared count)")
    parser.add_argument("--batch-size", type=int_range(1), default=512,
                        help="omp: new tokens approximated at a time (default 512)")


def run(args: argparse.Namespace) -> int:
    from merging.tokensurgeon import token_surgery

    report = token_surgery(args.model, args.donor, out_dir(args), method=args.method, k=args.k,
                           batch_size=args.batch_size, overwrite=args.overwrite, dry_run=args.dry_run,
                           shard_size=args.shard_size, allow_pickle=args.allow_pickle, progress=not args.no_progress)
    print_report(args, report, lambda r: (
        f"wrote {r.tensors} tensors ({r.bytes_written / 1e6:.1f} MB) into {r.out_dir} in {r.seconds:.2f} s: "
        f"{r.shared} shared tokens copied, {r.approximated} approximated "
        f"({r.method}{f', k={r.k}' if r.method == 'omp' else ''}), {r.rows} rows"))
    return 0
