"""`run_search`: a recipe's `{search: ...}` values tuned by Optuna, each trial merged and scored (`basin search`).

Order of work, so that bad input costs nothing and writes nothing: the search recipe (`merging.recipe.search_space`:
every range and choice checked; `--suite`'s `suite:NAME` references resolved), the sampler and pruner, the executor
(Ray reachable; the workers built: inputs opened, live model or suite built, data tokenised), and only then the
storage (the default SQLite file in OUT) and the study, created or resumed (`evaluations.search.study.load_study`).
The executor drives an in-memory copy of it that stores each finished trial (`study.StoredStudy`). Trials run until
the study holds `trials` completed or pruned ones; trials an interrupted run left running are marked failed and run
again. With `--suite`, the best trial is then scored on the suite's test splits too (`SearchResult.extra`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluations.search import study as st
from evaluations.search.executors import LocalTrials, RayTrials
from evaluations.search.trials import DataSpec, ObjectiveSpec, TrialRunner, TrialSetup
from merging.recipe.search_space import SearchSpace
from taxonomy.errors import BasinError, OutputError

DB = "study.db"
MARKER = "search.json"  # a folder holding it (or the database) is a search folder: resumed, not refused


@dataclass
class SearchOptions:
    """What `basin search` was asked (see `evaluations.cli.search` for each option)."""

    recipe: str | Path
    out: str | Path
    trials: int = 50
    objectives: tuple[ObjectiveSpec, ...] = (ObjectiveSpec("loss"),)
    data: DataSpec | None = None
    sampler: str = "tpe"
    pruner: str = "median"
    seed: int = 0
    executor: str = "local"
    address: str | None = None
    workers: int = 2
    storage: str | None = None
    study: str | None = None
    in_memory: str = "auto"
    device: str = "cpu"
    allow_pickle: bool = False
    overwrite: bool = False
    scratch: str | None = None
    memory_budget: int | None = None
    suite: str | None = None  # the benchmark suite file of the `suite` objective


@dataclass
class SearchResult:
    study: Any
    space: SearchSpace
    names: list[str]
    out: Path
    stale: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def check_out(out: Path, overwrite: bool, own_storage: bool) -> bool:
    """Whether OUT is an existing search folder (resumed); a folder of something else is refused."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: is a file, expected a search output folder")
    if not out.exists():
        return False
    ours = (out / MARKER).is_file() or (own_storage and (out / DB).is_file())
    if not ours and any(out.iterdir()) and not overwrite:
        raise OutputError(f"{out}: exists and is not a basin search folder; pass --overwrite to replace it")
    return ours


def _check(opts: SearchOptions) -> None:
    if isinstance(opts.trials, bool) or not isinstance(opts.trials, int) or opts.trials < 1:
        raise BasinError(f"--trials: expected a positive integer, got {opts.trials!r}")
    if opts.executor not in ("local", "ray"):
        raise BasinError(f"--executor: unknown executor {opts.executor!r}; choose local or ray")
    if opts.workers < 1:
        raise BasinError(f"--workers: expected a positive integer, got {opts.workers}")
    for o in opts.objectives:
        if o.direction not in ("minimize", "maximize"):
            raise BasinError(f"--direction: expected minimize or maximize, got {o.direction!r}")
    if len({o.name for o in opts.objectives}) != len(opts.objectives):
        raise BasinError("--objective: an objective is named twice")
    has_suite = any(o.is_suite for o in opts.objectives)
    if has_suite != (opts.suite is not None):
        raise BasinError("--objective suite needs --suite FILE" if has_suite else
                         "--suite FILE: list 'suite' among the objectives (--objective suite)")


def _space(opts: SearchOptions) -> SearchSpace:
    """The search recipe, its `suite:NAME` model references resolved against the suite file (`--suite`)."""
    if opts.suite is None:
        return SearchSpace.from_yaml(opts.recipe)
    from evaluations.search.suite_objective import suite_refs, suite_sources
    from merging.recipe.yaml_reader import load_recipe_text, read_recipe_file

    where = str(opts.recipe)
    raw = load_recipe_text(read_recipe_file(Path(opts.recipe)), where)
    return SearchSpace.from_dict(suite_refs(raw, suite_sources(opts.suite), where), where)


