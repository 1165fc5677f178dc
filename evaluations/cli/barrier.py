"""`basin barrier A B --model-factory module:fn --data module:fn`: loss and error barriers on the line A -> B."""

from __future__ import annotations

import argparse

from evaluations.cli.args import grid_size

HELP = "loss and error barrier along the path between two models"
OUT_FILES = ["barrier.json", "path.png"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", help="checkpoint A (.safetensors file, folder or Hub id)")
    parser.add_argument("b", help="checkpoint B")
    parser.add_argument("--model-factory", required=True, help="module:fn (or file.py:fn) returning an nn.Module")
    parser.add_argument("--data", required=True, help="module:fn returning (x, y) tensors or a DataLoader")
    parser.add_argument("--alphas", type=grid_size(1), default=25, help="points on the path, >= 2 (default 25)")
    parser.add_argument("--batched", choices=("auto", "yes", "no"), default="auto",
                        help="vmap over parameter points (auto: small models without BatchNorm)")
    parser.add_argument("--bn-reset", action="store_true", help="re-estimate BatchNorm statistics at each point")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="accept PyTorch pickle checkpoints (loaded with torch.load(weights_only=True))")
    parser.add_argument("--out", help="folder for barrier.json and path.png")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files in --out")


def run(args: argparse.Namespace) -> int:
    from evaluations.cli.outputs import Outputs
    from evaluations.landscape import REFERENCES, barrier, evaluate_path, linear_path
    from evaluations.landscape.io import build_model, check_runs, load_data, load_state

    with Outputs(args.overwrite, inputs=[args.a, args.b]) as outputs:
        out = outputs.folder(args.out, OUT_FILES, "--out") if args.out else None
        model = build_model(args.model_factory)
        a, b = (load_state(ref, model, args.allow_pickle) for ref in (args.a, args.b))
        data = load_data(args.data)
        check_runs(model, data, args.data)
        batched = {"auto": "auto", "yes": True, "no": False}[args.batched]
        result = evaluate_path(model, linear_path(a, b), data, alphas=args.alphas, batched=batched,
                               bn_reset_data=data if args.bn_reset else None, progress=True)
        barriers = [barrier(result, kind, form, rel) for kind in ("loss", "error") for form in REFERENCES
                    for rel in (False, True)]
        written = _write(outputs, out, args, result, barriers) if out is not None else []
    _print(result, barriers)
    if written:
        print("wrote " + ", ".join(map(str, written)))
    return 0


def _write(outputs, out, args: argparse.Namespace, result, barriers) -> list:
    import json

    from evaluations.landscape.plots import plot_path

    payload = {"a": args.a, "b": args.b, "path": result.to_json(), "barriers": [bar.to_json() for bar in barriers]}
    outputs.write_text(out / "barrier.json", json.dumps(payload, indent=2))
    outputs.write(out / "path.png", lambda tmp: plot_path(result, tmp, title="A -> B"))
    return outputs.commit()


def _print(result, barriers) -> None:
    print(f"{'alpha':>6}  {'loss':>10}  {'accuracy':>8}")
    for al, lo, ac in zip(result.alphas, result.loss, result.accuracy):
        print(f"{al:6.3f}  {lo:10.5f}  {ac:8.4f}")
    print()
    print(f"{'kind':<6} {'form':<9} {'relative':<8} {'value':>10} {'at alpha':>8}")
    for bar in barriers:
        print(f"{bar.kind:<6} {bar.form:<9} {str(bar.relative):<8} {bar.value:10.5f} {bar.alpha:8.3f}")
