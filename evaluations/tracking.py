"""Tracking a model through training, and parent-child spawning (Fort et al. 2020, Sec. 2-4; Frankle et al. 2020).

`Tracker.record(model, epoch)` (called by the user's loop) measures on a fixed probe set: weight
distance from init and from the previous record, function-space distance (mean squared
difference of softmax outputs), kernel distance and velocity (trace NTK), top Hessian eigenvalue,
error barrier (Frankle's form) to earlier checkpoints (all of them, the previous one, or a chosen set
of epochs: `barrier_to`), and NTK-regression accuracy.
`spawn` trains a parent to time t, copies it into children trained on with different data
orders, and returns the children and the error barrier between them.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from evaluations.probes import HessianOperator, kernel_distance, lanczos
from evaluations.probes.linearize import ntk_regression
from evaluations.probes.ntk import empirical_ntk_result
from merging.io.atomic import atomic_write, atomic_write_text
from merging.reductions import distance64
from taxonomy.errors import BasinError


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def error_barrier(model_a: nn.Module, model_b: nn.Module, data, alphas: int = 30) -> float:
    """Frankle et al.'s instability: max error over `alphas` evenly spaced points minus the endpoints' mean."""
    from evaluations.landscape import barrier, evaluate_path, linear_path

    result = evaluate_path(model_a, linear_path(model_a, model_b), data, alphas=alphas)
    return barrier(result, kind="error", form="frankle").value


@dataclass
class Record:
    epoch: float
    weight_from_init: float
    weight_from_prev: float
    function_from_prev: float | None = None
    kernel_from_init: float | None = None
    kernel_velocity: float | None = None
    top_eigenvalue: float | None = None
    top_eigenvalue_converged: bool | None = None
    barrier_to_prev: float | None = None
    ntk_accuracy: float | None = None
    extra: dict = field(default_factory=dict)
    barriers_to_earlier: dict[str, float] = field(default_factory=dict)  # earlier epoch (as "%g") -> error barrier


def _key(epoch: float) -> str:
    return f"{epoch:g}"


@dataclass
class Tracker:
    """Records probes each time `record` is called; `probe` is an (x, y) set, `train`/`test` for NTK regression.

    `barrier_to`: the earlier checkpoints each record measures its error barrier to: "all" (default), "prev"
    (the previous record only), or a sequence of epochs (those among the earlier records). Snapshots of the
    checkpoints that later records still need are kept in memory.
    """

    probe: tuple[torch.Tensor, torch.Tensor]
    train: tuple[torch.Tensor, torch.Tensor] | None = None
    test: tuple[torch.Tensor, torch.Tensor] | None = None
    hessian: bool = True
    barriers: bool = True
    checkpoint_dir: str | None = None
    records: list[Record] = field(default_factory=list)
    barrier_to: str | Sequence[float] = "all"
    barrier_alphas: int = 30

    def __post_init__(self):
        if isinstance(self.barrier_to, str) and self.barrier_to not in ("all", "prev"):
            raise BasinError(f"Tracker.barrier_to: expected 'all', 'prev' or a sequence of epochs, got "
                             f"{self.barrier_to!r}")
        self._init = None
        self._prev = None
        self._prev_kernel = None
        self._init_kernel = None
        self._prev_out = None
        self._snapshots: list[tuple[float, nn.Module]] = []  # earlier checkpoints kept for barriers

    def _targets(self, epoch: float) -> list[tuple[float, nn.Module]]:
        """The earlier snapshots the record at `epoch` measures its barrier to."""
        if self.barrier_to == "all":
            return list(self._snapshots)
        if self.barrier_to == "prev":
            return self._snapshots[-1:]
        wanted = {_key(e) for e in self.barrier_to}
        return [(e, m) for e, m in self._snapshots if _key(e) in wanted]

    def _keep(self, epoch: float, snapshot: nn.Module) -> None:
        self._snapshots.append((epoch, snapshot))
        if self.barrier_to == "prev":
            self._snapshots = self._snapshots[-1:]
        elif self.barrier_to != "all":
            wanted = {_key(e) for e in self.barrier_to}
            self._snapshots = [(e, m) for e, m in self._snapshots if _key(e) in wanted or e == epoch]

    def record(self, model: nn.Module, epoch: float) -> Record:
        x, y = self.probe
        w = _flat(model)
        snapshot = copy.deepcopy(model).eval()
        if self._init is None:
            self._init = (w, epoch)
        prev = self._prev
        rec = Record(epoch, distance64(w, self._init[0]), distance64(w, prev[0]) if prev else 0.0)
        with torch.no_grad():
            out = torch.softmax(snapshot(x), -1)
        ntk = empirical_ntk_result(snapshot, x, kind="trace")
        kernel = ntk.kernel
        if ntk.fallbacks:  # layers the structured rule left to the Jacobian method, and why
            rec.extra["ntk_fallbacks"] = ntk.fallbacks
        if self._init_kernel is None:
            self._init_kernel = kernel
        rec.kernel_from_init = kernel_distance(self._init_kernel, kernel)
        if prev is not None:
            dt = epoch - prev[1]
            rec.function_from_prev = float(((out - self._prev_out) ** 2).sum(-1).mean())
            rec.kernel_velocity = kernel_distance(self._prev_kernel, kernel) / dt if dt > 0 else None
        if self.barriers:
            for earlier, other in self._targets(epoch):
                rec.barriers_to_earlier[_key(earlier)] = error_barrier(other, snapshot, self.probe,
                                                                       alphas=self.barrier_alphas)
            if prev is not None:  # always measured, whether or not the previous epoch is among `barrier_to`
                rec.barrier_to_prev = rec.barriers_to_earlier.get(_key(prev[1]))
                if rec.barrier_to_prev is None:
                    rec.barrier_to_prev = error_barrier(prev[2], snapshot, self.probe, alphas=self.barrier_alphas)
            self._keep(epoch, snapshot)
        if self.hessian:
            eig = lanczos(HessianOperator(snapshot, nn.CrossEntropyLoss(), self.probe), k=1, tol=1e-3)
            rec.top_eigenvalue, rec.top_eigenvalue_converged = float(eig.values[0]), bool(eig.converged)
        if self.train is not None and self.test is not None:
            rec.ntk_accuracy = ntk_regression(snapshot, *self.train, *self.test).accuracy
        if self.checkpoint_dir:
            Path(self.checkpoint_dir).mkdir(parents=True, exist_ok=True)
            state = snapshot.state_dict()
            atomic_write(Path(self.checkpoint_dir) / f"epoch_{epoch:g}.pt", lambda tmp: torch.save(state, tmp))
        self._prev, self._prev_kernel, self._prev_out = (w, epoch, snapshot), kernel, out
        self.records.append(rec)
        return rec

    def barrier_matrix(self) -> tuple[list[float], list[list[float | None]]]:
        """(epochs, M) with M[i][j] the error barrier between the records at epochs i and j (None: not measured)."""
        epochs = [r.epoch for r in self.records]
        index = {_key(e): i for i, e in enumerate(epochs)}
        matrix: list[list[float | None]] = [[0.0 if i == j else None for j in epochs] for i in epochs]
        for i, rec in enumerate(self.records):
            for key, value in rec.barriers_to_earlier.items():
                j = index[key]
                matrix[i][j] = matrix[j][i] = value
        return epochs, matrix

    def to_json(self) -> dict:
        epochs, matrix = self.barrier_matrix()
        return {"records": [asdict(r) for r in self.records], "barrier_matrix": {"epochs": epochs, "barriers": matrix}}

    def save(self, path: str) -> None:
        atomic_write_text(path, json.dumps(self.to_json(), indent=2))


def train_epochs(model: nn.Module, opt: torch.optim.Optimizer, x, y, epochs: float, batch_size: int,
                 gen: torch.Generator, start: float = 0.0, decay_to: float | None = None) -> None:
    """SGD-style training for `epochs` (fractional allowed) epochs, batch order from `gen`.

    With `decay_to` (an epoch), the learning rate decays linearly from its initial value (at epoch 0)
    to 0 at that epoch; `start` is the epoch this call begins at.
    """
    loss_fn = nn.CrossEntropyLoss()
    steps_per_epoch = -(-len(x) // batch_size)
    steps = int(round(epochs * steps_per_epoch))
    model.train()
    order = torch.empty(0, dtype=torch.long)
    for group in opt.param_groups:
        group.setdefault("initial_lr", group["lr"])
    for step in range(steps):
        if decay_to:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * max(0.0, 1 - (start + step / steps_per_epoch) / decay_to)
        if len(order) == 0:
            order = torch.randperm(len(x), generator=gen)
        idx, order = order[:batch_size], order[batch_size:]
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
    model.eval()


@dataclass
class SpawnResult:
    spawn_epoch: float
    barrier: float
    child_errors: list[float]
    children: list[nn.Module] = field(repr=False, default_factory=list)

    def to_json(self) -> dict:
        return {"spawn_epoch": self.spawn_epoch, "barrier": self.barrier, "child_errors": self.child_errors}


def spawn(make_model, train, test, spawn_epoch: float, total_epochs: float, children: int = 2, lr: float = 0.05,
          momentum: float = 0.9, batch_size: int = 64, seed: int = 0, parent: nn.Module | None = None,
          alphas: int = 30, decay: bool = False) -> SpawnResult:
    """Train a parent (from `make_model()` or `parent`) for `spawn_epoch` epochs, copy it (with optimizer state)
    into `children` that train to `total_epochs` with different batch orders; barrier between the first two.
    `decay`: the learning rate decays linearly to 0 at `total_epochs` (parent and children share the schedule)."""
    x, y = train
    model = parent if parent is not None else make_model()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    horizon = total_epochs if decay else None
    train_epochs(model, opt, x, y, spawn_epoch, batch_size, torch.Generator().manual_seed(seed), 0.0, horizon)
    kids = []
    for k in range(children):
        child = copy.deepcopy(model)
        child_opt = torch.optim.SGD(child.parameters(), lr=lr, momentum=momentum)
        child_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        train_epochs(child, child_opt, x, y, total_epochs - spawn_epoch, batch_size,
                     torch.Generator().manual_seed(seed + 1000 * (k + 1)), spawn_epoch, horizon)
        kids.append(child)
    xt, yt = test
    errors = [float((c(xt).argmax(-1) != yt).float().mean()) for c in kids]
    value = error_barrier(kids[0], kids[1], test, alphas=alphas) if children >= 2 else 0.0
    return SpawnResult(spawn_epoch, value, errors, kids)
