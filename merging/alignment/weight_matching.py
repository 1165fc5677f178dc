"""Weight matching (Ainsworth et al. 2023, Git Re-Basin, section 3.2, Algorithm 1).

Maximise sum_params <W_A, pi(W_B)> over the permutations of the spec by coordinate descent: visit
the groups in a random order (from `seed`); for each, with the other groups held fixed, the best
permutation solves a linear assignment problem on C = sum_{(param, axis) in group} A_axis B_axis^T
(`scipy.optimize.linear_sum_assignment`). Stop after a full pass without improvement.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from merging.alignment.apply import identity_permutation, permute_tensor
from merging.alignment.spec import PermutationSpec
from merging.reductions import dot64
from taxonomy.errors import BasinError


@dataclass
class MatchResult:
    """Permutations that align model B to model A (apply them to B), with the solver's trace."""

    perms: dict[str, torch.Tensor]
    objective: list[float] = field(default_factory=list)  # after each pass (weight matching) or per group
    converged: bool = True
    iterations: int = 0
    seconds: float = 0.0  # wall clock
    method: str = "weight_matching"
    cpu_seconds: float = 0.0  # this process's CPU time (robust to other jobs on a shared machine)

    def to_json(self) -> dict:
        return {
            "method": self.method,
            "perms": {g: p.tolist() for g, p in self.perms.items()},
            "objective": list(self.objective),
            "converged": self.converged,
            "iterations": self.iterations,
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
        }


def check_same_architecture(state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor],
                            spec: PermutationSpec) -> None:
    missing = sorted(set(state_a) ^ set(state_b))
    if missing:
        raise BasinError(f"models differ in architecture: tensor {missing[0]!r} is in only one of them "
                         f"({len(missing)} such tensors)")
    for name in state_a:
        if tuple(state_a[name].shape) != tuple(state_b[name].shape):
            raise BasinError(f"models differ in shape at tensor {name!r}: "
                             f"{tuple(state_a[name].shape)} vs {tuple(state_b[name].shape)}")
    spec.check(state_a, "model A")


def _unit_matrix(t: torch.Tensor, axis: int, n: int) -> torch.Tensor:
    """Rows = the n units of `axis` (a unit may be a block of axis_len/n entries), columns = the rest."""
    return t.movedim(axis, 0).reshape(n, -1)


def _member_cost(wa: torch.Tensor, wb: torch.Tensor, axis: int, n: int) -> torch.Tensor:
    if wa.dim() == 2 and axis == 1 and wa.shape[1] == n:  # e.g. embeddings: no transposed copies
        return wa.T @ wb
    return _unit_matrix(wa, axis, n) @ _unit_matrix(wb, axis, n).T


def group_cost(state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor], spec: PermutationSpec,
               perms: Mapping[str, torch.Tensor], group: str, cache: dict | None = None,
               versions: Mapping[str, int] | None = None) -> torch.Tensor:
    """C[i, j] = sum over members of <unit i of A, unit j of B with the other groups applied>.

    With `cache` and `versions` (a counter per group, bumped when its permutation changes), a
    member's product is reused while the permutations of its other axes are unchanged.
    """
    n = spec.sizes[group]
    cost = None
    for name, axis in spec.members(group):
        key = tuple(versions[g] if versions is not None and g is not None else -1
                    for i, g in enumerate(spec.axes[name]) if i != axis)
        hit = cache.get((name, axis)) if cache is not None else None
        if hit is not None and hit[0] == key and versions is not None:
            part = hit[1]
        else:
            wb = permute_tensor(state_b[name].detach(), spec.axes[name], perms, skip_axis=axis)
            part = _member_cost(state_a[name].detach(), wb, axis, n)
            if cache is not None:
                cache[(name, axis)] = (key, part)
        cost = part.double() if cost is None else cost.add_(part)  # float64 accumulation across members
    return cost


def weight_matching(state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor], spec: PermutationSpec,
                    seed: int = 0, max_iter: int = 100, init: Mapping[str, torch.Tensor] | None = None,
                    progress: bool = False) -> MatchResult:
    """Permutations of B's units that maximise its inner product with A (see the module docstring)."""
    check_same_architecture(state_a, state_b, spec)
    start, cpu_start = time.perf_counter(), time.process_time()
    # float32 products (float64 accumulation across members): float64 matmuls triple the run time
    wide = (torch.float32, torch.float64)
    state_a = {k: v.detach().to(v.dtype if v.dtype in wide else torch.float32) for k, v in state_a.items()
               if k in spec.axes and any(spec.axes[k])}
    state_b = {k: state_b[k].detach().to(v.dtype) for k, v in state_a.items()}
    perms = {g: torch.as_tensor(p, dtype=torch.long).clone() for g, p in (init or identity_permutation(spec)).items()}
    rng = np.random.default_rng(seed)
    groups = spec.groups
    cache: dict = {}
    versions = {g: 0 for g in groups}
    # a group's cost depends only on the groups on its members' other axes; unchanged -> same optimum
    deps = {g: sorted({o for name, axis in spec.members(g) for i, o in enumerate(spec.axes[name])
                       if o is not None and i != axis}) for g in groups}
    solved_at: dict[str, tuple] = {}
    objective: list[float] = []
    converged = False
    iterations = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=max_iter, desc="weight matching", leave=False)
    for iterations in range(1, max_iter + 1):  # noqa: B007 - reported below
        improved = False
        for gi in rng.permutation(len(groups)):
            group = groups[gi]
            key = tuple(versions[d] for d in deps[group])
            if solved_at.get(group) == key:
                continue
            cost = group_cost(state_a, state_b, spec, perms, group, cache, versions).numpy()
            old = cost[np.arange(len(cost)), perms[group].numpy()].sum()
            _, cols = linear_sum_assignment(cost, maximize=True)
            new = cost[np.arange(len(cost)), cols].sum()
            if new > old + 1e-12 * max(1.0, abs(old)):
                perms[group] = torch.as_tensor(cols, dtype=torch.long)
                versions[group] += 1
                improved = True
            solved_at[group] = key
        objective.append(alignment_objective(state_a, state_b, spec, perms))
        if bar is not None:
            bar.update(1)
        if not improved:
            converged = True
            break
    if bar is not None:
        bar.close()
    return MatchResult(perms, objective, converged, iterations, time.perf_counter() - start,
                       cpu_seconds=time.process_time() - cpu_start)


def alignment_objective(state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor],
                        spec: PermutationSpec, perms: Mapping[str, torch.Tensor]) -> float:
    """sum over spec parameters with a permuted axis of <W_A, pi(W_B)>."""
    total = 0.0
    for name, axes in spec.axes.items():
        if name in state_a and any(axes):
            wb = permute_tensor(state_b[name].detach(), axes, perms)
            total += dot64(state_a[name], wb)
    return total
