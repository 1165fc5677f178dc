"""Model and task pools of a merge benchmark (the FusionBench layout: Tang et al. 2024, FusionBench).

A `ModelPool` holds the pretrained state of the merged part of a network (the "body") and one
fine-tuned state per task; a `TaskPool` holds every task's evaluation data, its validation split
for hyperparameter selection, a little training data for data-aware merges, and, where tasks have
their own heads, the head. A merged body is evaluated on task t as `head_t(body(x))`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from taxonomy.errors import BasinError

State = dict[str, torch.Tensor]
XY = tuple[torch.Tensor, torch.Tensor]


def accuracy_metric(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of `logits` [n, classes] against labels `y` [n]."""
    return float((logits.argmax(-1) == y).float().mean())


def state_fingerprint(states: Mapping[str, Mapping[str, torch.Tensor]]) -> str:
    """sha256 over the names, shapes, dtypes and bytes of several state dicts (cache keys)."""
    h = hashlib.sha256()
    for label in sorted(states):
        for name in sorted(states[label]):
            t = states[label][name].detach().contiguous().cpu()
            h.update(f"{label}/{name}/{tuple(t.shape)}/{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class ModelPool:
    """Pretrained body state `base`, fine-tuned body states `models[task]`, and `build()` -> a body module."""

    base: State
    models: dict[str, State]
    build: Callable[[], nn.Module]

    def __post_init__(self) -> None:
        if not self.models:
            raise BasinError("model pool: no fine-tuned models")
        names = set(self.base)
        for task, state in self.models.items():
            if set(state) != names:
                diff = sorted(names ^ set(state))[:3]
                raise BasinError(f"model pool: model {task!r} tensor names differ from the base's: {diff}")

    @classmethod
    def from_safetensors(cls, base: str | Path, models: Mapping[str, str | Path],
                         build: Callable[[], nn.Module]) -> ModelPool:
        """Load the base and fine-tuned body states from safetensors files."""
        return cls(load_state(base), {k: load_state(v) for k, v in models.items()}, build)

    def module(self, state: Mapping[str, torch.Tensor]) -> nn.Module:
        """A fresh body module holding `state` (eval mode)."""
        body = self.build()
        try:
            body.load_state_dict(dict(state))
        except RuntimeError as err:
            raise BasinError(f"model pool: state does not fit the body module ({str(err).splitlines()[0]})") from None
        return body.eval()

    def fingerprint(self) -> str:
        return state_fingerprint({"base": self.base, **{f"model:{k}": v for k, v in self.models.items()}})


class HeadedBody(nn.Module):
    """`body` followed by a task head that is hidden from `state_dict()` and `parameters()`.

    Data-aware merges and path evaluations then see only the shared body (keys prefixed `body.`),
    while losses and activations still come from the task's own head, whose shape may differ by task.
    """

    def __init__(self, body: nn.Module, head: nn.Module | None) -> None:
        super().__init__()
        self.body = body
        self._head = (head,)  # a tuple: not registered as a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        head = self._head[0]
        return self.body(x) if head is None else head(self.body(x))


@dataclass
class Task:
    """One task: test data, optional validation / training samples, optional head, and a metric."""

    name: str
    test: XY
    val: XY | None = None
    train: XY | None = None  # a small sample for data-aware merges (Fisher, RegMean)
    head: nn.Module | None = None
    metric: Callable[[torch.Tensor, torch.Tensor], float] = accuracy_metric

    def model(self, body: nn.Module) -> nn.Module:
        """The network evaluated on this task: the body followed by the task's head, if any."""
        return body if self.head is None else nn.Sequential(body, self.head).eval()

    @torch.no_grad()
    def logits(self, body: nn.Module, split: str = "test") -> torch.Tensor:
        x, _ = self.data(split)
        return self.model(body).eval()(x)

    def data(self, split: str) -> XY:
        xy = getattr(self, split)
        if xy is None:
            raise BasinError(f"task {self.name!r}: no {split!r} split")
        return xy

    def score(self, body: nn.Module, split: str = "test") -> float:
        return float(self.metric(self.logits(body, split), self.data(split)[1]))


@dataclass
class TaskPool:
    tasks: list[Task] = field(default_factory=list)

    def __post_init__(self) -> None:
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise BasinError(f"task pool: duplicate task names in {names}")

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def __getitem__(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise BasinError(f"task pool: no task {name!r}; tasks are {self.names}")

    def evaluate(self, body: nn.Module, split: str = "test") -> dict[str, float]:
        return {t.name: t.score(body, split) for t in self.tasks}

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for t in self.tasks:
            parts = {"test": t.test, "val": t.val, "train": t.train}
            for split, xy in parts.items():
                if xy is not None:
                    h.update(state_fingerprint({f"{t.name}/{split}": {"x": xy[0], "y": xy[1]}}).encode())
            if t.head is not None:
                h.update(state_fingerprint({f"{t.name}/head": t.head.state_dict()}).encode())
            h.update(getattr(t.metric, "__qualname__", repr(t.metric)).encode())
        return h.hexdigest()


def load_state(path: str | Path) -> State:
    """Every tensor of a local .safetensors file (headers checked by `merging.io.checkpoint.open_path`; no pickle)."""
    from merging.io.checkpoint import open_path

    path = Path(path)
    if not path.is_file():
        raise BasinError(f"{path}: no such safetensors file")
    if path.suffix != ".safetensors":
        raise BasinError(f"{path}: expected a .safetensors file")
    ckpt = open_path(path)
    return {name: ckpt.get(name).clone() for name in ckpt.names()}
