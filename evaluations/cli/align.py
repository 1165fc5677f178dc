"""`basin align A B OUT`: write checkpoint B with its hidden units permuted onto A's (Git Re-Basin)."""

from __future__ import annotations

import argparse

from evaluations.cli.args import positive_int, seed

HELP = "permute model B's hidden units to match model A"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", help="reference checkpoint (folder, .safetensors file or Hub id)")
    parser.add_argument("b", help="checkpoint to permute onto A")
    parser.add_argument("out", help="output folder (safetensors, plus B's config/tokenizer files)")
    parser.add_argument("--method", choices=("weight_matching", "activation_matching"), default="weight_matching")
    parser.add_argument("--model-factory", help="module:fn returning an nn.Module of the checkpoints' architecture "
                        "(needed unless the inputs are BERT/Llama-style Hugging Face folders)")
    parser.add_argument("--data", help="module:fn returning input batches (activation matching): a tensor, a dict "
                        "of model inputs, or a list of those")
    parser.add_argument("--spec", help="a permutation spec as JSON (PermutationSpec.to_json)")
    parser.add_argument("--residual", choices=("auto", "yes", "no"), default="auto",
                        help="transformers: permute the residual stream (auto: only when a head reads it)")
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--max-iter", type=positive_int, default=100)
    parser.add_argument("--overwrite", action="store_true")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from merging.alignment.checkpoints import align_pair
    from merging.objects import load_object

    options = {
        "method": args.method,
        "seed": args.seed,
        "max_iter": args.max_iter,
        "residual": {"auto": "auto", "yes": True, "no": False}[args.residual],
        "spec": args.spec,
        "model_factory": load_object(args.model_factory, "--model-factory", files=True) if args.model_factory else None,
        "data": load_object(args.data, "--data", files=True)() if args.data else None,
        "progress": True,
    }
    path, result = align_pair(args.a, args.b, Path(args.out), options, overwrite=args.overwrite)
    state = "converged" if result.converged else "not converged"
    objective = f", objective {result.objective[-1]:.6g}" if result.objective else ""
    print(f"{args.method}: {len(result.perms)} permutation groups, {result.iterations} pass(es), {state}"
          f"{objective}, {result.seconds:.2f} s")
    print(f"wrote {path}")
    return 0
