"""User suites on Hugging Face checkpoints: a model pool of transformers checkpoints and a task pool of data files.

The FusionBench layout (Tang et al. 2024): a base, one fine-tuned checkpoint per task, each task's data, a method
list. Paths are relative to the suite file; a model is any reference basin merge accepts (a folder, `org/name@rev`
from the Hub cache, `base+adapter`), loaded by `evaluations.models.load_model`; data files are read with each
task's own tokenizer by `evaluations.text_data.load_data` (`text` and `label` columns, jsonl/csv/parquet):

    name: my-suite
    base: org/base@rev                    # or a folder
    tasks:
      - name: sst
        model: ./ft-sst
        data: {validation: val.jsonl, test: test.jsonl, train: train.csv}   # train: for Fisher / RegMean
        metric: accuracy
    seq_len: 128                          # optional: tokens per row (default 128, or the model's positions)
    methods: [task_arithmetic, ties]      # or {label, method, params, search} entries; default: data-free ones

The merged part (the "body") is the tensors of the checkpoint's transformers base model (`model.base_model`,
e.g. `BertModel` inside `BertForSequenceClassification`); each task keeps its own fine-tune's remaining tensors
(the classification head) as its head, as FusionBench does for task-specific heads. Every task must be the same
class with the same body tensors (names and shapes) as the base's base model.

RegMean (alpha 0.9) solves its per-layer least squares exactly, but where a pool's Gram matrices are ill-conditioned
it can put large weights in input directions the data barely spans. On the tests' tiny random-init BERT pool
(hidden 16; Gram eigenvalues from 1e-13 to 5e3) this collapses the model to one predicted class, so its accuracy equals
the pretrained model's, which also predicts one class. Its per-layer objective is below the simple average's
(147 vs 3,329 on layer 0's query), and alpha 0 recovers 100%. Search alpha on the validation split for such pools.

Metrics: `accuracy` (sequence classifiers). A causal LM's next-token `loss` is not a bench metric yet (the
bench's rows are higher-is-better scores normalized by the fine-tune's): it is refused with a one-line error.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evaluations.bench.grid import MethodEntry, MethodGrid
from evaluations.bench.harness import Suite
from evaluations.bench.pools import ModelPool, Task, TaskPool
from taxonomy.errors import BasinError

FIELDS = ("name", "seed", "base", "tasks", "methods", "seq_len")
TASK_FIELDS = ("name", "model", "data", "metric")
SPLITS = {"test": "test", "validation": "val", "train": "train"}
METRICS = ("accuracy", "loss")
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def is_hf_suite(doc: dict) -> bool:
    """The checkpoint schema (tasks a list of {name, model, data}) rather than the safetensors-body one."""
    return isinstance(doc.get("tasks"), list) or not ({"body", "models"} & set(doc))


class EncodedBody(nn.Module):
    """A transformers base model taking one tensor `x` [n, k, L]: input_ids, attention_mask (, token_type_ids)
    stacked on dim 1; returns `(x, outputs)` for the task's head."""

    def __init__(self, base_model: nn.Module, keys: tuple[str, ...]) -> None:
        super().__init__()
        self.model = base_model
        self.keys = keys

    def forward(self, x: torch.Tensor):
        return x, self.model(**{k: x[:, i] for i, k in enumerate(self.keys)})


class _Given(nn.Module):
    """Stands in for the base model inside a task's full model: returns the body's outputs already computed."""

    def forward(self, *args, **kwargs):
        return self.outputs


class TaskHead(nn.Module):
    """The task's fine-tuned model with its base model replaced by the body's outputs: (x, outputs) -> logits.
    Its parameters are the fine-tune's tensors outside the body (e.g. `classifier.*`)."""

    def __init__(self, model: nn.Module, keys: tuple[str, ...]) -> None:
        super().__init__()
        setattr(model, model.base_model_prefix, _Given())
        self.model = model
        self.keys = keys

    def forward(self, xo):
        x, outputs = xo
        getattr(self.model, self.model.base_model_prefix).outputs = outputs
        return self.model(**{k: x[:, i] for i, k in enumerate(self.keys)}).logits


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise BasinError(message)


