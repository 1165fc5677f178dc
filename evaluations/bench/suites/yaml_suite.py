"""User suites from a YAML file or a Python file (`suite()` or `SUITE`).

A YAML file whose `tasks` is a list of {name, model, data, metric} is a suite of Hugging Face checkpoints and data
files (`evaluations.bench.suites.hf_suite`). The other YAML schema (a `body` factory, models and data as
safetensors), paths relative to the file:

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

Every field is checked when the suite is loaded, before any training or merging: a malformed one is a
one-line `BasinError` naming the file and the field (`tasks.task_a.head`, `methods[1].search.lambda`).
Data and weights are safetensors only (read by `merging.io.checkpoint.open_path`; no pickle). `body`, and a
`method` written `module:fn`, name code the user chose to run (see `evaluations.factories`); a `.py`
suite file is executed likewise.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evaluations.bench.grid import MethodEntry, MethodGrid
from evaluations.bench.harness import Suite
from evaluations.bench.pools import ModelPool, Task, TaskPool, load_state
from merging.objects import exec_file, load_object
from taxonomy.errors import BasinError

FIELDS = ("name", "seed", "body", "base", "models", "tasks", "methods")
REQUIRED = ("body", "base", "models", "tasks", "methods")
TASK_FIELDS = ("data", "head")
METHOD_FIELDS = ("label", "method", "params", "search")
SPLITS = ("test", "val", "train")


def import_object(ref: Any, where: str) -> Any:
    """The object named by `ref` ('package.module:name' or 'file.py:name'); errors start with `where`."""
    if not isinstance(ref, str):
        raise BasinError(f"{where}: expected 'package.module:name', got {ref!r}")
    return load_object(ref, f"{where}: {ref!r}", files=True)


def _unknown(found: Any, known: tuple[str, ...], where: str) -> None:
    for key in found:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known: {list(known)}"
            raise BasinError(f"{where}: unknown field {key!r}{hint}")


def _mapping(value: Any, where: str, empty: bool = True) -> dict:
    if not isinstance(value, dict) or (not empty and not value):
        kind = "a mapping" if empty else "a non-empty mapping"
        raise BasinError(f"{where}: must be {kind}, got {value!r}")
    return value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise BasinError(f"{where}: must be a non-empty string, got {value!r}")
    return value


def _plain_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_value(value: Any, where: str) -> None:
    """Hyperparameter values are numbers (finite), strings, booleans, null, or lists / mappings of those."""
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_value(v, f"{where}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_value(v, f"{where}.{k}")
    elif _plain_number(value) and not math.isfinite(value):
        raise BasinError(f"{where}: must be finite, got {value!r}")
    elif not (_plain_number(value) or isinstance(value, (str, bool)) or value is None):
        raise BasinError(f"{where}: unsupported value {value!r}")


def _method_name(method: Any, where: str) -> Any:
    """A registered tensorwise or model-level method name, or a `module:fn` callable."""
    from merging.modelwise.catalog import MODEL_LEVEL

    method = _text(method, where)
    if ":" in method:
        fn = import_object(method, where)
        if not callable(fn):
            raise BasinError(f"{where}: {method!r} is not callable")
        return fn
    if method not in MODEL_LEVEL and method != "weight_matching":
        from merging.methods.catalog import get_method

        try:
            get_method(method)
        except BasinError as err:
            raise BasinError(f"{where}: {err}") from None
    return method


def _entry(item: Any, where: str) -> MethodEntry:
    if not isinstance(item, dict) or "method" not in item:
        raise BasinError(f"{where}: needs a 'method' field")
    _unknown(item, METHOD_FIELDS, where)
    method = _method_name(item["method"], f"{where}.method")
    label = _text(item["label"], f"{where}.label") if "label" in item else str(item["method"])
    params = _mapping(item.get("params") or {}, f"{where}.params")
    search = _mapping(item.get("search") or {}, f"{where}.search")
    _check_value(params, f"{where}.params")
    for key, values in search.items():
        if not isinstance(values, list) or not values:
            raise BasinError(f"{where}.search.{key}: must be a non-empty list of values, got {values!r}")
        _check_value(values, f"{where}.search.{key}")
    return MethodEntry(label, method, dict(params), {k: list(v) for k, v in search.items()})


def grid_from_list(items: Any, where: str) -> MethodGrid:
    if not isinstance(items, list) or not items:
        raise BasinError(f"{where}: 'methods' must be a non-empty list")
    entries = [_entry(item, f"{where}: methods[{i}]") for i, item in enumerate(items)]
    labels = [e.label for e in entries]
    for i, label in enumerate(labels):
        if label in labels[:i]:
            raise BasinError(f"{where}: methods[{i}].label {label!r} is used twice")
    return MethodGrid(tuple(entries))


def _file(root: Path, value: Any, where: str) -> Path:
    path = root / _text(value, where)
    if not path.is_file():
        raise BasinError(f"{where}: no such file {path}")
    return path


def _linear_head(path: Path, where: str) -> nn.Linear:
    state = load_state(path)
    extra = sorted(set(state) - {"weight", "bias"})
    weight = state.get("weight")
    if weight is None or weight.dim() != 2 or extra:
        raise BasinError(f"{where}: {path}: a head file holds a 2-D 'weight' and optionally a 'bias', nothing else")
    out_f, in_f = weight.shape
    bias = state.get("bias")
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise BasinError(f"{where}: {path}: 'bias' has shape {tuple(bias.shape)}, expected ({out_f},)")
    head = nn.Linear(in_f, out_f, bias=bias is not None)
    head.load_state_dict({k: v.float() for k, v in state.items()})
    return head.eval()


def _pairs(data: dict[str, torch.Tensor], where: str) -> dict[str, tuple[torch.Tensor, torch.Tensor] | None]:
    """The (x, y) pair of each split present in a task's data file; x_test and y_test are required."""
    extra = sorted(set(data) - {f"{a}_{s}" for a in "xy" for s in SPLITS})
    if extra:
        raise BasinError(f"{where}: unexpected tensor {extra[0]!r} (expected x_/y_ test, val, train)")
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {}
    for split in SPLITS:
        x, y = data.get(f"x_{split}"), data.get(f"y_{split}")
        if (x is None) != (y is None) or (x is None and split == "test"):
            raise BasinError(f"{where}: needs both tensors x_{split} and y_{split}")
        if x is not None and (x.dim() == 0 or len(x) != len(y) or len(x) == 0):
            raise BasinError(f"{where}: x_{split} has shape {tuple(x.shape)} but y_{split} {tuple(y.shape)}; "
                             "need the same number (> 0) of rows")
        pairs[split] = None if x is None else (x, y)
    return pairs


