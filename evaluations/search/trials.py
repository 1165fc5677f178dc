"""One search trial: the recipe at the trial's values, merged and scored (no Optuna here).

A `TrialRunner` is built once per worker (the local process, or each Ray actor): it opens the recipe's inputs
(lazily, memory-mapped: every trial reads them through the page cache), builds the live model of the output's
config (weights uninitialised) and tokenises `--data` once. Per trial, with `in_memory` `auto` (default), the
merged tensors stream from the engine straight into the live model (`merging.engine.run_plan` with a sink that
copies each tensor into the model's storage: nothing is written) when the plan's output matches the model (same
names and shapes, no vocabulary change, no alignment) and the model fits in `memory_budget`; otherwise the trial
merges into a scratch folder (`merging.pipeline.merge`), loads it, scores it and removes the folder.

Objectives: `loss` (the evaluator's mean loss on the data, `evaluations.measure.measure_loss`, summed over chunks
of batches in float64 so that a pruner can stop a bad trial after a chunk), `suite` (a benchmark suite's average
normalized accuracy on its validation splits, `evaluations.search.suite_objective`: the merged tensors go into the
suite's live body; no other live model is built for it) or a callable `module:fn` / `file.py:fn` called with the
live model (in memory) or the merged folder's path (scratch), returning a number.

The inputs are opened once per worker: trials merged on disk reuse them (`merging.pipeline.merge(inputs=...)`).
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from taxonomy.errors import BasinError, CheckpointError, DataError

CHUNKS = 4  # the loss is reported to the pruner after each quarter of the data
IN_MEMORY = ("auto", "always", "never")
Report = Callable[[int, float], bool]  # report(step, value) -> True when the trial should stop
T = TypeVar("T")
Steps = Generator[tuple[int, float], None, T]  # yields (chunk, running mean loss), returns T


class Pruned(Exception):
    """The pruner stopped this trial after a partial evaluation."""


@dataclass(frozen=True)
class ObjectiveSpec:
    """`loss`, or a callable's `module:fn` reference; minimised or maximised."""

    name: str
    direction: str = "minimize"

    @property
    def is_loss(self) -> bool:
        return self.name == "loss"

    @property
    def is_suite(self) -> bool:
        return self.name == "suite"


@dataclass(frozen=True)
class DataSpec:
    """What `evaluations.text_data.load_data` reads for the `loss` objective."""

    path: str
    seq_len: int | None = None  # None: `text_data.default_seq_len`
    max_examples: int | None = None
    batch_size: int = 8
    seed: int = 0


@dataclass(frozen=True)
class TrialSetup:
    """Everything a worker needs (plain data: it travels to Ray actors)."""

    raw: dict[str, Any]  # the search recipe's mapping
    where: str
    objectives: tuple[ObjectiveSpec, ...]
    data: DataSpec | None = None
    in_memory: str = "auto"
    device: str = "cpu"
    allow_pickle: bool = False
    scratch: str | None = None  # parent of the scratch folders (None: the system's temporary folder)
    memory_budget: int | None = None  # bytes the live model may take (None: half the memory available now)
    suite: str | None = None  # the suite file of the `suite` objective


def available_memory() -> int:
    """Bytes of physical memory available now (0 when unknown)."""
    import os

    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


class _PlanHeaders:
    """A merge plan's output as the checkpoint view `evaluations.models.check_names` reads (names, shapes)."""

    def __init__(self, plan: Any) -> None:
        self.shapes = {tp.name: tuple(tp.shape) for tp in plan.tensors}

    def names(self) -> list[str]:
        return list(self.shapes)

    def meta(self, name: str) -> Any:
        return type("Meta", (), {"shape": self.shapes[name]})


