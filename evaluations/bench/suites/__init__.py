"""Benchmark suites: built-in ones by name, user ones from a YAML or Python file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from taxonomy.errors import BasinError

BUILTIN = {"digits-tasks": "evaluations.bench.suites.digits_tasks",
           "minilm-tasks": "evaluations.bench.suites.minilm_tasks"}
DEFAULT_SEEDS = (0, 1, 2)  # built-in suites train their fine-tunes: each row is the mean over these


class BuiltinSuite:
    """`build(seed)` for `harness.run_seeds`: the built-in suite `name` trained with `seed` (picklable, so worker
    processes can build it)."""

    def __init__(self, name: str, cache_dir: str | Path | None = None):
        self.name, self.cache_dir = name, cache_dir

    def __call__(self, seed: int):
        return load_suite(self.name, cache_dir=self.cache_dir, seed=seed)


def load_suite(name_or_path: str, cache_dir: str | Path | None = None, **options: Any):
    """A built-in suite by name (`digits-tasks`, `minilm-tasks`; `seed=` picks the training seed), or a user suite
    from `*.yaml`/`*.yml` or `*.py`."""
    import importlib

    if name_or_path in BUILTIN:
        return importlib.import_module(BUILTIN[name_or_path]).build_suite(cache_dir=cache_dir, **options)
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        from evaluations.bench.suites.yaml_suite import suite_from_yaml

        return suite_from_yaml(path)
    if path.suffix == ".py":
        from evaluations.bench.suites.yaml_suite import suite_from_python

        return suite_from_python(path)
    raise BasinError(f"suite {name_or_path!r}: not a built-in suite ({sorted(BUILTIN)}) nor a .yaml/.py file")
