"""`basin search RECIPE OUT`: tune the recipe's `{search: ...}` values with Optuna (local or Ray), write the results."""

from __future__ import annotations

import argparse

HELP = "tune a recipe's weights, densities and method with Optuna (local or Ray)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a merge recipe with {search: [low, high]} or {search: [choices]} settings")
    parser.add_argument("out", help="output folder: study.db (resumed when rerun), best.yaml, trials.csv/.json, "
                        "search.json, search.png")
    parser.add_argument("--data", help="text (.txt) or JSONL/CSV file the loss objective is measured on")
    parser.add_argument("--objective", action="append", help="'loss' (default), 'suite' (default with --suite) or a "
                        "callable module:fn / file.py:fn taking the merged model (in memory) or its folder's path; "
                        "repeat for a Pareto front")
    parser.add_argument("--direction", action="append", choices=["minimize", "maximize"],
                        help="per --objective (default minimize; maximize for suite)")
    parser.add_argument("--suite", help="benchmark suite YAML (as basin bench --suite): the suite objective is its "
                        "average normalized accuracy on the validation splits; the recipe may name suite:base and "
                        "suite:TASK")
    parser.add_argument("--trials", type=int, default=50, help="completed trials the study should hold (default 50)")
    parser.add_argument("--sampler", default="tpe", help="tpe (default), cmaes, random or grid")
    parser.add_argument("--pruner", default="median", help="median (default: stop a trial whose partial loss is "
                        "worse than the median after a chunk of the data; loss objective, local or Ray) or none")
    parser.add_argument("--seed", type=int, default=0, help="sampler seed (the local executor's trials repeat)")
    parser.add_argument("--executor", choices=["local", "ray"], default="local", help="where trials run")
    parser.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers (actors), one CPU each (default 2)")
    parser.add_argument("--storage", help="Optuna storage URL (default sqlite:///OUT/study.db)")
    parser.add_argument("--study", help="study name in the storage (default: OUT's folder name)")
    parser.add_argument("--in-memory", choices=["auto", "always", "never"], default="auto",
                        help="merge each trial into the live model (auto: when the output matches and fits)")
    parser.add_argument("--scratch", help="folder for trials merged on disk (default: the system's temporary folder)")
    parser.add_argument("--write-best", metavar="MERGED", help="merge best.yaml into this folder at the end")
    parser.add_argument("--seq-len", type=int,
                        help="tokens per example (default 128, or the model's positions where it has fewer)")
    parser.add_argument("--max-examples", type=int, help="examples drawn from --data (default all)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per batch (default 8)")
    parser.add_argument("--device", default="cpu", help="merge and scoring device (default cpu)")
    parser.add_argument("--allow-pickle", action="store_true", help="read .bin/.pt inputs (weights_only)")
    parser.add_argument("--overwrite", action="store_true", help="start OUT's study again / replace --write-best")


def _objectives(args: argparse.Namespace):
    from evaluations.search import ObjectiveSpec
    from taxonomy.errors import BasinError

    names = args.objective or ["suite" if args.suite else "loss"]
    directions = args.direction or []
    if len(directions) > len(names):
        raise BasinError(f"--direction given {len(directions)} times for {len(names)} objective(s)")
    directions += ["maximize" if n == "suite" else "minimize" for n in names[len(directions):]]
    return tuple(ObjectiveSpec(n, d) for n, d in zip(names, directions))


def options(args: argparse.Namespace):
    from evaluations.search import DataSpec, SearchOptions

    data = None if args.data is None else DataSpec(args.data, args.seq_len, args.max_examples, args.batch_size,
                                                   args.seed)
    return SearchOptions(args.recipe, args.out, args.trials, _objectives(args), data, args.sampler, args.pruner,
                         args.seed, args.executor, args.address, args.workers, args.storage, args.study,
                         args.in_memory, args.device, args.allow_pickle, args.overwrite, args.scratch,
                         suite=args.suite)


def run(args: argparse.Namespace) -> int:
    from evaluations.cli.outputs import Outputs
    from evaluations.search import run_search
    from evaluations.search.report import FILES, best_trials, write

    opts = options(args)
    if args.write_best:
        from pathlib import Path

        from merging.io.guard import refuse_existing

        refuse_existing(Path(args.write_best), args.overwrite)
    written: list = []
    with Outputs(overwrite=True, inputs=[args.recipe, args.data, args.suite]) as outputs:
        out = outputs.folder(args.out, list(FILES), "OUT")

        def report(result) -> None:
            written.extend(write(outputs, out, result.study, result.space, result.names, result.extra))

        result = run_search(opts, on_done=report)
    best = best_trials(result.study)
    if result.stale:
        print(f"{result.stale} trial(s) left running by an interrupted run were marked failed and run again")
    if best:
        values = ", ".join(f"{n} {v:.6g}" for n, v in zip(result.names, best[0].values))
        print(f"best: trial {best[0].number}: {values}; {best[0].params}")
    suite = result.extra.get("suite")
    if suite:
        print(f"best on the suite's test splits: normalized accuracy {suite['test']['normalized_average']:.4f} "
              f"(validation {suite['val']['normalized_average']:.4f})")
    print("wrote " + ", ".join(str(p) for p in written))
    if args.write_best and best:
        from merging.pipeline import merge

        merge(out / "best.yaml", args.write_best, overwrite=args.overwrite, allow_pickle=args.allow_pickle,
              device=args.device)
        print(f"merged the best recipe into {args.write_best}")
    return 0
