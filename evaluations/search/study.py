"""The Optuna side of `basin search`: samplers, pruner, storage, the study (created or resumed), suggestions.

Optuna is imported here only (the `search` extra); a missing install is a one-line error naming the extra.
A study remembers what it searches (the search recipe, its dimensions, the objectives) in its user attributes:
rerunning the same command continues it, and a study of another search under the same name is refused.
"""

from __future__ import annotations

import json
from typing import Any

from merging.recipe.search_space import Dimension
from taxonomy.errors import BasinError

SAMPLERS = ("tpe", "cmaes", "random", "grid")
PRUNERS = ("median", "none")


def optuna_module() -> Any:
    try:
        import optuna
    except ImportError:
        raise BasinError("basin search needs Optuna: pip install 'basin[search]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def make_sampler(name: str, seed: int, dims: list[Dimension]) -> Any:
    """TPE (default), CMA-ES (as mergekit-evolve), random, or grid (every dimension a choice or a stepped range)."""
    optuna = optuna_module()
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        try:
            import cmaes  # noqa: F401  # Optuna's CmaEsSampler needs it
        except ImportError:
            raise BasinError("--sampler cmaes needs the cmaes package: pip install cmaes") from None
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "grid":  # every point enqueued (`enqueue_grid`); Optuna's GridSampler stops the study from inside
        grid_points(dims)
        return optuna.samplers.RandomSampler(seed=seed)
    raise BasinError(f"--sampler: unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")


def grid_points(dims: list[Dimension]) -> list[dict[str, Any]]:
    """Every point of the grid (the product of the dimensions' values, in order); every dimension must be finite."""
    import itertools

    grid = {d.label: d.grid() for d in dims}
    open_ = [label for label, values in grid.items() if values is None]
    if open_:
        raise BasinError(f"--sampler grid: {open_[0]} is a continuous range; give it a step "
                         "({search: [low, high], step: s}) or a list of choices")
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def enqueue_grid(study: Any, dims: list[Dimension]) -> int:
    """Enqueue every grid point the study has not tried yet; the grid's size."""
    points = grid_points(dims)
    for point in points:
        study.enqueue_trial(point, skip_if_exists=True)
    return len(points)


def make_pruner(name: str, objectives: int) -> Any:
    """Median pruning after a partial evaluation (single objective only), or none."""
    optuna = optuna_module()
    if name not in PRUNERS:
        raise BasinError(f"--pruner: unknown pruner {name!r}; choose from {', '.join(PRUNERS)}")
    if name == "none" or objectives > 1:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)


def open_storage(url: str) -> Any:
    """An Optuna RDB storage at `url` (e.g. sqlite:///search.db); a one-line error when it cannot be opened.

    A SQLite file is put in write-ahead-log mode and its connections use `synchronous=NORMAL` (SQLite's advice for
    WAL): a commit appends to the log without waiting for the disk, so the dozen small writes of each trial (the
    trial, each parameter, its values) cost microseconds instead of an fsync each; a crash may lose the last
    commits, never the database. WAL needs a local filesystem (not NFS), as SQLite itself does for locking."""
    optuna = optuna_module()
    if not isinstance(url, str) or "://" not in url:
        raise BasinError(f"--storage {url!r}: expected a database URL such as sqlite:///search.db")
    try:
        path = _sqlite_file(url)
        if path is not None:
            import sqlite3

            with sqlite3.connect(path) as con:  # persistent in the file: RDBStorage's own set-up runs in WAL too
                con.execute("PRAGMA journal_mode=WAL")
            con.close()
        storage = optuna.storages.RDBStorage(url)
        if path is not None:
            _sqlite_pragmas(storage.engine)
        return storage
    except Exception as err:  # SQLAlchemy's errors (bad URL, missing driver, unreachable server, unwritable file)
        first = " ".join(str(err).split())[:200]
        raise BasinError(f"--storage {url}: cannot open the database ({first})") from None


