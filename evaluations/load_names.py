"""Stored tensor names versus a transformers model's own: what transformers' loader maps on the way in.

Transformers (version 5) keeps a conversion mapping per model class (`transformers.conversion_mapping`): renamings
(GPT-NeoX's stored `embed_out.` is the model's `lm_head.`; older checkpoints' `LayerNorm.gamma`/`.beta`; Mixtral's
`block_sparse_moe.` is `mlp.`) and converters that fuse several stored tensors into one (Mixtral's per-expert
`experts.N.w1`/`w3` stacked over N and concatenated into `experts.gate_up_proj`, `w2` stacked into `down_proj`).
`load_renames` gives the renamings, model name -> stored name, so a model tensor is read by its stored name;
`fused_view` wraps a checkpoint whose tensors the model fuses so that it offers the fused tensors under the model's
names (assembled from the memory-mapped parts when read, one tensor at a time), and hides the parts. Converters
built from other operations than stacking and concatenation are left out (their tensors then stay missing, a
one-line error naming one part). Before transformers 5 there is no mapping and names are read as stored.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

import torch
from torch import nn

from merging.io.checkpoint import Checkpoint, TensorMeta


def _transforms(model: nn.Module) -> list:
    """transformers' load-time transforms of `model`'s class; none for other modules (without importing
    transformers: a plain torch model never pays for it)."""
    if "transformers" not in sys.modules:
        return []
    try:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping

        if not isinstance(model, PreTrainedModel):
            return []

        return list(get_model_conversion_mapping(model))
    except (ImportError, AttributeError, TypeError):  # pragma: no cover - transformers < 5
        return []


def _renaming(transform: object) -> bool:
    try:
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # pragma: no cover - transformers < 5
        return False
    return type(transform) is WeightRenaming


@dataclass(frozen=True)
class _Match:
    key: str  # the name after the renamings before the converter (if any)
    converter: object | None  # the converter that takes the tensor, if any


def _match(transforms: list, name: str) -> _Match:
    """The stored `name` through the transforms in order: renamed, until a converter takes it."""
    key = name
    for transform in transforms:
        new, matched = transform.rename_source_key(key)
        if matched is None:
            continue
        if not _renaming(transform):
            return _Match(key, transform)
        key = new
    return _Match(key, None)


def load_renames(model: nn.Module, names: set[str]) -> tuple[dict[str, str], list[str]]:
    """(model name -> stored name, for the stored `names` transformers renames on load; the stored names a
    converter takes, sorted)."""
    transforms = _transforms(model)
    renamed: dict[str, str] = {}
    fused: list[str] = []
    for name in sorted(names):
        m = _match(transforms, name)
        if m.converter is not None:
            fused.append(name)
        elif m.key != name:
            renamed[m.key] = name
    return renamed, fused


@dataclass(frozen=True)
class _Fused:
    """One model tensor made from stored parts: per source pattern, the parts in index order, each stack
    `stack_dim`, the stacks concatenated along `cat_dim` (None: one source pattern, no concatenation)."""

    parts: tuple[tuple[str, ...], ...]
    stack_dim: int
    cat_dim: int | None


def _plan(converter: object) -> tuple[int, int | None] | None:
    """(stack dim, concatenation dim) of a converter made of MergeModulelist [+ Concatenate], else None."""
    ops = list(getattr(converter, "operations", []) or [])
    kinds = [type(op).__name__ for op in ops]
    if kinds == ["MergeModulelist"]:
        return ops[0].dim, None
    if kinds == ["MergeModulelist", "Concatenate"] and len(converter.source_patterns) > 1:
        return ops[0].dim, ops[1].dim
    return None


def _index_pattern(pattern: str) -> re.Pattern:
    return re.compile(re.escape(pattern).replace(r"\*", r"(\d+)"))


def _fusions(model: nn.Module, names: list[str]) -> dict[str, _Fused]:
    """model name -> how to assemble it, for the stored `names` that stack-and-concatenate converters take."""
    transforms = _transforms(model)
    groups: dict[tuple[str, int], dict[int, dict[int, str]]] = {}
    converters: dict[str, object] = {}
    for name in names:
        m = _match(transforms, name)
        if m.converter is None or _plan(m.converter) is None:
            continue
        target, _ = m.converter.rename_source_key(m.key)
        for p, pattern in enumerate(m.converter.source_patterns):
            found = _index_pattern(pattern).search(m.key)
            if found:
                groups.setdefault((target, id(m.converter)), {}).setdefault(p, {})[int(found.group(1))] = name
                converters[target] = m.converter
                break
    out: dict[str, _Fused] = {}
    for (target, _), by_pattern in groups.items():
        converter = converters[target]
        stack_dim, cat_dim = _plan(converter)
        if sorted(by_pattern) != list(range(len(converter.source_patterns))):
            continue  # a source pattern has no parts: leave it to the missing-tensor error
        indices = [sorted(parts) for parts in by_pattern.values()]
        if any(ix != list(range(len(ix))) or ix != indices[0] for ix in indices):
            continue  # gaps in the expert indices, or patterns disagreeing
        out[target] = _Fused(tuple(tuple(by_pattern[p][i] for i in indices[0]) for p in sorted(by_pattern)),
                             stack_dim, cat_dim)
    return out


class FusedView(Checkpoint):
    """`ckpt` with the tensors `fusions` assembles offered under the model's names, their parts hidden."""

    def __init__(self, ckpt: Checkpoint, fusions: dict[str, _Fused]):
        self.ckpt, self.fusions = ckpt, fusions
        self.label, self.folder = ckpt.label, ckpt.folder
        self.revision, self.repo_id = ckpt.revision, ckpt.repo_id
        hidden = {part for f in fusions.values() for parts in f.parts for part in parts}
        self._names = [n for n in ckpt.names() if n not in hidden] + list(fusions)

    def names(self) -> list[str]:
        return list(self._names)

    def meta(self, name: str) -> TensorMeta:
        f = self.fusions.get(name)
        if f is None:
            return self.ckpt.meta(name)
        first = self.ckpt.meta(f.parts[0][0])
        shape = list(first.shape)
        shape.insert(f.stack_dim, len(f.parts[0]))
        if f.cat_dim is not None:
            shape[f.cat_dim] = sum(
                _stacked_size(self.ckpt.meta(parts[0]).shape, len(parts), f.stack_dim, f.cat_dim) for parts in f.parts)
        return TensorMeta(tuple(shape), first.dtype)

    def get(self, name: str) -> torch.Tensor:
        return self.rows(name, 0, None)

    def rows(self, name: str, start: int, stop: int | None) -> torch.Tensor:
        """Rows `start:stop` of tensor `name` (a fused tensor stacked along dim 0 reads only those parts)."""
        f = self.fusions.get(name)
        if f is None:
            t = self.ckpt.get(name)
            return t if stop is None or t.dim() == 0 else t[start:stop]
        if f.stack_dim == 0:
            chosen = [parts[start:stop] for parts in f.parts]
            return self._assemble(chosen, f)
        t = self._assemble(list(f.parts), f)
        return t if stop is None else t[start:stop]

    def _assemble(self, parts: list[tuple[str, ...]], f: _Fused) -> torch.Tensor:
        stacks = [torch.stack([self.ckpt.get(p) for p in group], dim=f.stack_dim) for group in parts]
        return stacks[0] if f.cat_dim is None else torch.cat(stacks, dim=f.cat_dim)


def _stacked_size(part_shape: tuple[int, ...], count: int, stack_dim: int, cat_dim: int) -> int:
    shape = list(part_shape)
    shape.insert(stack_dim, count)
    return shape[cat_dim]


def fused_view(model: nn.Module, ckpt: Checkpoint) -> Checkpoint:
    """`ckpt` itself, or a `FusedView` where the model fuses some of its tensors on load."""
    if isinstance(ckpt, FusedView):
        return ckpt
    names = set(ckpt.names())
    own = set(model.state_dict())
    fusions = _fusions(model, sorted(names - own))
    return FusedView(ckpt, fusions) if fusions else ckpt
