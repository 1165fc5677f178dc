"""The empirical NTK of an `Objective`'s outputs on a few rows (Jacot et al. 2018): K = J J^T for the rows' outputs.

For checkpoints, where the inputs are token batches and the outputs are the rows an `Objective` predicts (the
next-token logits at predicted positions): the Jacobian of the first `rows` output rows of the first batch,
one vector-Jacobian product per output (batched), w.r.t. the `params` subset.

- outputs="target": one output per row, the logit of the row's target (K[r, s] = grad f_r[y_r] . grad f_s[y_s]);
  rows products, cheap at any vocabulary size;
- outputs="all": the output-traced kernel K[r, s] = sum_c grad f_r[c] . grad f_s[c] (evaluations.probes.ntk's
  "trace" kind); rows * C products, refused above `max_vjps`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from evaluations.probes.curvature import CurvatureOperator
from evaluations.probes.params import Selection
from taxonomy.errors import ProbeError

OUTPUTS = ("target", "all")


@dataclass
class ObjectiveNTK:
    """`kernel` [rows, rows], the parameters differentiated and how many products it took."""

    kernel: torch.Tensor
    outputs: str
    rows: int
    params: int
    products: int

    def to_json(self) -> dict:
        eig = torch.linalg.eigvalsh(self.kernel.double())
        return {"kernel": self.kernel.tolist(), "outputs": self.outputs, "rows": self.rows, "params": self.params,
                "products": self.products, "trace": float(self.kernel.double().trace()),
                "top_eigenvalue": float(eig[-1]), "bottom_eigenvalue": float(eig[0])}


def _cotangents(f: torch.Tensor, y: torch.Tensor, outputs: str) -> torch.Tensor:
    """One-hot cotangents [m, rows, C]: one per row (its target) or one per (row, column)."""
    rows, classes = f.shape
    if outputs == "target":
        cot = torch.zeros(rows, rows, classes, dtype=f.dtype, device=f.device)
        cot[torch.arange(rows), torch.arange(rows), y[:rows].long()] = 1
        return cot
    return torch.eye(rows * classes, dtype=f.dtype, device=f.device).reshape(rows * classes, rows, classes)


def objective_ntk(model: nn.Module, objective, batches, rows: int = 8, params: Selection = None,
                  outputs: str = "target", max_vjps: int = 20_000) -> ObjectiveNTK:
    """The empirical NTK of `objective`'s outputs on the first `rows` rows of the first batch (module docstring)."""
    if outputs not in OUTPUTS:
        raise ProbeError(f"outputs: expected one of {OUTPUTS}, got {outputs!r}")
    base = CurvatureOperator(model, objective, batches, params=params)
    batch = base.batches[0]
    with base.context(), torch.enable_grad():
        leaves = {n: t.detach().requires_grad_(True) for n, t in base.primals.items()}
        f, y = base.outputs(leaves, batch)
        f = f[:rows]
        if outputs == "target" and (y.dim() != 1 or y.dtype.is_floating_point):
            raise ProbeError("outputs='target': the objective's targets are not class labels; use outputs='all'")
        count = f.shape[0] * (1 if outputs == "target" else f.shape[1])
        if count > max_vjps:
            raise ProbeError(f"outputs='all': {count:,} vector-Jacobian products (over max_vjps={max_vjps:,}); "
                             "use outputs='target' or fewer rows")
        cot = _cotangents(f.detach(), y, outputs)
        parts = torch.autograd.grad(f, list(leaves.values()), cot, is_grads_batched=True, allow_unused=True)
    jac = base.flatten_rows(dict(zip(leaves, parts)), len(cot)).double()
    kernel = jac @ jac.T
    if outputs == "all":
        n, c = f.shape
        kernel = kernel.reshape(n, c, n, c).diagonal(dim1=1, dim2=3).sum(-1)
    return ObjectiveNTK(kernel, outputs, int(f.shape[0]), base.size, len(cot))
