"""User suites from a YAML file (models and data as safetensors) or a Python file (`suite()` or `SUITE`).

YAML schema (paths relative to the file):

    name: my-suite
    seed: 0
    body: mypackage.models:make_body      # callable () -> nn.Module for the merged part
    base: base.safetensors
    models: {task_a: a.safetensors, task_b: b.safetensors}
    tasks:
      task_a:
        data: task_a.safetensors          # tensors x_test, y_test [, x_val, y_val, x_train, y_train]
        head: head_a.safetensors          # optional: a Linear head (weight [classes, features], bias)
    methods:
      - {label: average, method: linear}
      - {label: TA, method: task_arithmetic, search: {lambda: [0.5, 1.0]}}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from evaluations.bench.grid import MethodEntry, MethodGrid
from evaluations.bench.harness import Suite
from evaluations.bench.pools import ModelPool, Task, TaskPool, load_state
from merging.objects import exec_file, load_object
from taxonomy.errors import BasinError


def grid_from_list(items: Any, where: str) -> MethodGrid:
    if not isinstance(items, list) or not items:
        raise BasinError(f"{where}: 'methods' must be a non-empty list")
    entries = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "method" not in item:
            raise BasinError(f"{where}: methods[{i}] needs a 'method' field")
        unknown = set(item) - {"label", "method", "params", "search"}
        if unknown:
            raise BasinError(f"{where}: methods[{i}] has unknown fields {sorted(unknown)}")
        method = item["method"]
        if ":" in str(method):
            method = load_object(method, f"{where}: methods[{i}].method")
        entries.append(MethodEntry(str(item.get("label", item["method"])), method, dict(item.get("params") or {}),
                                   {k: list(v) for k, v in (item.get("search") or {}).items()}))
    return MethodGrid(tuple(entries))


def _linear_head(path: Path) -> nn.Linear:
    state = load_state(path)
    if "weight" not in state or state["weight"].dim() != 2:
        raise BasinError(f"{path}: a head file needs a 2-D 'weight' (and optionally 'bias')")
    out_f, in_f = state["weight"].shape
    head = nn.Linear(in_f, out_f, bias="bias" in state)
    head.load_state_dict(state)
    return head.eval()


def suite_from_yaml(path: str | Path) -> Suite:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise BasinError(f"{path}: no such suite file")
    doc = yaml.safe_load(path.read_text()) or {}
    for key in ("body", "base", "models", "tasks", "methods"):
        if key not in doc:
            raise BasinError(f"{path}: missing field {key!r}")
    root = path.parent
    build = load_object(str(doc["body"]), f"{path}: body")
    pool = ModelPool.from_safetensors(root / doc["base"], {k: root / v for k, v in doc["models"].items()}, build)
    tasks = []
    for name, spec in doc["tasks"].items():
        if not isinstance(spec, dict) or "data" not in spec:
            raise BasinError(f"{path}: tasks.{name} needs a 'data' file")
        data = load_state(root / spec["data"])
        if "x_test" not in data or "y_test" not in data:
            raise BasinError(f"{root / spec['data']}: needs tensors x_test and y_test")

        def pair(split: str, data=data):
            return (data[f"x_{split}"], data[f"y_{split}"]) if f"x_{split}" in data else None

        head = _linear_head(root / spec["head"]) if spec.get("head") else None
        tasks.append(Task(str(name), pair("test"), pair("val"), pair("train"), head))
    return Suite(str(doc.get("name", path.stem)), pool, TaskPool(tasks), grid_from_list(doc["methods"], str(path)),
                 seed=int(doc.get("seed", 0)))


def suite_from_python(path: str | Path) -> Suite:
    path = Path(path)
    module = exec_file(path, f"basin_user_suite_{path.stem}")
    suite = module.suite() if hasattr(module, "suite") else getattr(module, "SUITE", None)
    if not isinstance(suite, Suite):
        raise BasinError(f"{path}: define suite() returning an evaluations.bench.Suite, or SUITE")
    return suite
