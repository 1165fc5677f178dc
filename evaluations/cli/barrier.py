"""`basin barrier A B`: loss and error barriers on the line A -> B.

Two forms: `--model-factory module:fn --data module:fn` (any nn.Module, (x, y) data), or, for transformers
checkpoints with a config.json, `--data calib.txt`: the model built from A's config (`--dtype`, `--device`),
the text packed into `--seq-len` blocks with A's tokenizer, and the loss of the model's own objective
(`objective_for`: next-token cross-entropy for a causal LM, ...). In both forms A and B stay memory-mapped and
each point is streamed into the one model (`evaluations.lm_path`): memory is one model plus a few chunks. `--via C`
bends the path through a third checkpoint (`--curve bezier`: Garipov et al.'s quadratic Bezier with control point
C; `polychain`: A -> C -> B)."""

from __future__ import annotations

import argparse

from evaluations.cli.args import grid_size, int_range
from merging.dtypes import EVAL_DTYPES

HELP = "loss and error barrier along the path between two models"
OUT_FILES = ["barrier.json", "path.png"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", help="checkpoint A (.safetensors file, folder or Hub id)")
    parser.add_argument("b", help="checkpoint B")
    parser.add_argument("--model-factory", help="module:fn (or file.py:fn) returning an nn.Module (default: the "
                        "transformers model of A's config.json)")
    parser.add_argument("--data", required=True, help="module:fn returning (x, y) tensors or a DataLoader; without "
                        "--model-factory, a .txt file of calibration text")
    parser.add_argument("--seq-len", type=int_range(2),
                        help="tokens per text block (default 128, or the model's positions where it has fewer)")
    parser.add_argument("--max-examples", type=int_range(1), help="at most this many blocks (seeded draw)")
    parser.add_argument("--batch-size", type=int_range(1), default=8, help="blocks per batch (default 8)")
    parser.add_argument("--dtype", choices=EVAL_DTYPES, default="float32", help="model dtype (default float32)")
    parser.add_argument("--device", default="cpu", help="torch device for the model (default cpu)")
    parser.add_argument("--via", help="a third checkpoint C: the path bends through it")
    parser.add_argument("--curve", choices=("bezier", "polychain"), default="bezier",
                        help="with --via: quadratic Bezier with control point C, or the chain A -> C -> B")
    parser.add_argument("--alphas", type=grid_size(1), default=25, help="points on the path, >= 2 (default 25)")
    parser.add_argument("--batched", choices=("auto", "yes", "no"), default="auto",
                        help="accepted for compatibility, no effect: points are streamed into the model one at a time")
    parser.add_argument("--bn-reset", action="store_true",
                        help="re-estimate BatchNorm statistics at each point (--model-factory form)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="accept PyTorch pickle checkpoints (loaded with torch.load(weights_only=True))")
    parser.add_argument("--out", help="folder for barrier.json and path.png")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files in --out")


def run(args: argparse.Namespace) -> int:
    """Both forms stream the path: A, B (and C) stay memory-mapped, each point is written into the one model."""
    from evaluations.cli.outputs import Outputs
    from evaluations.landscape import REFERENCES, barrier
    from evaluations.landscape.checkpoint_paths import CheckpointPath
    from evaluations.lm_path import evaluate_weighted_path

    refs = [args.a, args.b] if args.via is None else [args.a, args.via, args.b]
    path = CheckpointPath(refs, "linear" if args.via is None else args.curve)
    with Outputs(args.overwrite, inputs=refs) as outputs:
        out = outputs.folder(args.out, OUT_FILES, "--out") if args.out else None
        model, data, bn_data = load_text_model(args, args.a) if args.model_factory is None else _factory_task(args)
        result = evaluate_weighted_path(model, path, data, alphas=args.alphas, progress=True,
                                        allow_pickle=args.allow_pickle, bn_reset_data=bn_data)
        barriers = [barrier(result, kind, form, rel) for kind in ("loss", "error") for form in REFERENCES
                    for rel in (False, True)]
        written = _write(outputs, out, args, result, barriers) if out is not None else []
    if args.model_factory is None:
        print(used_line(model, args, result.objective, result.tokens, result.examples, result.unit))
    _print(result, barriers)
    if written:
        print("wrote " + ", ".join(map(str, written)))
    return 0


def _factory_task(args: argparse.Namespace):
    """(the --model-factory model, its --data as a list of (x, y) batches, the same for --bn-reset or None)."""
    from evaluations.landscape.evaluate import iter_batches
    from evaluations.landscape.io import build_model, check_runs, load_data

    model = build_model(args.model_factory)
    data = load_data(args.data)
    check_runs(model, data, args.data)
    batches = list(iter_batches(data))
    return model, batches, batches if args.bn_reset else None


def load_text_model(args: argparse.Namespace, ref: str):
    """(the transformers model of `ref`, the --data text batches) for the checkpoint form of a command."""
    from pathlib import Path

    from evaluations.models import load_model
    from evaluations.text_data import load_data
    from taxonomy.errors import DataError

    if not Path(args.data).is_file():
        raise DataError(f"--data {args.data}: no such text file (a module:fn needs --model-factory)")
    model = load_model(ref, dtype=args.dtype, device=args.device, allow_pickle=args.allow_pickle)
    data = load_data(model, args.data, seq_len=args.seq_len, max_examples=args.max_examples,
                          batch_size=args.batch_size)
    args.seq_len = data.seq_len  # the length used, for `used_line`
    return model, data, None


def used_line(model, args: argparse.Namespace, objective: str, rows: int, examples: int, unit: str) -> str:
    """The one line every checkpoint command prints: model class, dtype, device, loss, examples, and the output
    rows in the unit the objective counts (predicted or masked tokens, examples, pairs)."""
    return (f"model {type(model).__name__} ({args.dtype}, {args.device}); {examples} examples of {args.seq_len} "
            f"tokens, {rows} {unit}; loss: {objective}")


def _write(outputs, out, args: argparse.Namespace, result, barriers) -> list:
    import json

    from evaluations.landscape.plots import plot_path

    via = getattr(args, "via", None)
    payload = {"a": args.a, "b": args.b, "via": via, "curve": args.curve if via else "linear",
               "path": result.to_json(), "barriers": [bar.to_json() for bar in barriers]}
    outputs.write_text(out / "barrier.json", json.dumps(payload, indent=2))
    title = "A -> B" if via is None else f"A -> C -> B ({args.curve})"
    outputs.write(out / "path.png", lambda tmp: plot_path(result, tmp, title=title))
    return outputs.commit()


def _print(result, barriers) -> None:
    ppl = getattr(result, "perplexity", None)
    print(f"{'alpha':>6}  {'loss':>10}  {'accuracy':>8}" + (f"  {'perplexity':>12}" if ppl is not None else ""))
    for i, (al, lo, ac) in enumerate(zip(result.alphas, result.loss, result.accuracy)):
        print(f"{al:6.3f}  {lo:10.5f}  {ac:8.4f}" + (f"  {ppl[i]:12.4f}" if ppl is not None else ""))
    print()
    print(f"{'kind':<6} {'form':<9} {'relative':<8} {'value':>10} {'at alpha':>8}")
    for bar in barriers:
        print(f"{bar.kind:<6} {bar.form:<9} {str(bar.relative):<8} {bar.value:10.5f} {bar.alpha:8.3f}")
