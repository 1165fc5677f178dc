"""Checkpoints as lazy, read-only mappings from tensor name to tensor.

`Checkpoint` is the one input type of the merge engine: names, shapes and dtypes come from
headers without reading data; `get(name)` reads one tensor on demand.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from taxonomy.errors import BasinError


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


class Checkpoint(ABC, Mapping):
    """Read-only lazy mapping name -> tensor.

    `label` names it in messages; `folder` is where config/tokenizer files live (None for
    in-memory checkpoints); `revision` is the resolved Hub commit, if any.
    """

    label: str = "checkpoint"
    folder: Path | None = None
    revision: str | None = None

    @abstractmethod
    def names(self) -> list[str]: ...

    @abstractmethod
    def meta(self, name: str) -> TensorMeta: ...

    @abstractmethod
    def get(self, name: str) -> torch.Tensor: ...

    # Mapping protocol
    def __getitem__(self, name: str) -> torch.Tensor:
        return self.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __contains__(self, name: object) -> bool:
        return name in set(self.names())

    def _missing(self, name: str) -> BasinError:
        return BasinError(f"{self.label}: no tensor named {name!r}")


class StateDictCheckpoint(Checkpoint):
    """A checkpoint over an in-memory state dict (or an nn.Module's state dict)."""

    def __init__(
        self, state: Mapping[str, torch.Tensor] | torch.nn.Module, label: str = "in-memory", folder: Path | None = None
    ):
        if isinstance(state, torch.nn.Module):
            state = state.state_dict()
        self._state = dict(state)
        self.label = label
        self.folder = folder

    def names(self) -> list[str]:
        return list(self._state)

    def meta(self, name: str) -> TensorMeta:
        if name not in self._state:
            raise self._missing(name)
        t = self._state[name]
        return TensorMeta(tuple(t.shape), t.dtype)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._state:
            raise self._missing(name)
        return self._state[name].detach()
