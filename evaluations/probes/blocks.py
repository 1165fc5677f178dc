"""Block-diagonal curvature: an operator with its cross-block entries zeroed, per layer by default.

`BlockDiagonal(op)` keeps the diagonal blocks of any operator over the selected parameters (an operator with
`names` and `numels`: the Hessian, GGN, Fisher, KFAC ...): B v = sum_g P_g A P_g v with P_g the projection onto
group g's coordinates. Groups default to one per module (a parameter name less its last component: `fc1.weight`
and `fc1.bias` form block `fc1`). A product costs one product of `op` per group (batched through `op.matmat`).
"""

from __future__ import annotations

import torch

from evaluations.probes.operator import Operator, has_gradient, operator_mode
from taxonomy.errors import ProbeError


def module_of(name: str) -> str:
    """"layers.0.attn.q.weight" -> "layers.0.attn.q" (a top-level parameter is its own block)."""
    return name.rsplit(".", 1)[0] if "." in name else name


def group_slices(names: list[str], numels: list[int], groups: list[list[str]] | None) -> dict[str, list[slice]]:
    """{block label: coordinate slices}; `groups`: lists of parameter names (None: one block per module)."""
    offsets, start = {}, 0
    for n, m in zip(names, numels):
        offsets[n] = slice(start, start + m)
        start += m
    if groups is None:
        out: dict[str, list[slice]] = {}
        for n in names:
            out.setdefault(module_of(n), []).append(offsets[n])
        return out
    seen = [n for g in groups for n in g]
    missing = sorted(set(names) - set(seen))
    unknown = sorted(set(seen) - set(names))
    if missing or unknown or len(seen) != len(set(seen)):
        raise ProbeError(f"groups: must partition the operator's parameters (missing {missing[:4]}, unknown "
                         f"{unknown[:4]}, or a name in two groups)")
    return {",".join(g): [offsets[n] for n in g] for g in groups}


class BlockDiagonal(Operator):
    """The block-diagonal part of `op` (see the module docstring); `blocks`: {label: slices}."""

    def __init__(self, op, groups: list[list[str]] | None = None):
        if not hasattr(op, "names") or not hasattr(op, "numels"):
            raise ProbeError(f"BlockDiagonal: {type(op).__name__} has no parameter names (names / numels)")
        self.op = op
        self.blocks = group_slices(list(op.names), list(op.numels), groups)
        self.shape, self.dtype, self.device = op.shape, op.dtype, op.device
        self.names, self.numels = op.names, op.numels
        self.mode = operator_mode(op)
        masks = torch.zeros(len(self.blocks), op.shape[0], dtype=torch.bool)
        for g, slices in enumerate(self.blocks.values()):
            for s in slices:
                masks[g, s] = True
        self.masks = masks.to(op.device)
        if has_gradient(op):
            self.gradient = op.gradient  # the loss gradient is not a property of the curvature's blocks

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        if v.shape != (self.shape[0],):
            raise ProbeError(f"BlockDiagonal: vector has shape {tuple(v.shape)}, expected ({self.shape[0]},)")
        return self.matmat(v[None])[0]

    def matmat(self, vs: torch.Tensor) -> torch.Tensor:
        """[k, n] -> [k, n]: the k * groups masked rows through `op.matmat` at once."""
        self._check_rows(vs)
        masks = self.masks.to(vs.device)
        rows = (vs[:, None, :] * masks[None]).reshape(-1, vs.shape[1])  # [k * G, n]
        images = self.op.matmat(rows).reshape(len(vs), len(masks), -1)
        return (images * masks[None]).sum(1)