def _sqlite_file(url: str) -> str | None:
    """The database file of a sqlite:/// URL (None: another backend, or an in-memory database)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return parsed.database


def _sqlite_pragmas(engine: Any) -> None:
    """`synchronous=NORMAL` on every connection of `engine` (those already pooled are closed, then reopened)."""
    from sqlalchemy import event

    def pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()  # the WAL journal mode is the file's own, set by open_storage
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(engine, "connect", pragmas)
    engine.dispose()


def fingerprint(raw: dict[str, Any], dims: list[Dimension], objectives: list[dict[str, str]]) -> str:
    """What a study searches, as canonical JSON (compared on resume)."""
    return json.dumps({"recipe": raw, "dims": [d.to_json() for d in dims], "objectives": objectives},
                      sort_keys=True, default=str)


def load_study(storage: Any, name: str, sampler: Any, pruner: Any, directions: list[str], what: str) -> Any:
    """The study `name` in `storage`: created, or resumed when it searches the same `what` (else refused)."""
    optuna = optuna_module()
    study = optuna.create_study(storage=storage, study_name=name, sampler=sampler, pruner=pruner,
                                directions=directions, load_if_exists=True)
    seen = study.user_attrs.get("basin_search")
    if seen is None:
        study.set_user_attr("basin_search", what)
    elif seen != what:
        raise BasinError(f"study {name!r} in this storage searches another recipe, space or objective; use another "
                         "output folder or --study name, or pass --overwrite to start again")
    if [d.name.lower() for d in study.directions] != directions:
        raise BasinError(f"study {name!r} was created with directions {[d.name.lower() for d in study.directions]}")
    return study


class StoredStudy:
    """The study the executors drive: Optuna's ask/tell on an in-memory copy of `stored` (the sampler and pruner read
    trials without a database query), each finished trial then written to `stored` in one transaction
    (`add_trial`: its parameters, values, intermediate values, user attributes and times at once, instead of a
    commit per parameter) by a writer thread, while the next trial runs. Trials are written once finished (complete,
    pruned or failed, also when interrupted: `close` waits for every write), so the storage never holds a running
    one; another process sharing the study sees them as they finish, but this one's sampler sees only the trials
    stored when it started and its own."""

    def __init__(self, stored: Any, sampler: Any, pruner: Any) -> None:
        import queue
        import threading

        optuna = optuna_module()
        self.stored = stored
        self.live = optuna.create_study(sampler=sampler, pruner=pruner, directions=list(stored.directions))
        self.live.add_trials(stored.get_trials(deepcopy=False))
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._writer = threading.Thread(target=self._write, name="basin-search-storage", daemon=True)
        self._writer.start()

    def _write(self) -> None:
        while (frozen := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self.stored.add_trial(frozen)
                except Exception as err:  # kept for the driver: raised by the next tell or by close
                    self._error = err

    def _raise(self) -> None:
        if self._error is not None:
            first = " ".join(str(self._error).split())[:200]
            raise BasinError(f"the study's storage refused a trial ({first})")

    def ask(self) -> Any:
        return self.live.ask()

    def tell(self, trial: Any, values: Any = None, state: Any = None) -> Any:
        self._raise()
        frozen = self.live.tell(trial, values, state=state)
        self._queue.put(frozen)
        return frozen

    def close(self) -> None:
        """Wait until every finished trial is stored."""
        if self._writer.is_alive():
            self._queue.put(None)
            self._writer.join()
        self._raise()

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[Any]:
        return self.live.get_trials(deepcopy=deepcopy, states=states)

    def enqueue_trial(self, params: dict[str, Any], skip_if_exists: bool = False) -> None:
        self.live.enqueue_trial(params, skip_if_exists=skip_if_exists)


def fail_stale(study: Any) -> int:
    """Mark trials left RUNNING by an interrupted run as failed (they are rerun); how many."""
    optuna = optuna_module()
    stale = [t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))]
    for number in stale:
        study.tell(number, state=optuna.trial.TrialState.FAIL)
    return len(stale)


def finished(study: Any) -> int:
    """Trials that count towards --trials: completed or pruned."""
    optuna = optuna_module()
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def suggest(trial: Any, dims: list[Dimension]) -> dict[str, Any]:
    """label -> the trial's value for every dimension."""
    values: dict[str, Any] = {}
    for d in dims:
        if d.kind == "choice":
            values[d.label] = trial.suggest_categorical(d.label, list(d.choices))
        elif d.kind == "int":
            values[d.label] = trial.suggest_int(d.label, int(d.low), int(d.high), step=int(d.step or 1), log=d.log)
        else:
            values[d.label] = trial.suggest_float(d.label, d.low, d.high, step=d.step, log=d.log)
    return values
