"""`basin barrier A B --model-factory module:fn --data module:fn`: loss and error barriers on the line A -> B."""

from __future__ import annotations

import argparse

HELP = "loss and error barrier along the path between two models"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", help="checkpoint A (.safetensors file, folder or Hub id)")
    parser.add_argument("b", help="checkpoint B")
    parser.add_argument("--model-factory", required=True, help="module:fn (or file.py:fn) returning an nn.Module")
    parser.add_argument("--data", required=True, help="module:fn returning (x, y) tensors or a DataLoader")
    parser.add_argument("--alphas", type=int, default=25, help="points on the path (default 25)")
    parser.add_argument("--batched", choices=("auto", "yes", "no"), default="auto",
                        help="vmap over parameter points (auto: small models without BatchNorm)")
    parser.add_argument("--bn-reset", action="store_true", help="re-estimate BatchNorm statistics at each point")
    parser.add_argument("--out", help="folder for barrier.json and path.png")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from evaluations.landscape import REFERENCES, barrier, evaluate_path, linear_path
    from evaluations.landscape.io import build_model, load_data, load_state, write_json
    from evaluations.landscape.plots import plot_path
    from merging.outputs import check_files

    out_files = [Path(args.out) / "barrier.json", Path(args.out) / "path.png"] if args.out else []
    check_files(out_files, [args.a, args.b])  # before any work: the outputs never replace an input
    model = build_model(args.model_factory)
    a, b = load_state(args.a, model), load_state(args.b, model)
    data = load_data(args.data)
    batched = {"auto": "auto", "yes": True, "no": False}[args.batched]
    result = evaluate_path(model, linear_path(a, b), data, alphas=args.alphas, batched=batched,
                           bn_reset_data=data if args.bn_reset else None, progress=True)
    barriers = [barrier(result, kind, form, rel) for kind in ("loss", "error") for form in REFERENCES
                for rel in (False, True)]
    print(f"{'alpha':>6}  {'loss':>10}  {'accuracy':>8}")
    for al, lo, ac in zip(result.alphas, result.loss, result.accuracy):
        print(f"{al:6.3f}  {lo:10.5f}  {ac:8.4f}")
    print()
    print(f"{'kind':<6} {'form':<9} {'relative':<8} {'value':>10} {'at alpha':>8}")
    for bar in barriers:
        print(f"{bar.kind:<6} {bar.form:<9} {str(bar.relative):<8} {bar.value:10.5f} {bar.alpha:8.3f}")
    if args.out:
        out = Path(args.out)
        path = write_json(out, "barrier.json", {"a": args.a, "b": args.b, "path": result.to_json(),
                                                "barriers": [bar.to_json() for bar in barriers]})
        plot = plot_path(result, out / "path.png", title="A -> B")
        print(f"wrote {path}" + (f" and {plot}" if plot else ""))
    return 0
