"""`basin bench`: run a benchmark suite, print the markdown table, write JSON, CSV and plots."""

from __future__ import annotations

import argparse

HELP = "benchmark merge methods on a suite of tasks"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", help="built-in suite name (digits-tasks) or a suite file (.yaml/.yml/.py)")
    parser.add_argument("--methods", nargs="+", help="only these grid entries (labels or method names)")
    parser.add_argument("--executor", choices=["local", "ray"], default="local", help="where cells run")
    parser.add_argument("--address", help="Ray cluster address for --executor ray (default: start a local one)")
    parser.add_argument("--out", default="bench-results", help="output folder (bench.md/.json/.csv/.png, cells/)")
    parser.add_argument("--cache", help="where built-in suites keep their trained models "
                        "(default ~/.cache/basin/<suite>)")
    parser.add_argument("--no-resume", action="store_true", help="recompute cells even if cached in OUT/cells")
    parser.add_argument("--no-plots", action="store_true", help="skip the bar plot")


def run(args: argparse.Namespace) -> int:
    import shutil
    import time
    from pathlib import Path

    from evaluations.bench import load_suite, run_benchmark
    from evaluations.bench.executors import make_executor
    from merging.outputs import check_files

    out = Path(args.out)
    cells = out / "cells"
    check_files([cells, *(out / f"bench.{ext}" for ext in ("md", "json", "csv", "png"))], [args.suite, args.cache])
    if args.no_resume and cells.exists():
        shutil.rmtree(cells)
    start = time.perf_counter()
    suite = load_suite(args.suite, cache_dir=args.cache)
    prepared = time.perf_counter() - start
    result = run_benchmark(suite, make_executor(args.executor, args.address), cache_dir=cells, methods=args.methods)
    result.environment["suite_seconds"] = prepared
    paths = result.save(out, stem="bench", plots=not args.no_plots)
    print(result.to_markdown())
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
