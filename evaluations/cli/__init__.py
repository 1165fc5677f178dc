"""The `basin` command line: one thin subcommand module per job, imported only when used.

Each subcommand module defines `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`.
Bad input (a `BasinError`, or a bad option, which argparse reports) is printed as one line without a
traceback and exits with status 2; Ctrl-C prints one line and exits with 130; output piped into a
reader that stops early (`basin methods | head -1`) ends quietly with 141 (128 + SIGPIPE, as a C tool).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help). Modules are imported lazily so `basin merge` stays fast.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "merge": ("evaluations.cli.merge", "merge checkpoints as a YAML recipe says (mergekit schema)"),
    "moe": ("evaluations.cli.moe", "build a mixture-of-experts model from dense models (mergekit-moe's YAML)"),
    "extract-lora": ("evaluations.cli.extract_lora", "extract a PEFT LoRA adapter from a fine-tune minus its base"),
    "tokensurgeon": ("evaluations.cli.tokensurgeon", "give a model a donor's tokenizer (new rows by OMP)"),
    "methods": ("evaluations.cli.methods", "list merge methods with their taxonomy entries"),
    "align": ("evaluations.cli.align", "permute model B's hidden units to match model A"),
    "barrier": ("evaluations.cli.barrier", "loss and error barrier along the path between two models"),
    "landscape": ("evaluations.cli.landscape", "1D/2D loss-landscape slices around a model"),
    "hessian": ("evaluations.cli.hessian", "top Hessian eigenvalues, trace and spectral density"),
    "ntk": ("evaluations.cli.ntk", "empirical neural tangent kernel and kernel distances"),
    "bench": ("evaluations.cli.bench", "benchmark merge methods on a suite of tasks"),
    "search": ("evaluations.cli.search", "tune a recipe's weights, densities and method with Optuna (local or Ray)"),
    "demo": ("evaluations.cli.demo", "run the demo on embedded data (all-MiniLM-L6-v2, digits)"),
}
EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 2, 130, 141


class UsageError(Exception):
    """A bad command line, already worded for the user."""


class Parser(argparse.ArgumentParser):
    """argparse, with its errors raised (and printed by `main` as one line) instead of usage + exit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: error: {message} (see `{self.prog} --help`)")


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: basin COMMAND [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines.append("\nrun `basin COMMAND --help` for a command's options")
    return "\n".join(lines)


def one_line(message: object) -> str:
    """`message` on one line (messages quoted from libraries, e.g. torch.load's, span several)."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from taxonomy.version import versions

        print(versions()["basin"])
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        raise UsageError(f"basin: error: unknown command {name!r}; choose from {', '.join(SUBCOMMANDS)}")
    module_name, help_ = SUBCOMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            raise UsageError(f"basin {name}: not available in this build") from None
        raise
    parser = Parser(prog=f"basin {name}", description=help_)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    from taxonomy.errors import BasinError

    _one_line_warnings(name)
    try:
        return int(module.run(args) or 0)
    except BasinError as err:
        raise UsageError(f"basin {name}: error: {one_line(err)}") from None


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit does not raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = f"basin {argv[0]}" if argv and argv[0] in SUBCOMMANDS else "basin"
    try:
        code = _dispatch(argv)
        sys.stdout.flush()
        return code
    except UsageError as err:
        print(err, file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE


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