class TrialRunner:
    """Merges and scores trials for one worker (see the module docstring)."""

    def __init__(self, setup: TrialSetup) -> None:
        from merging.objects import load_object
        from merging.pipeline import open_inputs
        from merging.recipe.search_space import SearchSpace

        if setup.in_memory not in IN_MEMORY:
            raise BasinError(f"--in-memory: expected one of {', '.join(IN_MEMORY)}, got {setup.in_memory!r}")
        self.setup = setup
        self.space = SearchSpace.from_dict(setup.raw, setup.where)
        self.ckpts = open_inputs(self.space.recipe(self.space.defaults()), allow_pickle=setup.allow_pickle)
        self.fns = {o.name: load_object(o.name, f"--objective {o.name}", files=True)
                    for o in setup.objectives if not (o.is_loss or o.is_suite)}
        self.suite: Any = None
        if any(o.is_suite for o in setup.objectives):
            from evaluations.search.suite_objective import SuiteObjective

            if setup.suite is None:
                raise BasinError("--objective suite needs --suite FILE (a benchmark suite's YAML file)")
            self.suite = SuiteObjective(setup.suite)
            self._check_suite_plan()
        self.model: nn.Module | None = None
        self.data: Any = None
        self.objective: Any = None
        self._sources: dict[tuple[str, ...], dict[str, list[torch.Tensor]]] = {}
        if self.needs_model:
            self._build_model()

    def _check_suite_plan(self) -> None:
        """The recipe at its defaults planned and mapped onto the suite's body before any trial (one-line errors)."""
        try:
            plan = self._plan(self.space.recipe(self.space.defaults()))
        except BasinError as err:
            raise BasinError(f"{err} (--suite: the recipe's models must share their tensor names, as basin merge "
                             "needs; a headless base, e.g. a BertModel beside BertForSequenceClassification "
                             "fine-tunes, cannot be merged with them: save the base with the fine-tunes' class)"
                             ) from None
        self.suite.targets({tp.name: tuple(tp.shape) for tp in plan.tensors})

    @property
    def needs_model(self) -> bool:
        """Whether an objective scores a whole model (the loss, a callable); the suite scores its own body."""
        return bool(self.fns) or any(o.is_loss for o in self.setup.objectives)

    # --- set-up -----------------------------------------------------------------------------------------------
    def _build_model(self) -> None:
        """The live model (config source's class, weights uninitialised) and the tokenised data, when wanted."""
        from evaluations.models import build_model, config_folder, load_config, model_class, parse_device
        from merging.architectures import config_source

        needs_loss = any(o.is_loss for o in self.setup.objectives)
        if needs_loss and self.setup.data is None:
            raise DataError("the loss objective needs --data (a text or JSONL/CSV file)")
        if self.setup.in_memory == "never" and not needs_loss:
            return
        ref = config_source(self.space.recipe(self.space.defaults()))
        try:
            folder = config_folder(self.ckpts[ref], ref)
            config = load_config(folder)
            cls = model_class(config, folder / "config.json")
        except CheckpointError:
            if needs_loss or self.setup.in_memory == "always":
                raise
            return  # callables only: every trial is scored from its merged folder
        model = build_model(config, cls, torch.float32, parse_device(self.setup.device))
        model.basin_folder = folder
        self.model = model
        if needs_loss:
            self._load_data(model)

    def _load_data(self, model: nn.Module) -> None:
        from evaluations.model_losses import objective_for
        from evaluations.text_data import load_data

        d = self.setup.data
        assert d is not None  # _build_model checked it
        if not Path(d.path).is_file():
            raise DataError(f"--data {d.path}: no such file")
        self.objective = objective_for(model)
        self.data = load_data(model, d.path, seq_len=d.seq_len, max_examples=d.max_examples,
                              batch_size=d.batch_size, seed=d.seed)

    # --- one trial --------------------------------------------------------------------------------------------
    def run(self, values: dict[str, Any], report: Report | None = None) -> dict[str, Any]:
        """Merge and score the recipe at `values`: objective values and times (see the module docstring); after each
        chunk of the first objective's loss `report(chunk, running mean)` may stop the trial (`Pruned`)."""
        return drive(self.steps(values), report)

    def steps(self, values: dict[str, Any]) -> Generator[tuple[int, float], None, dict[str, Any]]:
        """`run` as a generator: yields (chunk, running mean loss) after each chunk but the last of the first
        objective's loss (when it is the loss), returns the result (closing it stops the trial: a Ray worker pauses
        here while the driver asks the pruner). The merge's seconds count the recipe's planning too (as
        `basin merge`'s do), the scoring's every objective."""
        start = time.perf_counter()
        recipe = self.space.recipe(values)
        plan = self._plan(recipe)
        targets = self._targets(recipe, plan)
        if targets is None:
            planned = time.perf_counter() - start
            scores, merge_s, score_s = yield from self._run_scratch(recipe, plan)
            merge_s, mode = merge_s + planned, "scratch"
        else:
            self._merge_into(plan, targets)
            t = time.perf_counter()
            merge_s = t - start
            scores = yield from self._score(self.model, None)
            score_s, mode = time.perf_counter() - t, "memory"
        return {"values": scores, "merge_seconds": merge_s, "score_seconds": score_s, "mode": mode,
                "seconds": time.perf_counter() - start}

    def _plan(self, recipe: Any) -> Any:
        from merging.dtypes import canonical
        from merging.plan.tensors import build_plan

        plan = build_plan(recipe, self.ckpts, canonical(recipe.out_dtype or recipe.dtype))
        plan.compute_dtype = recipe.low_compute_dtype
        return plan

    def _targets(self, recipe: Any, plan: Any) -> dict[str, list[torch.Tensor]] | None:
        """output tensor name -> the live tensors it fills (the model's, the suite's body), or None when the trial
        cannot run in memory."""
        if self.setup.in_memory == "never" or recipe.align or plan.vocab is not None:
            return self._refuse_memory("the merge aligns or remaps the vocabulary")
        targets: dict[str, list[torch.Tensor]] = {}
        if self.suite is not None:
            for name, tensor in self.suite.targets({tp.name: tuple(tp.shape) for tp in plan.tensors}).items():
                targets.setdefault(name, []).append(tensor)
        if not self.needs_model:
            return targets
        model = self._model_targets(plan)
        if model is None:
            return None
        for name, tensors in model.items():
            targets.setdefault(name, []).extend(tensors)
        return targets

    def _model_targets(self, plan: Any) -> dict[str, list[torch.Tensor]] | None:
        """output tensor name -> the live model's tensors, cached per plan layout (names, shapes)."""
        from evaluations.models import check_names

        if self.model is None:
            return self._refuse_memory("no live model was built")
        key = tuple(f"{tp.name}:{tuple(tp.shape)}" for tp in plan.tensors)
        if key not in self._sources:
            state = self.model.state_dict()
            budget = self.setup.memory_budget
            budget = available_memory() // 2 if budget is None else budget
            size = sum(t.nbytes for t in state.values())
            if self.setup.in_memory == "auto" and budget and size > budget:
                return None
            try:
                source = check_names(self.model, _PlanHeaders(plan), "the merged output")
            except CheckpointError as err:
                return self._refuse_memory(str(err))
            targets: dict[str, list[torch.Tensor]] = {}
            for name, tensor in state.items():
                targets.setdefault(source[name], []).append(tensor)
            self._sources[key] = targets
        return self._sources[key]

    def _refuse_memory(self, why: str) -> None:
        if self.setup.in_memory == "always":
            raise BasinError(f"--in-memory always: this trial cannot merge into the live model ({why})")
        return None

    def _merge_into(self, plan: Any, targets: dict[str, list[torch.Tensor]]) -> float:
        """Stream the merge into the live model's tensors; seconds taken."""
        from merging.engine import run_plan

        def sink(name: str, tensor: torch.Tensor) -> None:
            for t in targets.get(name, ()):
                t.copy_(tensor)

        start = time.perf_counter()
        run_plan(plan, [self.ckpts[r] for r in plan.inputs], sink, device=self.setup.device, progress=False)
        return time.perf_counter() - start

    def _run_scratch(self, recipe: Any, plan: Any) -> Steps[tuple[list[float], float, float]]:
        """Merge into a scratch folder, score the folder, remove it: (scores, merge seconds, score seconds)."""
        from merging.pipeline import merge

        try:
            folder = Path(tempfile.mkdtemp(prefix="basin-trial-", dir=self.setup.scratch))
        except OSError as err:
            raise BasinError(f"--scratch {self.setup.scratch}: cannot create a scratch folder ({err})") from None
        try:
            start = time.perf_counter()
            merge(recipe, folder / "merged", progress=False, resume=False, allow_pickle=self.setup.allow_pickle,
                  device=self.setup.device, inputs=self.ckpts)
            merge_s = time.perf_counter() - start
            scores = yield from self._score_folder(folder / "merged", plan.vocab is not None)
            return scores, merge_s, time.perf_counter() - start - merge_s
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _score_folder(self, folder: Path, new_vocab: bool) -> Steps[list[float]]:
        from evaluations.models import load_model

        if self.suite is not None:
            from merging.io.checkpoint import open_checkpoint

            self.suite.load(open_checkpoint(str(folder)))
        if self.model is None and self.data is None:
            return (yield from self._score(None, folder))
        model = load_model(folder, device=self.setup.device)
        if new_vocab and self.data is not None:  # the output's own tokenizer
            self._load_data(model)
        return (yield from self._score(model, folder))

    def suite_report(self, values: dict[str, Any]) -> dict[str, Any]:
        """The suite's figures (validation and test) for the merge at `values` (the best trial, after a search)."""
        if self.suite is None:
            raise BasinError("suite_report: this search has no suite objective")
        self.run(values)
        return self.suite.report()

    # --- scoring -----------------------------------------------------------------------------------------------
    def _score(self, model: nn.Module | None, folder: Path | None) -> Steps[list[float]]:
        out: list[float] = []
        for o in self.setup.objectives:
            if o.is_loss and not out:
                value = yield from loss_chunks(model, self.data, self.objective)
            elif o.is_loss:
                value = chunked_loss(model, self.data, self.objective)
            elif o.is_suite:
                value = self.suite.normalized("val")
            else:
                value = _call(self.fns[o.name], o.name, model if folder is None else str(folder))
            out.append(value)
        return out


