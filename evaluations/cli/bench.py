"""`basin bench`: run a benchmark suite, print the markdown table, write JSON, CSV and plots."""

from __future__ import annotations

import argparse

HELP = "benchmark merge methods on a suite of tasks"
STEM = "bench"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", nargs="?", help="built-in suite name (digits-tasks, minilm-tasks) or a suite file "
                        "(.yaml/.yml/.py; a YAML file of Hugging Face checkpoints and data files, see "
                        "evaluations.bench.suites.hf_suite)")
    parser.add_argument("--suite", dest="suite_file", metavar="SUITE", help="the same, as an option")
    parser.add_argument("--methods", nargs="+", help="only these grid entries (labels or method names)")
    parser.add_argument("--seeds", nargs="+", type=int, help="training seeds of a built-in suite: each row is the "
                        "mean and spread over them (default 0 1 2); a suite file's models are given, not trained")
    parser.add_argument("--executor", choices=["local", "ray"], default="local", help="where cells run")
    parser.add_argument("--workers", type=int, help="worker processes of the local executor for a built-in suite's "
                        "seeds: training and cells in parallel, one thread each, the same results (default: the "
                        "usable cores, at most one per seed's job)")
    parser.add_argument("--address", help="Ray cluster address for --executor ray (default: start a local one)")
    parser.add_argument("--out", default="bench-results", help="output folder (bench.md/.json/.csv/.png, cells/)")
    parser.add_argument("--cache", help="where built-in suites keep their trained models "
                        "(default ~/.cache/basin/<suite>)")
    parser.add_argument("--no-resume", action="store_true", help="recompute cells even if cached in OUT/cells")
    parser.add_argument("--no-plots", action="store_true", help="skip the bar plot")
    parser.add_argument("--overwrite", action="store_true", help="replace existing bench.* files in --out")


def run(args: argparse.Namespace) -> int:
    import shutil

    from evaluations.bench.executors import make_executor
    from evaluations.cli.outputs import Outputs
    from taxonomy.errors import BasinError

    if (args.suite is None) == (args.suite_file is None):
        raise BasinError("give one suite: a built-in name or a suite file, as SUITE or --suite SUITE")
    args.suite = args.suite or args.suite_file
    names = [f"{STEM}.{ext}" for ext in ("md", "json", "csv")] + ([] if args.no_plots else [f"{STEM}.png"])
    with Outputs(args.overwrite, inputs=[args.suite, args.cache]) as outputs:
        out = outputs.folder(args.out, names, "--out")
        cells = out / "cells"
        if cells.exists() and not cells.is_dir():
            from taxonomy.errors import BasinError

            raise BasinError(f"--out {out}: {cells} is not a folder")
        if args.no_resume and cells.exists():
            shutil.rmtree(cells)
        result = _run(args, cells, make_executor(args.executor, args.address, _workers(args)))
        paths = _save(outputs, out, result, plots=not args.no_plots)
    print(result.to_markdown())
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _workers(args: argparse.Namespace) -> int:
    """--workers, or the usable cores (for a built-in suite's seeds; one process otherwise)."""
    import os

    if args.workers is not None:
        return args.workers
    from evaluations.bench.suites import BUILTIN

    return len(os.sched_getaffinity(0)) if (args.suite in BUILTIN and args.executor == "local") else 1


def _run(args: argparse.Namespace, cells, executor):
    """The suite's result: over `--seeds` (default 0 1 2) for a built-in suite, once for a suite file."""
    import time

    from evaluations.bench import load_suite, run_benchmark
    from evaluations.bench.harness import run_seeds
    from evaluations.bench.suites import BUILTIN, DEFAULT_SEEDS, BuiltinSuite
    from taxonomy.errors import BasinError

    if args.suite in BUILTIN:
        seeds = args.seeds or list(DEFAULT_SEEDS)
        return run_seeds(BuiltinSuite(args.suite, cache_dir=args.cache), seeds, executor, cells, args.methods)
    if args.seeds:
        raise BasinError(f"--seeds: suite {args.suite!r} is a file whose models are given, not trained; its seed is "
                         "the file's `seed:` field")
    start = time.perf_counter()
    suite = load_suite(args.suite, cache_dir=args.cache)
    prepared = time.perf_counter() - start
    result = run_benchmark(suite, executor, cache_dir=cells, methods=args.methods)
    result.environment["suite_seconds"] = prepared
    return result


def _save(outputs, out, result, plots: bool) -> list:
    """`result.save` into a hidden folder inside `out`, then every file renamed into place."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from taxonomy.errors import BasinError

    try:
        out.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{STEM}.", suffix=".basin-tmp", dir=out))
    except OSError as err:
        raise BasinError(f"cannot write into {out}: {err.strerror or err}; nothing was written") from None
    try:
        try:
            saved = result.save(stage, stem=STEM, plots=plots)
        except OSError as err:
            raise BasinError(f"cannot write into {out}: {err.strerror or err}; nothing was written") from None
        for path in saved:
            outputs.write(out / path.name, lambda tmp, path=path: os.replace(path, tmp))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return outputs.commit()
