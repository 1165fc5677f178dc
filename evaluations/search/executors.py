"""Where trials run: in this process, or on Ray actors driven by Optuna's ask/tell.

Why ask/tell over Ray actors rather than Ray Tune: the study (sampler, pruner, storage) stays in the driver, so
the SQLite file needs no shared filesystem and the sampler is the very one the local executor uses; each actor
is a long-lived worker that opens the inputs, builds the live model and tokenises the data once, then runs trial
after trial (Ray Tune would start a trainable per trial, or need its reuse machinery, and keep its own trial
records beside Optuna's). A trial's values depend only on its parameters, so Ray and local agree trial by trial.
Pruning works on both: locally the pruner is asked after each chunk of the loss inside the trial; on Ray the worker
pauses after each chunk (`TrialRunner.steps`, a generator), the driver reports the partial loss to the trial and
asks the pruner, then resumes the worker or drops the trial (one round trip per chunk; which trials are pruned
depends on the order trials finish in, so it is not repeatable across runs the way local pruning is).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from evaluations.search.study import finished, optuna_module, suggest
from evaluations.search.trials import Pruned, TrialRunner, TrialSetup
from merging.recipe.search_space import Dimension
from taxonomy.errors import BasinError

Record = Callable[[Any, dict[str, Any]], None]  # record(trial, result): user attributes before `tell`


def _tell_result(study: Any, trial: Any, result: dict[str, Any], started: float, record: Record) -> None:
    result["wall_seconds"] = time.perf_counter() - started
    record(trial, result)
    study.tell(trial, result["values"])


@dataclass
class LocalTrials:
    """Trials one after another in this process, with pruning after each chunk of the data."""

    runner: TrialRunner
    name: str = "local"

    def run(self, study: Any, dims: list[Dimension], total: int, record: Record, prune: bool) -> None:
        optuna = optuna_module()
        done = finished(study)
        while done < total:
            started = time.perf_counter()
            trial = study.ask()
            values = suggest(trial, dims)
            try:
                result = self.runner.run(values, _reporter(trial) if prune else None)
            except Pruned:
                trial.set_user_attr("basin", {"wall_seconds": time.perf_counter() - started})
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                done += 1
                continue
            except BaseException:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                raise
            _tell_result(study, trial, result, started, record)
            done += 1

    def suite_report(self, values: dict[str, Any]) -> dict[str, Any]:
        return self.runner.suite_report(values)


def _reporter(trial: Any) -> Callable[[int, float], bool]:
    def report(step: int, value: float) -> bool:
        trial.report(value, step)
        return bool(trial.should_prune())

    return report


class _Worker:
    """A Ray actor's state: one TrialRunner and the trial it is scoring chunk by chunk (pruning: `begin`, then
    `resume` while the driver's pruner lets it go on, or `abort`); errors come back as values (one line), never as
    Ray tracebacks."""

    def __init__(self, setup: TrialSetup, threads: int | None) -> None:
        self.setup, self.threads, self.runner = setup, threads, None
        self.steps: Any = None

    def ready(self) -> str | None:
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            self.runner = TrialRunner(self.setup)
        except BasinError as err:
            return str(err)
        return None

    def run(self, values: dict[str, Any]) -> dict[str, Any]:
        try:
            return self.runner.run(values)
        except BasinError as err:
            return {"error": str(err)}

    def begin(self, values: dict[str, Any], partial: bool) -> dict[str, Any]:
        """Start a trial: with `partial`, run it to its first partial loss ({"step", "value"}) or its end."""
        if not partial:
            return self.run(values)
        self.abort()
        self.steps = self.runner.steps(values)
        return self.resume()

    def resume(self) -> dict[str, Any]:
        """Run the trial on to its next partial loss or its end (its result)."""
        try:
            step, value = next(self.steps)
            return {"step": step, "value": value}
        except StopIteration as stop:
            self.steps = None
            return stop.value
        except BasinError as err:
            self.steps = None
            return {"error": str(err)}

    def abort(self) -> None:
        """Drop the trial being scored (pruned)."""
        if self.steps is not None:
            self.steps.close()
            self.steps = None

    def suite_report(self, values: dict[str, Any]) -> dict[str, Any]:
        try:
            return self.runner.suite_report(values)
        except BasinError as err:
            return {"error": str(err)}


def check_address(address: str | None) -> None:
    """A `host:port` (or `ray://host:port`) Ray address must accept a TCP connection (3 s), else a one-line error."""
    if address in (None, "", "auto", "local"):
        return
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise BasinError(f"--address {address!r}: expected host:port (or ray://host:port, or auto)")
    try:
        with socket.create_connection((host, int(port)), timeout=3):
            pass
    except OSError as err:
        raise BasinError(f"--address {address}: cannot reach a Ray cluster ({err.strerror or err})") from None


def init_ray(address: str | None, num_cpus: int | None = None) -> Any:
    try:
        import ray
    except ImportError:
        raise BasinError("--executor ray needs Ray: pip install 'basin[ray]'") from None
    check_address(address)
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address in (None, "", "local"):
            kwargs["num_cpus"] = num_cpus
        else:
            kwargs["address"] = address
        try:
            ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise BasinError(f"--address {address}: cannot connect to Ray ({' '.join(str(err).split())[:200]})"
                             ) from None
    return ray


@dataclass
class RayTrials:
    """Trials on `workers` Ray actors (each `num_cpus` CPUs, torch using as many threads), ask/tell in the driver."""

    setup: TrialSetup
    workers: int = 2
    address: str | None = None
    num_cpus: int = 1
    name: str = "ray"

    def start(self) -> None:
        """Start the actors and build each one's runner (inputs, model, data): errors before any trial."""
        ray = init_ray(self.address, None)
        actor = ray.remote(num_cpus=self.num_cpus)(_Worker)
        self.actors = [actor.remote(self.setup, self.num_cpus) for _ in range(self.workers)]
        for problem in ray.get([a.ready.remote() for a in self.actors]):
            if problem:
                raise BasinError(problem)

    def run(self, study: Any, dims: list[Dimension], total: int, record: Record, prune: bool) -> None:
        """Keep every worker busy until `total` trials are finished. With `prune`, a worker stops after each chunk
        of the loss: the driver reports it to the trial and either resumes the worker or prunes the trial."""
        import ray

        optuna = optuna_module()
        idle, pending = list(self.actors), {}
        done = finished(study)
        try:
            while pending or (idle and done < total):
                while idle and done + len(pending) < total:
                    started = time.perf_counter()
                    trial = study.ask()
                    worker = idle.pop()
                    pending[worker.begin.remote(suggest(trial, dims), prune)] = (trial, worker, started)
                ready, _ = ray.wait(list(pending), num_returns=1)
                entry = pending.pop(ready[0])
                result = ray.get(ready[0])
                if "step" in result and not self._pruned(study, entry, result):
                    pending[entry[1].resume.remote()] = entry
                    continue
                idle.append(entry[1])
                done += 1
                if "step" not in result:
                    self._finish(study, entry, result, record)
        finally:
            for trial, _, _ in pending.values():
                study.tell(trial, state=optuna.trial.TrialState.FAIL)

    @staticmethod
    def _pruned(study: Any, entry: tuple[Any, Any, float], partial: dict[str, Any]) -> bool:
        """Report a partial loss to its trial; when the pruner stops it, the worker drops it and it is told pruned."""
        trial, worker, started = entry
        trial.report(partial["value"], partial["step"])
        if not trial.should_prune():
            return False
        worker.abort.remote()
        trial.set_user_attr("basin", {"wall_seconds": time.perf_counter() - started})
        study.tell(trial, state=optuna_module().trial.TrialState.PRUNED)
        return True

    def _finish(self, study: Any, entry: tuple[Any, Any, float], result: dict[str, Any], record: Record) -> None:
        trial, worker, started = entry
        if "error" in result:
            study.tell(trial, state=optuna_module().trial.TrialState.FAIL)
            raise BasinError(result["error"])
        result["worker"] = self.actors.index(worker)
        _tell_result(study, trial, result, started, record)

    def suite_report(self, values: dict[str, Any]) -> dict[str, Any]:
        import ray

        out = ray.get(self.actors[0].suite_report.remote(values))
        if "error" in out:
            raise BasinError(out["error"])
        return out

    def stop(self) -> None:
        import ray

        for a in getattr(self, "actors", []):
            ray.kill(a)
        self.actors = []
