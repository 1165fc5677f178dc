"""The method grid of a benchmark: merge methods with fixed and searched hyperparameters.

A grid entry names a merge: any tensorwise method registered in `merging.methods` (simple average
`linear`, `task_arithmetic`, `ties`, `dare_ties`, `breadcrumbs`, `della`, `model_stock`, ...), one
of the model-level merges below, or a Python callable `fn(pool, tasks, params, seed) -> body state`.
Hyperparameters in `search` are selected on the tasks' validation splits by the best average
metric (grid search, first best on ties), as in the task arithmetic and TIES papers (Ilharco et
al. 2023, sec. 3; Yadav et al. 2023, sec. 6).

Model-level merges: `fisher` (Matena and Raffel 2022), `regmean` (Jin et al. 2023), `regmean_plusplus`
(Nguyen et al. 2025) on each task's training sample, `adamerging_task` / `adamerging_layer` (Yang et al.
2024) on each task's unlabeled test inputs (test-time adaptation, as in the paper), and
`weight_matching` (Ainsworth et al. 2023: permute every fine-tune's hidden units onto the first
fine-tune's, then merge with `params["then"]`, default the simple average `linear`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from evaluations.bench.pools import HeadedBody, ModelPool, State, TaskPool
from taxonomy.errors import BasinError

Merger = Callable[[ModelPool, TaskPool, dict[str, Any], int], State]


@dataclass(frozen=True)
class MethodEntry:
    """One row of the grid: `label` shown in the table, `method` a name or callable, fixed `params`,
    and `search`: hyperparameter -> candidate values chosen on the validation split."""

    label: str
    method: str | Merger
    params: Mapping[str, Any] = field(default_factory=dict)
    search: Mapping[str, Sequence[Any]] = field(default_factory=dict)

    def candidates(self) -> list[dict[str, Any]]:
        """Every parameter set the cell tries: fixed params updated with one point of the search grid."""
        keys = list(self.search)
        for k in keys:
            if not list(self.search[k]):
                raise BasinError(f"method {self.label!r}: search values for {k!r} are empty")
        points = itertools.product(*(list(self.search[k]) for k in keys))
        return [{**dict(self.params), **dict(zip(keys, p))} for p in points]

    def describe(self) -> dict[str, Any]:
        name = self.method if isinstance(self.method, str) else getattr(self.method, "__qualname__", "callable")
        return {"label": self.label, "method": name, "params": _plain(self.params),
                "search": {k: _plain(list(v)) for k, v in self.search.items()}}


@dataclass(frozen=True)
class MethodGrid:
    entries: tuple[MethodEntry, ...]

    def __post_init__(self) -> None:
        labels = [e.label for e in self.entries]
        if len(set(labels)) != len(labels):
            raise BasinError(f"method grid: duplicate labels in {labels}")

    def select(self, labels: Sequence[str] | None) -> MethodGrid:
        """The entries whose label or method name is in `labels` (all when None), in grid order."""
        if not labels:
            return self
        known = {e.label for e in self.entries} | {e.method for e in self.entries if isinstance(e.method, str)}
        unknown = [x for x in labels if x not in known]
        if unknown:
            raise BasinError(f"--methods: unknown {unknown}; this suite has {[e.label for e in self.entries]}")
        return MethodGrid(tuple(e for e in self.entries if e.label in labels or e.method in labels))


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if isinstance(value, (int, float, str, bool)) or value is None else repr(value)


def _task_modules(pool: ModelPool, tasks: TaskPool) -> tuple[list[torch.nn.Module], list[Any]]:
    """Each fine-tune as the network of its own task (head hidden), and its task's training sample."""
    modules = [HeadedBody(pool.module(s), tasks[name].head) for name, s in pool.models.items()]
    return modules, [tasks[name].data("train") for name in pool.models]


def _body(state: Mapping[str, torch.Tensor], names: Sequence[str]) -> State:
    return {n: state["body." + n].clone() for n in names}


def model_level(method: str, pool: ModelPool, tasks: TaskPool, params: dict[str, Any], seed: int = 0) -> State:
    """A model-level merge (`merging.modelwise`) of the fine-tunes, each on its own task's training sample,
    or on its own task's unlabeled test inputs for methods that adapt at test time (AdaMerging)."""
    from merging.modelwise.catalog import merge_models
    from taxonomy import get as get_info

    info = get_info(method)
    modules, data = _task_modules(pool, tasks)
    if info.needs_test_inputs:
        data = [tasks[name].test[0] for name in pool.models]
    base = HeadedBody(pool.module(pool.base), None) if info.needs_base else None
    return _body(merge_models(method, modules, data, params, base=base, seed=seed), list(pool.base))


