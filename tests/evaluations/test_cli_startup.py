"""Start-up: `basin --help` and every `basin <command> --help` import none of the heavy optional modules
(torch included: the help never needs it), and take well under 0.5 CPU seconds beyond the interpreter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from evaluations.cli import SUBCOMMANDS

HEAVY = ("torch", "transformers", "scipy", "matplotlib", "datasets", "optuna", "ray", "safetensors", "sklearn")
CODE = """
import contextlib, io, sys, time
t0 = time.process_time()
from evaluations.cli import main
for argv in [["--help"]] + [[name, "--help"] for name in sys.argv[1:]]:
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except SystemExit:
            pass
print(time.process_time() - t0, " ".join(sorted({m.split(".")[0] for m in sys.modules})))
"""


def test_help_of_every_command_imports_nothing_heavy():
    result = subprocess.run([sys.executable, "-c", CODE, *SUBCOMMANDS], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).parents[2])
    assert result.returncode == 0, result.stderr
    seconds, modules = result.stdout.strip().splitlines()[-1].split(" ", 1)
    loaded = sorted(set(modules.split()) & set(HEAVY))
    assert loaded == [], loaded
    assert float(seconds) < 0.5 * (1 + len(SUBCOMMANDS)) / 4, seconds  # all helps together, CPU seconds
