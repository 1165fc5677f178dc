"""Applying and drawing permutations (Ainsworth et al. 2023, Git Re-Basin, eq. 1: theta' = pi(theta)).

Convention: axis i of a parameter permuted by group g becomes `index_select(i, expand(perms[g]))`,
so unit j of the result is unit `perms[g][j]` of the input.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from merging.alignment.spec import PermutationSpec, expand
from taxonomy.errors import BasinError


def check_perms(spec: PermutationSpec, perms: Mapping[str, torch.Tensor]) -> None:
    for group, n in spec.sizes.items():
        if group not in perms:
            raise BasinError(f"no permutation given for group {group!r}")
        p = torch.as_tensor(perms[group])
        if p.shape != (n,) or not torch.equal(torch.sort(p).values, torch.arange(n)):
            raise BasinError(f"permutation for group {group!r} is not a permutation of range({n})")


def permute_tensor(t: torch.Tensor, axes: tuple[str | None, ...], perms: Mapping[str, torch.Tensor],
                   skip_axis: int | None = None) -> torch.Tensor:
    for i, group in enumerate(axes):
        if group is not None and i != skip_axis:
            t = t.index_select(i, expand(torch.as_tensor(perms[group], dtype=torch.long), t.shape[i]))
    return t


def apply_permutation(state: Mapping[str, torch.Tensor], spec: PermutationSpec,
                      perms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new state dict with every axis in `spec` permuted; parameters outside the spec are kept."""
    spec.check(state)
    check_perms(spec, perms)
    out = dict(state)
    for name, axes in spec.axes.items():
        out[name] = permute_tensor(state[name], axes, perms)
    return out


def random_permutation(spec: PermutationSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {g: torch.randperm(n, generator=gen) for g, n in spec.sizes.items()}


def identity_permutation(spec: PermutationSpec) -> dict[str, torch.Tensor]:
    return {g: torch.arange(n) for g, n in spec.sizes.items()}


def invert(perms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {g: torch.argsort(torch.as_tensor(p)) for g, p in perms.items()}