def _reference(root: Path, ref: Any, where: str) -> str:
    """A model reference with local parts resolved against the suite file's folder."""
    _check(isinstance(ref, str) and bool(ref), f"{where}: must be a model reference (folder, org/name@rev, "
           f"base+adapter), got {ref!r}")
    parts = [str(root / p) if (root / p).exists() else p for p in ref.split("+")]
    return "+".join(parts)


def _load(ref: str, where: str) -> nn.Module:
    from evaluations.models import load_model

    try:
        return load_model(ref)
    except BasinError as err:
        raise BasinError(f"{where}: {err}") from None


def _body_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's tensors, named as in `EncodedBody` (`model.<name>`)."""
    return {f"model.{k}": v.detach().clone() for k, v in model.base_model.state_dict().items()}


def _xy(model: nn.Module, path: Path, seq_len: int | None, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row of a data file, tokenised by the task's model, as one padded batch: x [n, k, L], labels [n]."""
    from evaluations.data_files import read_rows
    from evaluations.text_data import load_data, max_positions

    seq_len = seq_len or min(128, max_positions(model.config) or 128)
    try:
        n = len(next(iter(read_rows(path).values()), []))
        batches = load_data(model, path, seq_len=seq_len, batch_size=max(n, 1)).batches
    except BasinError as err:
        raise BasinError(f"{where}: {err}") from None
    _check(len(batches) == 1 and "labels" in batches[0], f"{where}: {path}: expected labelled rows")
    batch = batches[0]
    x = torch.stack([batch[k] for k in INPUTS if k in batch], dim=1)
    return x, batch["labels"]


def _task(item: Any, i: int, root: Path, seq_len: int | None, where: str) -> tuple[str, nn.Module, dict]:
    from evaluations.bench.suites.yaml_suite import _file, _mapping, _text, _unknown
    from evaluations.model_losses import CLASSIFIER, model_kind

    where = f"{where}: tasks[{i}]"
    item = _mapping(item, where)
    _unknown(item, TASK_FIELDS, where)
    for key in ("name", "model", "data"):
        _check(key in item, f"{where}: missing field {key!r}")
    name = _text(item["name"], f"{where}.name")
    metric = item.get("metric", "accuracy")
    _check(metric in METRICS, f"{where}.metric: must be one of {list(METRICS)}, got {metric!r}")
    data = _mapping(item["data"], f"{where}.data", empty=False)
    _unknown(data, tuple(SPLITS), f"{where}.data")
    for split in ("validation", "test"):
        _check(split in data, f"{where}.data: missing split {split!r} (validation picks hyperparameters, test "
               "reports them)")
    files = {SPLITS[k]: _file(root, v, f"{where}.data.{k}") for k, v in data.items()}
    model = _load(_reference(root, item["model"], f"{where}.model"), f"{where}.model")
    kind = model_kind(type(model).__name__, getattr(model, "config", None))
    if kind != CLASSIFIER:
        for path in files.values():  # the measurement issue's column checks (e.g. a `label` on a causal LM) first
            _rows_fit(model, path, seq_len, f"{where}.data")
    _check(metric == "accuracy", f"{where}.metric: 'loss' (a causal LM's next-token loss) is not a bench metric yet; "
           "use sequence classifiers with metric: accuracy")
    _check(kind == CLASSIFIER, f"{where}.model: {type(model).__name__} is not a sequence classifier: metric "
           "'accuracy' needs a *ForSequenceClassification checkpoint")
    inv = {v: k for k, v in SPLITS.items()}
    return name, model, {split: _xy(model, path, seq_len, f"{where}.data.{inv[split]}")
                         for split, path in files.items()}


def _rows_fit(model: nn.Module, path: Path, seq_len: int | None, where: str) -> None:
    from evaluations.text_data import load_data, max_positions

    seq_len = seq_len or min(128, max_positions(model.config) or 128)
    try:
        load_data(model, path, seq_len=seq_len)
    except BasinError as err:
        raise BasinError(f"{where}: {err}") from None


def _same_body(name: str, state: dict, ref_name: str, ref: dict, where: str) -> None:
    missing = sorted(set(ref) - set(state))[:3]
    extra = sorted(set(state) - set(ref))[:3]
    _check(not missing and not extra, f"{where}: {name}'s base-model tensors differ from {ref_name}'s (missing "
           f"{missing}, extra {extra}): the tasks must share one architecture")
    for k, t in state.items():
        _check(t.shape == ref[k].shape, f"{where}: {name}: tensor {k!r} has shape {tuple(t.shape)}, {ref_name}'s "
               f"{tuple(ref[k].shape)}: the tasks must share one architecture")


def _grid(items: Any, where: str) -> MethodGrid:
    """Method names (a default entry of that name or label, else the method with no search) or full entries."""
    from evaluations.bench.suites.digits_tasks import default_grid
    from evaluations.bench.suites.yaml_suite import _entry, _method_name
    from merging.modelwise.catalog import MODEL_LEVEL

    known = {e.method: e for e in default_grid().entries} | {e.label: e for e in default_grid().entries}
    if items is None:
        return MethodGrid(tuple(e for e in default_grid().entries if e.method not in MODEL_LEVEL))
    _check(isinstance(items, list) and bool(items), f"{where}: 'methods' must be a non-empty list")
    entries = []
    for i, item in enumerate(items):
        if isinstance(item, str) and item in known:
            entries.append(known[item])
        elif isinstance(item, str):
            entries.append(MethodEntry(item, _method_name(item, f"{where}: methods[{i}]")))
        else:
            entries.append(_entry(item, f"{where}: methods[{i}]"))
    labels = [e.label for e in entries]
    for i, label in enumerate(labels):
        _check(label not in labels[:i], f"{where}: methods[{i}] {label!r} is listed twice")
    return MethodGrid(tuple(entries))


def suite_from_doc(doc: dict, path: Path) -> Suite:
    """The suite of a parsed checkpoint-schema YAML file (see the module docstring); one-line errors."""
    from evaluations.bench.suites.yaml_suite import _text, _unknown

    where, root = str(path), path.parent
    _unknown(doc, FIELDS, where)
    for key in ("base", "tasks"):
        _check(key in doc, f"{where}: missing field {key!r}")
    name = _text(doc.get("name", path.stem), f"{where}: name")
    seed, seq_len = doc.get("seed", 0), doc.get("seq_len")
    for key, value in (("seed", seed), ("seq_len", 1 if seq_len is None else seq_len)):
        _check(isinstance(value, int) and not isinstance(value, bool) and value >= (key == "seq_len"),
               f"{where}: {key} must be a {'positive' if key == 'seq_len' else 'non-negative'} integer, got {value!r}")
    methods = _grid(doc.get("methods"), where)
    tasks_doc = doc["tasks"]
    _check(isinstance(tasks_doc, list) and bool(tasks_doc), f"{where}: tasks: must be a non-empty list of "
           "{name, model, data, metric}")
    base_model = _load(_reference(root, doc["base"], f"{where}: base"), f"{where}: base")
    base = _body_state(base_model)
    loaded = [_task(item, i, root, seq_len, where) for i, item in enumerate(tasks_doc)]
    names = [n for n, _, _ in loaded]
    for i, n in enumerate(names):
        _check(n not in names[:i], f"{where}: tasks[{i}].name {n!r} is used twice")
    first_cls = type(loaded[0][1]).__name__
    states = {}
    for i, (task_name, model, _) in enumerate(loaded):
        _check(type(model).__name__ == first_cls, f"{where}: tasks[{i}].model: a {type(model).__name__}, but "
               f"tasks[0] is a {first_cls}: the tasks must share one architecture")
        states[task_name] = _body_state(model)
        _same_body(f"tasks[{i}] ({task_name})", states[task_name], "the base", base, f"{where}: tasks[{i}].model")
    keys = tuple(k for k in INPUTS if k in {"input_ids", "attention_mask"} or
                 int(getattr(loaded[0][1].config, "type_vocab_size", 0) or 0) >= 2)
    template = copy.deepcopy(loaded[0][1].base_model)  # before the heads take their base models out

    def build() -> EncodedBody:
        return EncodedBody(copy.deepcopy(template), keys)

    tasks = []
    for task_name, model, xy in loaded:
        _check(all(x.shape[1] == len(keys) for x, _ in xy.values()), f"{where}: task {task_name}: inputs differ")
        tasks.append(Task(task_name, xy["test"], xy["val"], xy.get("train"), TaskHead(model, keys).eval()))
    return Suite(name, ModelPool(base, states, build), TaskPool(tasks), methods, seed=seed,
                 description=f"user suite {path.name}: {first_cls} fine-tunes of {doc['base']}")