def loss_chunks(model: nn.Module, data: Any, objective: Any) -> Steps[float]:
    """The mean loss over every row of `data` (`measure_loss` per chunk of batches, row-weighted in float64),
    yielding (chunk, running mean) after each chunk but the last."""
    from evaluations.measure import measure_loss

    batches = list(data)
    n = max(1, min(CHUNKS, len(batches)))
    bounds = [round(k * len(batches) / n) for k in range(n + 1)]
    total, rows = 0.0, 0
    for step in range(n):
        r = measure_loss(model, batches[bounds[step]:bounds[step + 1]], objective)
        total, rows = total + r.loss * r.rows, rows + r.rows
        if step < n - 1:
            yield step, total / rows
    return total / rows


def chunked_loss(model: nn.Module, data: Any, objective: Any, report: Report | None = None) -> float:
    """`loss_chunks` run through: after each chunk `report(chunk, running mean)` may stop the trial (`Pruned`)."""
    return drive(loss_chunks(model, data, objective), report)


def drive(steps: Steps[T], report: Report | None = None) -> T:
    """Run `steps` to its result; after each (chunk, value) it yields, `report` may stop it (`Pruned`)."""
    try:
        while True:
            step, value = next(steps)
            if report is not None and report(step, value):
                steps.close()
                raise Pruned(f"pruned after chunk {step + 1}")
    except StopIteration as stop:
        return stop.value


def _call(fn: Any, name: str, arg: Any) -> float:
    """`fn(model or path)` as a finite float; anything else is a one-line error naming the objective."""
    value = fn(arg)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BasinError(f"--objective {name}: returned {value!r}; expected a finite number")
    return float(value)