def _task(name: str, spec: Any, root: Path, where: str) -> Task:
    spec = _mapping(spec, where)
    if "data" not in spec:
        raise BasinError(f"{where}: needs a 'data' file")
    _unknown(spec, TASK_FIELDS, where)
    data_file = _file(root, spec["data"], f"{where}.data")
    pairs = _pairs(load_state(data_file), f"{where}.data: {data_file}")
    head = _linear_head(_file(root, spec["head"], f"{where}.head"), f"{where}.head") if spec.get("head") else None
    return Task(str(name), pairs["test"], pairs["val"], pairs["train"], head)


def _check_task_runs(pool: ModelPool, task: Task, where: str) -> None:
    """Evaluate the base body (and head) on two test rows: data of the wrong width is an error naming the task."""
    x, y = task.test
    try:
        with torch.no_grad():
            out = task.model(pool.module(pool.base))(x[:2])
        if out.dim() != 2:
            raise ValueError(f"outputs have shape {tuple(out.shape)}, expected [rows, classes]")
        if not y.is_floating_point() and (int(y.min()) < 0 or int(y.max()) >= out.shape[-1]):
            raise ValueError(f"{out.shape[-1]} outputs do not fit labels in [{int(y.min())}, {int(y.max())}]")
    except (RuntimeError, ValueError, IndexError, TypeError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise BasinError(f"{where}: the body and head cannot be evaluated on x_test {tuple(x.shape)} "
                         f"{x.dtype}: {reason}") from None


def _read(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise BasinError(f"{path}: no such suite file")
    try:
        doc = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise BasinError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    doc = {} if doc is None else doc
    if not isinstance(doc, dict):
        raise BasinError(f"{path}: the suite must be a YAML mapping, got a {type(doc).__name__}")
    return doc


def _body_factory(ref: Any, where: str) -> Any:
    import inspect

    build = import_object(ref, f"{where}: body")
    try:
        inspect.signature(build).bind()
    except TypeError:
        raise BasinError(f"{where}: body: {ref!r} is not a callable taking no arguments") from None
    except ValueError:  # a builtin without a signature: called as is
        pass
    return build


def _pool(doc: dict, root: Path, where: str) -> ModelPool:
    build = _body_factory(doc["body"], where)
    models = _mapping(doc["models"], f"{where}: models", empty=False)
    base_file = _file(root, doc["base"], f"{where}: base")
    base = load_state(base_file)
    body = build()
    if not isinstance(body, nn.Module):
        raise BasinError(f"{where}: body: {doc['body']!r} does not return an nn.Module")
    try:
        body.load_state_dict(base)
    except RuntimeError as err:
        raise BasinError(f"{where}: base: {base_file} does not fit the body ({str(err).splitlines()[0]})") from None
    states = {str(k): load_state(_file(root, v, f"{where}: models.{k}")) for k, v in models.items()}
    for key, state in states.items():
        if set(state) != set(base):
            diff = sorted(set(state) ^ set(base))[:3]
            raise BasinError(f"{where}: models.{key}: tensor names differ from the base's: {diff}")
        for name, t in state.items():
            if t.shape != base[name].shape:
                raise BasinError(f"{where}: models.{key}: tensor {name!r} has shape {tuple(t.shape)}, the base's "
                                 f"{tuple(base[name].shape)}")
    return ModelPool(base, states, build)


def suite_from_yaml(path: str | Path) -> Suite:
    path = Path(path)
    doc = _read(path)
    from evaluations.bench.suites.hf_suite import is_hf_suite, suite_from_doc

    if is_hf_suite(doc):
        return suite_from_doc(doc, path)
    for key in REQUIRED:
        if key not in doc:
            raise BasinError(f"{path}: missing field {key!r}")
    _unknown(doc, FIELDS, str(path))
    name = _text(doc.get("name", path.stem), f"{path}: name")
    seed = doc.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise BasinError(f"{path}: seed must be an integer in [0, 2**63), got {seed!r}")
    methods = grid_from_list(doc["methods"], str(path))
    tasks_doc = _mapping(doc["tasks"], f"{path}: tasks", empty=False)
    pool = _pool(doc, path.parent, str(path))
    tasks = [_task(str(k), v, path.parent, f"{path}: tasks.{k}") for k, v in tasks_doc.items()]
    for task in tasks:
        _check_task_runs(pool, task, f"{path}: tasks.{task.name}")
    return Suite(name, pool, TaskPool(tasks), methods, seed=seed)


def suite_from_python(path: str | Path) -> Suite:
    path = Path(path)
    if not path.is_file():
        raise BasinError(f"{path}: no such suite file")
    module = exec_file(path, name=f"basin_user_suite_{path.stem}")
    suite = module.suite() if hasattr(module, "suite") else getattr(module, "SUITE", None)
    if not isinstance(suite, Suite):
        raise BasinError(f"{path}: define suite() returning an evaluations.bench.Suite, or SUITE")
    return suite
