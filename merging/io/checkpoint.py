"""Checkpoints as lazy, read-only mappings from tensor name to tensor.

`Checkpoint` is the one input type of the merge engine: names, shapes and dtypes come from
headers without reading data; `get(name)` reads one tensor on demand.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from merging.io.references import split_adapter
from taxonomy.errors import BasinError, CheckpointError


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
    repo_id: str | None = None

    @abstractmethod
    def names(self) -> list[str]: ...

    @abstractmethod
    def meta(self, name: str) -> TensorMeta: ...

    @abstractmethod
    def get(self, name: str) -> torch.Tensor:
        """One tensor. It may share memory with its source (a copy-on-write file mapping for safetensors,
        holding an open file descriptor while alive): `.clone()` tensors you keep many of."""

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


INDEX_NAME = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def open_checkpoint(ref: object, *, allow_pickle: bool = False, label: str | None = None) -> Checkpoint:
    """Open a checkpoint lazily from any supported reference.

    - a `Checkpoint` (returned as is), a state dict or an `nn.Module` (in memory);
    - a `.safetensors` file, or a folder with `model.safetensors` or sharded files plus
      `model.safetensors.index.json` (shard paths may not leave the folder);
    - a Hub id `org/name[@revision]` (see `merging.io.hub.resolve`);
    - `base+adapter` (mergekit's `model+lora`): the base with a PEFT LoRA adapter folded in;
    - `pytorch_model.bin` only with `allow_pickle=True` (then `torch.load(weights_only=True)`).
    """
    if isinstance(ref, Checkpoint):
        return ref
    if isinstance(ref, (torch.nn.Module, Mapping)):
        return StateDictCheckpoint(ref, label=label or "in-memory")
    if not isinstance(ref, (str, Path)):
        raise CheckpointError(f"cannot open a checkpoint from a {type(ref).__name__}")
    text = str(ref)
    base_ref, adapter_ref = split_adapter(text)
    if adapter_ref is not None:
        return _open_lora(base_ref, adapter_ref, allow_pickle=allow_pickle)
    from merging.io.hub import resolve

    resolved = resolve(text, allow_pickle=allow_pickle)
    return open_path(resolved.path, allow_pickle=allow_pickle, label=label or text, revision=resolved.revision,
                     repo_id=resolved.repo_id)


def open_path(path: Path, *, allow_pickle: bool = False, label: str | None = None, revision: str | None = None,
              repo_id: str | None = None) -> Checkpoint:
    """Open a local `.safetensors` / `.bin` file or an HF-format folder."""
    from merging.io.safetensors_format import SafetensorsCheckpoint

    label = label or str(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix == ".safetensors":
            ckpt: Checkpoint = SafetensorsCheckpoint([path], label, folder=path.parent, revision=revision)
        elif path.suffix in (".bin", ".pt", ".pth"):
            ckpt = _open_pickle(path, allow_pickle, label)
        else:
            raise CheckpointError(f"{path}: expected a .safetensors file or a model folder")
        ckpt.repo_id = repo_id
        return ckpt
    index = path / INDEX_NAME
    if index.is_file():
        weight_map = _read_index(index)
        files = sorted(set(weight_map.values()))
        ckpt = SafetensorsCheckpoint(files, label, folder=path, revision=revision, weight_map=weight_map)
    elif (path / "model.safetensors").is_file():
        ckpt = SafetensorsCheckpoint([path / "model.safetensors"], label, folder=path, revision=revision)
    elif (path / "pytorch_model.bin").is_file():
        ckpt = _open_pickle(path / "pytorch_model.bin", allow_pickle, label)
        ckpt.folder, ckpt.revision = path, revision
    elif (path / "pytorch_model.bin.index.json").is_file():
        raise CheckpointError(
            f"{path}: sharded pytorch_model*.bin checkpoints are not supported; convert to safetensors")
    else:
        found = sorted(p.name for p in path.iterdir())[:8]
        raise CheckpointError(f"{path}: no model.safetensors or {INDEX_NAME} in this folder (found {found})")
    ckpt.repo_id = repo_id
    return ckpt


def _read_index(index: Path) -> dict[str, Path]:
    """name -> shard path from `model.safetensors.index.json`; each shard named relative to the folder, inside it.

    A shard may be a symbolic link that resolves inside the folder or, for a Hub-cache snapshot
    (`models--org--name/snapshots/<commit>/`), inside that repository's `models--org--name/blobs/`:
    the cache's normal layout. Anything else escapes the checkpoint and is refused.
    """
    import json

    try:
        data = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, OSError):
        data = None
    raw_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(raw_map, dict) or not raw_map:
        raise CheckpointError(f"{index}: not a valid index (expected a JSON object with a non-empty 'weight_map')")
    roots = _shard_roots(index.parent)
    out: dict[str, Path] = {}
    for name, shard in raw_map.items():
        out[name] = _shard_path(index, roots, name, shard)
    return out


def _shard_roots(folder: Path) -> list[Path]:
    """Where a shard may resolve to: the folder, and its Hub-cache repository's blobs/ for a snapshot folder."""
    root = folder.resolve()
    roots = [root]
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith(("models--", "datasets--")):
        roots.append(root.parent.parent / "blobs")
    return roots


def _shard_path(index: Path, roots: list[Path], name: str, shard: object) -> Path:
    """One weight_map entry checked: a relative file name (no NUL, no `..`) resolving inside `roots`."""
    if not isinstance(shard, str) or not shard or "\0" in shard or "\0" in name:
        raise CheckpointError(f"{index}: tensor {name[:80]!r} has shard {str(shard)[:80]!r}; expected a file name")
    path = Path(shard)
    target = (index.parent / path).resolve()
    lexical = not path.is_absolute() and ".." not in path.parts
    if not lexical or not any(target.is_relative_to(r) for r in roots):
        raise CheckpointError(f"{index}: shard path {shard!r} of tensor {name!r} escapes the checkpoint folder")
    return index.parent / path


def _open_pickle(path: Path, allow_pickle: bool, label: str) -> Checkpoint:
    if not allow_pickle:
        raise CheckpointError(
            f"{path}: PyTorch pickle checkpoints can run code when loaded; refused. Convert it to safetensors, "
            "or pass --allow-pickle (allow_pickle=True) to load it with torch.load(weights_only=True)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot load with torch.load(weights_only=True): {err}") from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: does not hold a flat state dict of tensors")
    return StateDictCheckpoint(state, label=label, folder=path.parent)


def _open_lora(base_ref: str, adapter_ref: str, *, allow_pickle: bool) -> Checkpoint:
    base = open_checkpoint(base_ref, allow_pickle=allow_pickle)
    adapter = Path(adapter_ref)
    if not adapter.exists():
        from merging.io.hub import resolve

        adapter = resolve(adapter_ref, allow_pickle=allow_pickle).path
    try:
        from merging.io.lora import open_lora
    except ImportError:
        raise CheckpointError(f"{base_ref}+{adapter_ref}: LoRA adapters are not available in this build") from None
    return open_lora(base, adapter)


class HeaderCheckpoint(Checkpoint):
    """Names, shapes and dtypes only (e.g. read from the Hub before downloading): for validation."""

    def __init__(self, metas: dict[str, TensorMeta], label: str):
        self._metas = dict(metas)
        self.label = label

    def names(self) -> list[str]:
        return list(self._metas)

    def meta(self, name: str) -> TensorMeta:
        if name not in self._metas:
            raise self._missing(name)
        return self._metas[name]

    def get(self, name: str) -> torch.Tensor:
        raise CheckpointError(f"{self.label}: headers only, tensor data is not available here")


def read_config(ckpt: Checkpoint) -> dict[str, Any] | None:
    """The checkpoint's config.json (None without a folder or file); a broken file is an error."""
    cached = getattr(ckpt, "_basin_config", False)
    if cached is not False:
        return cached
    config = None
    folder = getattr(ckpt, "folder", None)
    if folder is not None and (folder / "config.json").is_file():
        path = folder / "config.json"
        try:
            config = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            raise BasinError(f"{path}: not valid JSON") from None
        if not isinstance(config, dict):
            raise BasinError(f"{path}: expected a JSON object")
    try:
        ckpt._basin_config = config  # type: ignore[attr-defined]
    except AttributeError:
        pass
    return config
