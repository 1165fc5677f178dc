"""`basin merge RECIPE OUT_DIR`: a thin layer over `merging.merge` (imports no transformers unless measuring).

With `--measure DATA` (or a `measure:` block naming `data` in the recipe) the merge is measured: the checks of
`evaluations.merge_report.prepare` run before the merge, the data-free statistics (`merging.merge_stats`) are gathered
while it streams, and `evaluations.merge_report` writes measure.json, measure_paths.png and the card's section after it.
"""

from __future__ import annotations

import argparse
import json
from contextlib import nullcontext

from evaluations.cli.args import int_range
from evaluations.cli.output_args import add_output_arguments, out_dir

HELP = "merge checkpoints as a YAML recipe says (mergekit schema)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="YAML recipe (mergekit schema)")
    add_output_arguments(parser, dry_run_help="validate inputs and print the per-tensor plan",
                         json_help="print the report (or plan) as JSON",
                         device_help="compute device: cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="output dtype")
    parser.add_argument("--compute-dtype", choices=["float32", "float16", "bfloat16"],
                        help="arithmetic dtype: float32 (default, most precise) or float16/bfloat16 to reproduce "
                             "mergekit's low-precision merge bit for bit (linear, task_arithmetic, ties, slerp)")
    parser.add_argument("--no-resume", action="store_true",
                        help="start afresh even if an interrupted run of the same merge left partial output")
    parser.add_argument("--allow-mixed-architectures", action="store_true",
                        help="merge inputs whose config.json architectures / model_type differ (refused otherwise)")
    parser.add_argument("--measure", metavar="DATA", help="after the merge, measure inputs and output on this .txt "
                        "file: losses, paths to the merge, pairwise barriers, data-free task-vector statistics "
                        "(measure.json, the card's Measurements section); overrides the recipe's measure: block")
    parser.add_argument("--measure-points", type=int_range(2), help="points on each path (default 11)")
    parser.add_argument("--measure-hessian", action="store_true", help="also the top Hessian eigenvalue per model")
    parser.add_argument("--measure-params", metavar="REGEX", help="parameters of the Hessian (default: all)")
    parser.add_argument("--measure-seq-len", type=int_range(2),
                        help="tokens per text block (default 128, or the model's positions where it has fewer)")
    parser.add_argument("--measure-max-examples", type=int_range(1), help="at most this many blocks (seeded draw)")
    parser.add_argument("--intermediate-dir", help="multi-stage recipe (several '---' documents): where named stages "
                                                   "are written (default: OUT.stages beside OUT)")
    parser.add_argument("--stage", help="multi-stage recipe: write this stage (and run what it needs) to OUT_DIR")


def _measure_session(args: argparse.Namespace):
    """The measurement's session (`evaluations.merge_report.prepare`: every check before the merge), or None."""
    from merging.pipeline import load_recipe

    overrides = {"data": args.measure, "points": args.measure_points, "params": args.measure_params,
                 "seq_len": args.measure_seq_len, "max_examples": args.measure_max_examples}
    asked = any(v is not None for v in overrides.values()) or args.measure_hessian
    recipe = load_recipe(args.recipe)  # no I/O beyond the recipe file; the merge parses it again
    if recipe.measure is None and not asked:
        return None
    from evaluations.merge_report import MeasureSpec, prepare

    spec = MeasureSpec.resolve(recipe.measure, hessian=args.measure_hessian, **overrides)
    return None if spec is None else prepare(recipe, spec, device=args.device, allow_pickle=args.allow_pickle)


def run(args: argparse.Namespace) -> int:
    from merging.pipeline import merge
    from taxonomy.errors import BasinError

    out_dir(args)
    from merging.recipe.stages import is_multi_stage

    if is_multi_stage(args.recipe):
        return _run_stages(args)
    if args.stage or args.intermediate_dir:
        raise BasinError(f"{args.recipe}: --stage and --intermediate-dir are for multi-stage recipes (several "
                         "YAML documents separated by '---'); this file holds one recipe")
    session = _measure_session(args)
    stats = None if session is None or args.dry_run else _merge_stats(session)
    with _observing(stats):
        report = merge(args.recipe, args.out_dir, overwrite=args.overwrite, device=args.device,
                       shard_size=args.shard_size, dtype=args.dtype, allow_pickle=args.allow_pickle,
                       dry_run=args.dry_run, progress=not args.no_progress, resume=not args.no_resume,
                       allow_mixed_architectures=args.allow_mixed_architectures, compute_dtype=args.compute_dtype)
    if args.dry_run:
        _print_plan(args, report)
        return 0
    measured = None
    if session is not None:
        from evaluations.merge_report import measure, write_report

        measured, _ = write_report(measure(session, report.out_dir, stats), report.out_dir)
    _print_report(args, report, measured)
    return 0


def _merge_stats(session):
    from merging.merge_stats import MergeStats

    return MergeStats(base_ref=session.base_ref)


def _observing(stats):
    """Inside: the engine hands each tensor's inputs to `stats` (nothing is gathered without it)."""
    if stats is None:
        return nullcontext()
    from merging.engine import observing

    return observing(stats.observe)


def _print_plan(args: argparse.Namespace, report) -> None:
    points = report.sweep or [{"folder": None, "values": {}, "plan": report.plan}]
    if args.json:
        print(json.dumps([{"folder": p["folder"], "values": p["values"], "plan": p["plan"].to_json()}
                          for p in points] if report.sweep else report.plan.to_json(), indent=2))
        return
    for p in points:
        if p["folder"]:
            print(f"== sweep point {p['folder']}: {p['values']}")
        print(p["plan"].table())


def _print_report(args: argparse.Namespace, report, measured) -> None:
    if args.json:
        print(json.dumps(report.to_json() | ({"measure": measured.to_json()} if measured else {}), indent=2))
    else:
        mb = report.bytes_written / 1e6
        print(f"merged {report.tensors} tensors ({mb:.1f} MB, {len(report.shards)} shard(s)) with {report.method} "
              f"into {report.out_dir} in {report.seconds:.2f} s; peak RSS {report.peak_rss_mb:.0f} MB")
        for point in report.sweep or []:
            print(f"  {point['folder']}: {point['values']} (content hash {point['content_hash'][:16]})")
        for note in report.notes:
            print(f"note: {note}")
        if report.resumed_tensors:
            print(f"resumed: {report.resumed_tensors} tensors kept from an interrupted run")
        print(f"content hash {report.content_hash}")
        if measured is not None:
            _print_measured(measured)


def _run_stages(args: argparse.Namespace) -> int:
    """A multi-stage recipe: `merging.multistage.merge_stages`, one line per stage."""
    from merging.multistage import merge_stages

    report = merge_stages(args.recipe, args.out_dir, intermediate_dir=args.intermediate_dir, stage=args.stage,
                          overwrite=args.overwrite, dry_run=args.dry_run, device=args.device,
                          shard_size=args.shard_size, dtype=args.dtype, allow_pickle=args.allow_pickle,
                          progress=not args.no_progress, resume=not args.no_resume,
                          allow_mixed_architectures=args.allow_mixed_architectures, compute_dtype=args.compute_dtype)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0
    for s in report.stages:
        state = "would run" if report.out_dir is None or args.dry_run else ("merged" if s["ran"] else "up to date")
        after = f" (after {', '.join(s['depends'])})" if s["depends"] else ""
        print(f"stage {s['name']}: {state} -> {s['folder']}{after}")
    if not args.dry_run:
        print(f"{len(report.ran)} of {len(report.stages)} stage(s) merged; output {report.out_dir}")
    return 0


def _print_measured(measured) -> None:
    for model, r in measured.losses.items():
        ppl = "-" if r["perplexity"] is None else f"{r['perplexity']:.4f}"
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
        print(f"  loss {r['loss']:.5f}  perplexity {ppl}  accuracy {acc}  {model}")
    for b in measured.barriers:
        print(f"  loss barrier {b['loss_barrier']['value']:.5f} (alpha {b['loss_barrier']['alpha']:.2f})  "
              f"{b['a']} <-> {b['b']}")
    for h in measured.hessian:
        print(f"  top Hessian eigenvalue {h['top_eigenvalue']:.6g} (converged={h['converged']})  {h['model']}")
    print("measured: measure.json" + (", measure_paths.png" if measured.plot else "") + ", README.md section")
