"""Where benchmark cells run: in this process (`Local`) or as Ray tasks on a cluster (`Ray`).

An executor maps `fn(suite, cell)` over cells and yields `(index, result)` as cells finish; the
harness caches each result as it arrives, so an interrupted run keeps its completed cells.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from taxonomy.errors import BasinError

CellFn = Callable[[Any, Any], Any]


@dataclass
class Local:
    """Run cells one after another in this process; with `workers` > 1, `harness.run_seeds` runs the seeds'
    training and cells on that many worker processes instead (`evaluations.bench.parallel`: the same results)."""

    workers: int = 1
    name: str = "local"

    def map(self, fn: CellFn, suite: Any, cells: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        for i, cell in enumerate(cells):
            yield i, fn(suite, cell)


@dataclass
class Ray:
    """Run cells as Ray tasks on the cluster `ray.init(address)` connects to (a local one when None).

    The suite is put in the object store once; each cell asks for `num_cpus` CPUs. A Ray session
    started here is left running (the caller may reuse it); `ray.shutdown()` ends it.
    """

    address: str | None = None
    num_cpus: float = 1
    init_kwargs: dict[str, Any] = field(default_factory=dict)
    name: str = "ray"

    def map(self, fn: CellFn, suite: Any, cells: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        try:
            import ray
        except ImportError:
            raise BasinError("--executor ray needs Ray: pip install 'basin[ray]'") from None
        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, **self.init_kwargs)
        suite_ref = ray.put(suite)
        remote = ray.remote(num_cpus=self.num_cpus)(fn)
        pending = {remote.remote(suite_ref, cell): i for i, cell in enumerate(cells)}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            yield pending.pop(done[0]), ray.get(done[0])


def make_executor(name: str, address: str | None = None, workers: int = 1) -> Local | Ray:
    if name == "local":
        if workers < 1:
            raise BasinError(f"--workers: give a positive number of worker processes, got {workers}")
        return Local(workers)
    if name == "ray":
        return Ray(address=address)
    raise BasinError(f"--executor: unknown executor {name!r}; choose local or ray")
