"""Curvature and landscape at a trained minimum: the measurements the seed studies share.

At the parameters theta* of a trained model, on the mean training loss L over `data`:
- the top-k Hessian eigenvalues by Lanczos with full reorthogonalization (Golub & Van Loan, Alg. 10.1.1;
  `evaluations.probes.lanczos`), with its convergence flag;
- the Hessian trace by Hutchinson's estimator, E[v^T H v] over Rademacher v (Hutchinson 1990), with its
  standard error (`evaluations.probes.hutchinson_trace`);
- 1-D and 2-D filter-normalized slices L(theta* + a d1) and L(theta* + a d1 + b d2) (Li et al. 2018,
  "Visualizing the Loss Landscape of Neural Nets", Sec. 4, Eq. 1; `evaluations.landscape.slices`);
- the loss and gradient norm at theta*, so a reader can check the point is (near) a stationary point.

`params` restricts everything to a subset of the parameters (a name prefix or a list of names): the Hessian is
then the corresponding sub-block and the slice directions are zero on the other parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from evaluations.landscape.directions import random_directions
from evaluations.landscape.slices import slice_1d, slice_2d
from evaluations.probes.hvp import HessianOperator
from evaluations.probes.lanczos import lanczos
from evaluations.probes.params import Selection, select_params
from evaluations.probes.trace import hutchinson_trace
from taxonomy.errors import BasinError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class MinimumMeasures:
    """What `measure_minimum` reports; `slice_2d[i][j]` is the loss at alpha = alphas_2d[j], beta = alphas_2d[i]."""

    n_params: int  # parameters the Hessian and the slices are taken over
    loss: float
    grad_norm: float
    top_eigenvalues: list[float]  # largest first
    lanczos_converged: bool
    lanczos_iterations: int
    lanczos_error_bounds: list[float]  # per eigenvalue, when the Lanczos probe reports them (else empty)
    trace: float
    trace_stderr: float
    trace_samples: int
    alphas_1d: list[float]
    slice_1d: list[float]
    alphas_2d: list[float]
    slice_2d: list[list[float]]

    def to_json(self) -> dict:
        return dict(self.__dict__)


def measure_minimum(
    model: nn.Module,
    data,
    loss_fn: LossFn | None = None,
    params: Selection = None,
    top_k: int = 3,
    lanczos_iters: int = 30,
    lanczos_tol: float = 1e-3,
    hutchinson_samples: int = 30,
    res_1d: int = 41,
    res_2d: int = 21,
    span: float = 1.0,
    normalize: str | None = "filter",
    seed: int = 0,
    batched: bool | str = "auto",
) -> MinimumMeasures:
    """Top Hessian eigenvalues, trace, loss, gradient norm and 1-D/2-D slices of the mean loss at `model`'s weights.

    `data`: (x, y) tensors or an iterable of batches. `loss_fn` defaults to mean cross-entropy. Lanczos stops at
    `lanczos_tol` relative accuracy or after `lanczos_iters` steps; the trace uses exactly `hutchinson_samples`
    Rademacher probes. Slices span [-span, span] along `res_1d` (`res_2d` per axis) points; their directions are
    Gaussian, `normalize`d (filter normalization by default) and drawn from `seed`; `batched` is passed to the
    slices (`evaluate_points`: "auto" stacks grid points under `vmap`, False evaluates them one at a time).
    """
    if top_k < 1:
        raise BasinError(f"measure_minimum: top_k must be >= 1, got {top_k}")
    if hutchinson_samples < 2:
        raise BasinError(f"measure_minimum: hutchinson_samples must be >= 2, got {hutchinson_samples}")
    if res_1d < 3 or res_2d < 2:
        raise BasinError(f"measure_minimum: res_1d must be >= 3 and res_2d >= 2, got {res_1d} and {res_2d}")
    loss_fn = loss_fn or nn.functional.cross_entropy
    names = select_params(model, params)
    op = HessianOperator(model, loss_fn, data, params=names)
    if top_k > op.size:
        raise BasinError(f"measure_minimum: top_k={top_k} exceeds the {op.size} selected parameters")
    eig = lanczos(op, k=top_k, tol=lanczos_tol, max_iter=max(lanczos_iters, top_k), seed=seed)
    tr = hutchinson_trace(op, min_samples=hutchinson_samples, max_samples=hutchinson_samples, seed=seed, sketch=0)
    center = {k: v.detach() for k, v in model.named_parameters()}
    center.update({k: v.detach() for k, v in model.named_buffers()})
    selected = {k: center[k] for k in names}
    d1, d2 = random_directions(selected, n=2, normalize=normalize, seed=seed)
    a1 = torch.linspace(-span, span, res_1d, dtype=torch.float64)
    a2 = torch.linspace(-span, span, res_2d, dtype=torch.float64)
    s1 = slice_1d(model, center, d1, data, loss_fn, alphas=a1, batched=batched)
    s2 = slice_2d(model, center, d1, d2, data, loss_fn, alphas=a2, batched=batched)
    return MinimumMeasures(
        n_params=op.size,
        loss=op.loss(),
        grad_norm=float(op.gradient().double().norm()),
        top_eigenvalues=[float(v) for v in eig.values],
        lanczos_converged=bool(eig.converged),
        lanczos_iterations=int(eig.iterations),
        lanczos_error_bounds=[float(e) for e in eig.extra.get("error_bounds", [])],
        trace=float(tr.mean),
        trace_stderr=float(tr.stderr),
        trace_samples=int(tr.samples),
        alphas_1d=a1.tolist(),
        slice_1d=[float(v) for v in s1.loss],
        alphas_2d=a2.tolist(),
        slice_2d=[[float(v) for v in row] for row in s2.loss],
    )