DATA_USED = {"fisher": "train sample (labeled)", "regmean": "train inputs", "regmean_plusplus": "train inputs",
             "weight_matching": "none (weights)"}


def data_used(entry: MethodEntry) -> str:
    """Which data a grid entry's merge reads, and whether the validation split chose its hyperparameters."""
    from taxonomy import get as get_info

    if not isinstance(entry.method, str):
        used = "user code"
    elif entry.method in DATA_USED:
        used = DATA_USED[entry.method]
    else:
        info = get_info(entry.method)
        used = "unlabeled test inputs" if info.needs_test_inputs else ("data" if info.needs_data else "none")
    searched = [k for k, v in entry.search.items() if len(list(v)) > 1]
    return used + (f"; val picks {', '.join(searched)}" if searched else "")


def weight_matching(pool: ModelPool, tasks: TaskPool, params: dict[str, Any], seed: int) -> State:
    from merging.alignment import apply_permutation, infer_spec
    from merging.alignment import weight_matching as match

    spec = infer_spec(pool.build())
    states = list(pool.models.values())
    aligned = [states[0]] + [apply_permutation(s, spec, match(states[0], s, spec, seed=seed).perms) for s in states[1:]]
    then = str(params.get("then", "linear"))
    rest = {k: v for k, v in params.items() if k != "then"}
    return tensorwise(then, pool, rest, seed, models=aligned)


def tensorwise(method: str, pool: ModelPool, params: Mapping[str, Any], seed: int,
               models: Sequence[State] | None = None) -> State:
    from merging.methods.catalog import get_method
    from merging.modelwise.state_dicts import merge_state_dicts

    needs_base = get_method(method).info.needs_base
    models = list(pool.models.values()) if models is None else list(models)
    return merge_state_dicts(method, models, base=pool.base if needs_base else None, params=params, seed=seed)


def run_merge(method: str | Merger, pool: ModelPool, tasks: TaskPool, params: dict[str, Any], seed: int) -> State:
    """The merged body state of one grid entry with one parameter set."""
    if callable(method):
        return method(pool, tasks, params, seed)
    from merging.modelwise.catalog import MODEL_LEVEL

    if method == "weight_matching":
        return weight_matching(pool, tasks, params, seed)
    from taxonomy import get as get_info

    if get_info(method).name in MODEL_LEVEL:
        return model_level(get_info(method).name, pool, tasks, params, seed)
    return tensorwise(method, pool, params, seed)


def _scaled_method(method: str | Merger) -> str | None:
    """The catalog name of a tensorwise method whose merge is anchor + lambda * delta, else None."""
    if callable(method) or method == "weight_matching":
        return None
    from merging.methods.catalog import get_method
    from merging.modelwise.catalog import MODEL_LEVEL
    from taxonomy import get as get_info

    name = get_info(method).name
    if name in MODEL_LEVEL:
        return None
    return name if get_method(name).scaled is not None else None


def run_merges(method: str | Merger, pool: ModelPool, tasks: TaskPool, candidates: Sequence[dict[str, Any]],
               seed: int) -> Iterator[State]:
    """`run_merge` for each candidate parameter set, in order. For TSV-M, Iso-C, Iso-CTS and CART (merge = anchor
    + lambda * delta), consecutive candidates that differ only in lambda share one computation of the parts (one
    set of SVDs, not one per lambda) and give the same bits as `run_merge`."""
    name = _scaled_method(method)
    if name is None or not all("lambda" in c for c in candidates):
        for params in candidates:
            yield run_merge(method, pool, tasks, dict(params), seed)
        return
    from merging.methods.catalog import get_method
    from merging.modelwise.state_dicts import scaled_merge

    base = pool.base if get_method(name).info.needs_base else None
    key, parts = None, None
    for params in candidates:
        rest = {k: v for k, v in params.items() if k != "lambda"}
        if parts is None or rest != key:  # one group's parts held at a time
            key, parts = rest, scaled_merge(name, list(pool.models.values()), base, rest, seed)
        yield parts.at(params["lambda"])
