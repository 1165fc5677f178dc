"""Permutation specs: which weight axes share a permutation of hidden units.

As in Ainsworth et al. 2023 (Git Re-Basin, section 3), a spec maps every parameter name to a
tuple with one entry per axis: the name of the permutation group acting on that axis, or None.
A group of size n may act on an axis of length n * k; it then permutes k-wide contiguous blocks
(attention heads of width head_dim, channels flattened with their k spatial positions).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from taxonomy.errors import BasinError


@dataclass(frozen=True)
class PermutationSpec:
    """`axes[param][i]` is the group permuting axis i of `param` (or None); `sizes[group]` its size."""

    axes: dict[str, tuple[str | None, ...]]
    sizes: dict[str, int]
    notes: dict[str, str] = field(default_factory=dict)  # group -> where it comes from (for messages)

    def __post_init__(self) -> None:
        for name, axes in self.axes.items():
            for i, group in enumerate(axes):
                if group is not None and group not in self.sizes:
                    raise BasinError(f"permutation spec: parameter {name!r} axis {i} names unknown group {group!r}")
        for group, n in self.sizes.items():
            if not isinstance(n, int) or n < 1:
                raise BasinError(f"permutation spec: group {group!r} has invalid size {n!r}")

    @property
    def groups(self) -> list[str]:
        return list(self.sizes)

    def members(self, group: str) -> list[tuple[str, int]]:
        """Every (parameter, axis) that `group` acts on."""
        return [(name, i) for name, axes in self.axes.items() for i, g in enumerate(axes) if g == group]

    def check(self, state: Mapping[str, torch.Tensor], label: str = "state dict") -> None:
        """Raise BasinError naming the parameter/axis when `state` does not fit this spec."""
        for name, axes in self.axes.items():
            if name not in state:
                raise BasinError(f"{label}: the permutation spec names parameter {name!r}, which is missing")
            shape = tuple(state[name].shape)
            if len(axes) != len(shape):
                raise BasinError(
                    f"{label}: parameter {name!r} has {len(shape)} axes {shape}, the spec gives {len(axes)}"
                )
            for i, group in enumerate(axes):
                if group is not None and shape[i] % self.sizes[group]:
                    raise BasinError(
                        f"{label}: parameter {name!r} axis {i} has length {shape[i]}, not a multiple of "
                        f"group {group!r}'s size {self.sizes[group]}"
                    )

    def to_json(self) -> dict:
        return {"axes": {k: list(v) for k, v in self.axes.items()}, "sizes": dict(self.sizes), "notes": self.notes}

    @classmethod
    def from_json(cls, data: Mapping) -> PermutationSpec:
        try:
            axes = {str(k): tuple(v) for k, v in data["axes"].items()}
            sizes = {str(k): int(v) for k, v in data["sizes"].items()}
        except (KeyError, TypeError, AttributeError, ValueError):
            want = "{'axes': {param: [group|null, ...]}, 'sizes': {group: n}}"
            raise BasinError(f"permutation spec: expected {want}") from None
        return cls(axes, sizes, dict(data.get("notes", {})))

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1)


def spec_from_groups(groups: Mapping[str, Mapping[str, int | tuple[int, ...]]], shapes: Mapping[str, tuple[int, ...]],
                     sizes: Mapping[str, int] | None = None) -> PermutationSpec:
    """Declarative construction: `groups[group] = {param: axis or axes}`; `shapes[param]` its shape.

    Every parameter in `shapes` appears in the spec (axes not named are None). A group's size
    defaults to the length of the first axis it names.
    """
    axes: dict[str, list[str | None]] = {name: [None] * len(shape) for name, shape in shapes.items()}
    out_sizes = dict(sizes or {})
    for group, members in groups.items():
        for name, ax in members.items():
            if name not in axes:
                raise BasinError(f"permutation spec: group {group!r} names parameter {name!r}, which does not exist")
            for a in (ax,) if isinstance(ax, int) else ax:
                if not -len(axes[name]) <= a < len(axes[name]):
                    raise BasinError(
                        f"permutation spec: group {group!r} names axis {a} of parameter {name!r}, "
                        f"which has only {len(axes[name])} axes"
                    )
                if axes[name][a] not in (None, group):
                    raise BasinError(
                        f"permutation spec: axis {a} of {name!r} is claimed by {axes[name][a]!r} and {group!r}"
                    )
                axes[name][a] = group
                out_sizes.setdefault(group, shapes[name][a])
    return PermutationSpec({k: tuple(v) for k, v in axes.items()}, out_sizes)


def expand(perm: torch.Tensor, length: int) -> torch.Tensor:
    """The index vector permuting an axis of `length` = n * k in k-wide blocks by `perm` (size n)."""
    n = perm.numel()
    k = length // n
    if k == 1:
        return perm
    return (perm[:, None] * k + torch.arange(k)[None, :]).reshape(-1)
