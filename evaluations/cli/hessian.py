"""`basin hessian [MODEL]`: top or bottom eigenvalues (`--which`, `--k`; Lanczos), trace (`--trace hutchpp|xtrace`)
and spectral density of a curvature operator of a model's loss.

`--operator`: hessian (default), ggn, fisher (empirical) or mc_fisher (Monte-Carlo, `--samples`, `--seed`), on
the `--params` subset, optionally `--block-diagonal` (one block per module). Two models:

- MODEL, a transformers checkpoint (.safetensors folder or Hub id, config.json, tokenizer) with `--data calib.txt`:
  the text packed into `--seq-len` blocks with its tokenizer, the model's objective (causal LM: next-token
  cross-entropy over the predicted tokens; evaluations.model_losses);
- none: the digits MLP demo (`--widths`, trained `--epochs` with `--seed`, or `--state`; evaluations.cli.digits_mlp)
  on scikit-learn's digits (train split), cross-entropy.
"""

from __future__ import annotations

import argparse
import json

from evaluations.cli.args import float_range, int_range, positive_int
from evaluations.cli.digits_mlp import add_model_arguments, build_model

HELP = "top or bottom Hessian eigenvalues, trace and spectral density"
OPERATORS = ("hessian", "ggn", "fisher", "mc_fisher", "kfac", "ekfac")  # curvature_operator's names + KFAC
DTYPES = ("bfloat16", "float16", "float32", "float64")  # evaluations.models.DTYPES, without importing torch
WHICH = {"top": "LA", "bottom": "SA"}  # --which -> lanczos(which=)
TRACES = ("hutchpp", "xtrace")  # --trace: hutchinson_trace (Hutch++) or xtrace
__all__ = ["HELP", "add_arguments", "build_model", "run"]


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """MODEL and its text data (shared with `basin ntk`)."""
    parser.add_argument("model", nargs="?", help="a transformers checkpoint (folder, .safetensors or Hub id) with "
                        "--data calib.txt; default: the digits MLP demo")
    parser.add_argument("--data", help="with MODEL: a .txt file of calibration text")
    parser.add_argument("--seq-len", type=int_range(2),
                        help="tokens per text block (default 128, or the model's positions where it has fewer)")
    parser.add_argument("--max-examples", type=int_range(1), help="at most this many blocks (seeded draw)")
    parser.add_argument("--batch-size", type=int_range(1), default=8, help="blocks per batch (default 8)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="model dtype (default float32)")
    parser.add_argument("--device", default="cpu", help="torch device for the model (default cpu)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(parser)
    add_model_arguments(parser)
    parser.add_argument("--operator", choices=OPERATORS, default="hessian",
                        help="curvature: hessian, ggn (generalized Gauss-Newton), fisher (empirical), mc_fisher")
    parser.add_argument("--samples", type=positive_int, default=1, help="mc_fisher: targets drawn per row")
    parser.add_argument("--kfac-approx", choices=("expand", "reduce"), default="expand",
                        help="kfac / ekfac on weight-shared layers (tokens, feature-map locations): expand (every "
                             "position a row, default) or reduce (positions averaged / summed per example)")
    parser.add_argument("--block-diagonal", action="store_true", help="keep only the per-module diagonal blocks")
    parser.add_argument("--params", help="restrict to parameters matching this regular expression or name prefix "
                        "(e.g. '2', 'layers\\.1\\.')")
    parser.add_argument("-k", "--k", "--top-k", dest="k", type=positive_int, default=3,
                        help="how many eigenvalues (default 3)")
    parser.add_argument("--which", choices=WHICH, default="top",
                        help="top: the largest eigenvalues (default); bottom: the smallest (algebraic)")
    parser.add_argument("--tol", type=float_range(0, 1, lo_open=True), default=1e-3,
                        help="relative eigenvalue tolerance, in (0, 1] (default 1e-3)")
    parser.add_argument("--mode", choices=("eval", "train"), default="eval",
                        help="network mode of the Hessian: eval (BatchNorm running statistics) or train (BatchNorm "
                             "batch statistics, running statistics untouched); Dropout off in both")
    parser.add_argument("--trace", nargs="?", choices=TRACES, const="hutchpp",
                        help="also estimate the trace: hutchpp (Hutch++, adaptive to a 5%% standard error; the "
                             "default) or xtrace (XTrace, a fixed --trace-products budget)")
    parser.add_argument("--trace-products", type=int_range(4), default=40,
                        help="xtrace: operator products to spend (default 40)")
    parser.add_argument("--density", help="also write the SLQ density plot to this PNG")
    parser.add_argument("--json", help="write results to this JSON file")
    parser.add_argument("--overwrite", action="store_true", help="replace existing --json / --density files")


def load_checkpoint_task(args: argparse.Namespace):
    """(model, objective, batches, summary line) of MODEL and --data (evaluations.models, text_data, model_losses)."""
    from pathlib import Path

    from evaluations.model_losses import objective_for
    from evaluations.models import load_model
    from evaluations.text_data import load_data
    from taxonomy.errors import DataError

    if args.data is None or not Path(args.data).is_file():
        raise DataError(f"--data {args.data}: MODEL needs a text file of calibration text (--data calib.txt)")
    model = load_model(args.model, dtype=args.dtype, device=args.device, allow_pickle=args.allow_pickle)
    objective = objective_for(model)
    batches = load_data(model, args.data, seq_len=args.seq_len, max_examples=args.max_examples,
                             batch_size=args.batch_size, seed=args.seed)
    examples = sum(len(b["input_ids"]) for b in batches)
    rows = objective.rows(batches)
    line = (f"model {type(model).__name__} ({args.dtype}, {args.device}); objective: {objective.name}; "
            f"{examples} examples of {batches.seq_len} tokens, {rows} {objective.unit}")
    return model, objective, batches, line


def _operator(args: argparse.Namespace):
    """(operator, summary line) for MODEL + --data, or the digits MLP."""
    from torch import nn

    from evaluations.probes import BlockDiagonal, curvature_operator

    if args.model is not None:
        model, loss, data, line = load_checkpoint_task(args)
    else:
        model, digits = build_model(args)
        loss, data = nn.CrossEntropyLoss(), digits.train
        line = f"model digits MLP {args.widths}; objective: cross-entropy; {len(data[0])} examples"
    if args.operator in ("kfac", "ekfac"):  # block-diagonal per layer by construction
        return _kfac(args, model, loss, data), None, line
    options = {"mode": args.mode}
    if args.operator == "mc_fisher":
        options.update(samples=args.samples, seed=args.seed)
    op = curvature_operator(args.operator, model, loss, data, params=args.params, **options)
    return (BlockDiagonal(op) if args.block_diagonal else op), op, line


def _kfac(args: argparse.Namespace, model, loss, data):
    """KFAC / EKFAC (type-2) of the checkpoint's objective, or of the digits MLP's cross-entropy."""
    from evaluations.objective import Objective, supervised
    from evaluations.probes import KFACOperator

    objective = loss if isinstance(loss, Objective) else supervised("cross_entropy")
    return KFACOperator(model, objective, data, params=args.params, kind=args.operator, seed=args.seed,
                        kfac_approx=args.kfac_approx)


def run(args: argparse.Namespace) -> int:
    from evaluations.cli.outputs import Outputs
    from evaluations.probes import hutchinson_trace, lanczos, spectral_density, xtrace

    with Outputs(args.overwrite, inputs=[args.state, args.model]) as outputs:
        density_png = outputs.file(args.density, "--density") if args.density else None
        json_path = outputs.file(args.json, "--json") if args.json else None
        op, base, line = _operator(args)
        base = op if base is None else base
        print(line)
        eig = lanczos(op, k=args.k, tol=args.tol, which=WHICH[args.which])
        blocks = f", {len(op.blocks)} diagonal blocks" if args.block_diagonal else ""
        rows = getattr(base, "n_examples", None)
        out = {"operator": args.operator, "params": base.size, "names": base.names, "rows": rows,
               "block_diagonal": args.block_diagonal, "mode": base.mode, "which": args.which,
               "kfac_approx": getattr(base, "kfac_approx", None), "eigen": eig.to_json()}
        print(f"{args.operator}: {base.size} parameters ({len(base.names)} tensors{blocks}), {base.mode} mode; "
              f"{args.which}-{len(eig.values)} eigenvalues (converged={eig.converged}, {eig.iterations} products):")
        for v, r in zip(eig.values, eig.residuals):
            print(f"  {float(v):.6g}  (residual {float(r):.2g})")
        if args.trace:
            est = xtrace(op, matvecs=args.trace_products) if args.trace == "xtrace" else hutchinson_trace(op)
            out["trace"] = {"method": args.trace, **est.to_json()}
            print(f"trace ({args.trace}) {est.mean:.6g} +- {est.stderr:.2g} ({est.products} products, "
                  f"converged={est.converged})")
        if density_png is not None:
            dens = spectral_density(op)
            outputs.write(density_png, dens.plot)
            out["density"] = {"converged": dens.converged, "iterations": dens.iterations,
                              "moment_stderr": dens.moment_stderr, "mode": dens.mode}
            print(f"density written to {args.density} (converged={dens.converged}, {dens.iterations} products)")
        if json_path is not None:
            outputs.write_text(json_path, json.dumps(out, indent=2))
        outputs.commit()
    return 0