def _executor(opts: SearchOptions, setup: TrialSetup) -> LocalTrials | RayTrials:
    if opts.executor == "local":
        return LocalTrials(TrialRunner(setup))
    ex = RayTrials(setup, workers=opts.workers, address=opts.address)
    ex.start()
    return ex


def _storage(opts: SearchOptions, out: Path) -> Any:
    if opts.storage is not None:
        return st.open_storage(opts.storage)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create {out}: {err.strerror or err}; nothing was written") from None
    return st.open_storage(f"sqlite:///{(out / DB).resolve()}")


def _fresh(out: Path, storage: Any, name: str) -> None:
    """--overwrite: the study and the reports of an earlier search removed."""
    optuna = st.optuna_module()
    try:
        optuna.delete_study(study_name=name, storage=storage)
    except KeyError:
        pass
    for f in (MARKER, "best.yaml", "trials.json", "trials.csv", "search.png"):
        (out / f).unlink(missing_ok=True)


def _record(trial: Any, result: dict[str, Any]) -> None:
    """The trial's times and where it ran, as one user attribute (one database write)."""
    keys = ("merge_seconds", "score_seconds", "seconds", "wall_seconds", "mode", "worker")
    trial.set_user_attr("basin", {k: result[k] for k in keys if k in result})


def _suite_report(opts: SearchOptions, result: SearchResult, executor: LocalTrials | RayTrials) -> None:
    """The suite objective's best trial scored on the test splits too (`extra["suite"]`, in search.json)."""
    from evaluations.search.report import best_trials

    best = best_trials(result.study)
    if opts.suite is not None and best:
        result.extra["suite"] = {"trial": best[0].number, **executor.suite_report(dict(best[0].params))}


def prepare(opts: SearchOptions) -> tuple[SearchSpace, Any, Any, Any]:
    """Every check before anything is written: the space, sampler, pruner and executor (workers built)."""
    _check(opts)
    space = _space(opts)
    sampler = st.make_sampler(opts.sampler, opts.seed, space.dims)
    pruner = st.make_pruner(opts.pruner, len(opts.objectives))
    out = Path(opts.out)
    check_out(out, opts.overwrite, opts.storage is None)
    setup = TrialSetup(space.raw, space.where, tuple(opts.objectives), opts.data, opts.in_memory, opts.device,
                       opts.allow_pickle, opts.scratch, opts.memory_budget, opts.suite)
    return space, sampler, pruner, _executor(opts, setup)


def run_search(opts: SearchOptions, on_done: Callable[[SearchResult], object] | None = None) -> SearchResult:
    """Run (or continue) the search. `on_done(result)` (e.g. writing the reports, `evaluations.search.report`) runs
    once the study is open, also when a trial fails or the run is interrupted (the study keeps what finished)."""
    space, sampler, pruner, executor = prepare(opts)
    out = Path(opts.out)
    try:
        storage = _storage(opts, out)
        name = opts.study or out.resolve().name
        if opts.overwrite:
            _fresh(out, storage, name)
        objectives = [{"name": o.name, "direction": o.direction} for o in opts.objectives]
        what = st.fingerprint(space.raw, space.dims, objectives)
        study = st.load_study(storage, name, sampler, pruner, [o.direction for o in opts.objectives], what)
        stale = st.fail_stale(study)
        driven = st.StoredStudy(study, sampler, pruner)
        total = opts.trials
        if opts.sampler == "grid":
            total = min(total, st.enqueue_grid(driven, space.dims))
        result = SearchResult(study, space, [o.name for o in opts.objectives], out, stale)
        prune = opts.pruner != "none" and len(opts.objectives) == 1 and opts.objectives[0].is_loss
        try:
            try:
                executor.run(driven, space.dims, total, _record, prune)
            finally:
                driven.close()
            _suite_report(opts, result, executor)
        finally:
            if on_done is not None:
                on_done(result)
        return result
    finally:
        if isinstance(executor, RayTrials):
            executor.stop()

