"""The `basin` command line: one thin subcommand module per job, imported only when used.

Each subcommand module defines `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`.
A `BasinError` (bad input) is printed without a traceback and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Modules are imported lazily so `basin merge` stays fast.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "merge": ("evaluations.cli.merge", "merge checkpoints as a YAML recipe says (mergekit schema)"),
    "methods": ("evaluations.cli.methods", "list merge methods with their taxonomy entries"),
    "align": ("evaluations.cli.align", "permute model B's hidden units to match model A"),
    "barrier": ("evaluations.cli.barrier", "loss and error barrier along the path between two models"),
    "landscape": ("evaluations.cli.landscape", "1D/2D loss-landscape slices around a model"),
    "hessian": ("evaluations.cli.hessian", "top Hessian eigenvalues, trace and spectral density"),
    "ntk": ("evaluations.cli.ntk", "empirical neural tangent kernel and kernel distances"),
    "bench": ("evaluations.cli.bench", "benchmark merge methods on a suite of tasks"),
    "demo": ("evaluations.cli.demo", "run the demo on embedded data (all-MiniLM-L6-v2, digits)"),
}


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: basin COMMAND [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines.append("\nrun `basin COMMAND --help` for a command's options")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from taxonomy.version import versions

        print(versions()["basin"])
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"basin: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_ = SUBCOMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            print(f"basin {name}: not available in this build", file=sys.stderr)
            return 2
        raise
    parser = argparse.ArgumentParser(prog=f"basin {name}", description=help_)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    from taxonomy.errors import BasinError

    _one_line_warnings(name)
    try:
        return int(module.run(args) or 0)
    except BasinError as err:
        print(f"basin {name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"basin {name}: interrupted", file=sys.stderr)
        return 130


def _one_line_warnings(command: str) -> None:
    """Print basin's warnings (ignored mergekit fields and the like) as one line each on stderr."""
    import warnings

    from taxonomy.errors import BasinWarning

    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        if issubclass(category, BasinWarning):
            print(f"basin {command}: warning: {message}", file=sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = show


if __name__ == "__main__":
    raise SystemExit(main())
