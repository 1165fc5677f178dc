"""Hessian-vector products of a loss over a dataset, as a linear operator on flat vectors.

H v = d/dt grad L(w + t v) at t=0 (Pearlmutter 1994), computed by double backward (default, the
faster on CPU for MLPs) or forward-over-reverse (`torch.func.jvp` of `torch.func.grad`) per batch,
accumulated with batch-size weights, so the operator is the Hessian of the mean loss over the whole
dataset. `params` restricts it to a subset of parameters (the others are held fixed): the result is
the corresponding sub-block.

Every evaluation (products, gradient, loss) runs under `HessianOperator.context()`: the network in the
operator's `mode` ("eval": BatchNorm running statistics; "train": BatchNorm batch statistics, running
statistics left untouched; Dropout off in both, so the operator is deterministic) and attention on
PyTorch's math backend (the fused CPU/flash kernels have no double backward nor forward-mode rule).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.func import grad, jvp, vmap

from evaluations.probes.curvature import MODES, CurvatureOperator, as_batches, batched_vjp, network_mode, vjp
from evaluations.probes.params import Selection
from taxonomy.errors import ProbeError

METHODS = ("double_backward", "forward_over_reverse")
__all__ = ["METHODS", "MODES", "HessianOperator", "as_batches", "network_mode"]


class HessianOperator(CurvatureOperator):
    """The Hessian of the mean loss over `data` w.r.t. the selected parameters.

    `loss`: a legacy `loss_fn(model(x), y)` on `(x, y)` data, or an `Objective` (evaluations.objective) with any
    batches (see evaluations.probes.curvature). `mode`: the network's mode ("eval", the default, or "train":
    BatchNorm batch statistics; see `network_mode`); `method`: the differentiation route ("double_backward" or
    "forward_over_reverse").

    A `LinearOperator` (evaluations.probes.operator) of shape (size, size): `op @ v` / `op.matvec(v)` take
    and return flat vectors of length `op.size` (the parameters' dtype and order in `op.names`).
    `op.matmat(V)` applies it to the rows of `V`; `op.to_scipy()` is the scipy.sparse.linalg view;
    `op.gradient()` the loss gradient (its optional part of the protocol).
    `op.n_products` counts Hessian-vector products. `op.dense()` forms the matrix (tiny models only).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        data,
        params: Selection = None,
        batch_size: int | None = None,
        method: str = "double_backward",
        cache_graph: bool | None = None,
        mode: str = "eval",
    ):
        if method not in METHODS:
            raise ProbeError(f"method: expected 'double_backward' or 'forward_over_reverse', got {method!r}")
        if mode in METHODS:
            raise ProbeError(f"mode={mode!r}: the differentiation route is now method=; mode is 'eval' or 'train'")
        super().__init__(model, loss_fn, data, params=params, batch_size=batch_size, mode=mode)
        self.method = method
        # double backward: keep each batch's gradient graph so an HVP costs one backward pass (default: one batch)
        self.cache_graph = len(self.batches) == 1 if cache_graph is None else cache_graph
        self._graphs: dict[int, tuple] = {}  # batch index -> (leaf params, gradient with its graph)
        self._hvp = self._make_hvp()

    def _make_hvp(self):
        # built once per operator: the per-call work is one jvp (forward-over-reverse) or one backward pass
        # through the cached gradient graph (double backward), never a rebuilt closure or graph
        grad_fn = grad(self.batch_loss)

        def hvp(v: dict[str, torch.Tensor], i: int, batch) -> dict[str, torch.Tensor]:
            try:
                return jvp(lambda p: grad_fn(p, batch), (self.primals,), (v,))[1]
            except RuntimeError as err:  # a forward-mode rule missing or broken in torch (e.g. F.mse_loss's)
                self._fall_back(err, hvp_double)
                return hvp_double(v, i, batch)

        def hvp_double(v: dict[str, torch.Tensor], i: int, batch) -> dict[str, torch.Tensor]:
            p, g = self._gradient_graph(i, batch)
            hv = vjp(g, list(p.values()), [v[n] for n in p], retain_graph=self.cache_graph)
            return {n: torch.zeros_like(p[n]) if h is None else h for n, h in zip(p, hv)}

        return hvp if self.method == "forward_over_reverse" else hvp_double

    def _fall_back(self, err: RuntimeError, hvp_double) -> None:
        """Forward-over-reverse failed: the same Hessian by double backward from now on (warned, and in `method`)."""
        warnings.warn(f"HessianOperator: forward_over_reverse failed ({str(err).splitlines()[0]}); "
                      "using double_backward", RuntimeWarning, stacklevel=4)
        self.method = "double_backward"
        self._hvp = hvp_double

    def _gradient_graph(self, i: int, batch):
        """(leaf parameters, gradient with its graph) for batch `i`; kept for reuse when `cache_graph`."""
        if i in self._graphs:
            return self._graphs[i]
        with torch.enable_grad():
            p = {n: t.detach().requires_grad_(True) for n, t in self.primals.items()}
            g = torch.autograd.grad(self.batch_loss(p, batch), list(p.values()), create_graph=True)
        if self.cache_graph:
            self._graphs[i] = (p, g)
        return p, g

    def _product(self, tangent: dict[str, torch.Tensor], i: int, batch) -> dict[str, torch.Tensor]:
        return self._hvp(tangent, i, batch)

    def _products(self, tangents: dict[str, torch.Tensor], i: int, batch) -> dict[str, torch.Tensor]:
        """k HVPs at once: `vmap` (forward-over-reverse) or `is_grads_batched` (double backward)."""
        if self.method == "forward_over_reverse":
            return vmap(lambda v: self._hvp(v, i, batch))(tangents)
        p, g = self._gradient_graph(i, batch)
        hv = batched_vjp(g, list(p.values()), [tangents[n] for n in p], retain_graph=True)
        return {n: torch.zeros_like(tangents[n]) if h is None else h for n, h in zip(p, hv)}

    def _batch_gradient(self, p: dict[str, torch.Tensor], i: int, batch) -> torch.Tensor:
        if p is self.primals and self.method == "double_backward" and self.cache_graph:  # free: the cached graph
            _, g = self._gradient_graph(i, batch)
            return torch.cat([t.detach().reshape(-1) for t in g])
        return super()._batch_gradient(p, i, batch)
