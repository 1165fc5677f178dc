"""Output-space curvatures J^T M J: the generalized Gauss-Newton, the empirical Fisher and the Monte-Carlo Fisher.

For one batch with outputs f (rows x C) and Jacobian J = df/dw, each operator is J^T M J with M block-diagonal
over rows (Martens 2020, "New insights and perspectives on the natural gradient method", Sec. 8-9):

- GGN (Schraudolph 2002): M = the Hessian of the batch's mean loss w.r.t. f. Cross-entropy: M_r = (diag p_r -
  p_r p_r^T) / rows (p = softmax f), applied row-wise as p*u - p (p.u): never a rows x C x C array. Every
  operator's M u runs over chunks of rows (`by_rows`) written over u, so a product holds one logits-sized array
  (u) and about CHUNK_ELEMENTS entries of temporaries, however large the vocabulary. Mean squared error (mean
  over rows * C elements): M = 2 I / (rows C).
- empirical Fisher: M_r = s g_r g_r^T with g_r the gradient of the row's loss at the observed target.
- Monte-Carlo Fisher: the same with `samples` targets per row drawn (seeded, once, at construction) from the
  model's predictive distribution, averaged: E[MC Fisher] = GGN for both losses.

Scaling (curvlinops' convention, Dangel et al., so the figures agree with its EF/MC operators): cross-entropy
rows carry l_r = CE(f_r, y_r) and s = 1/rows; squared error rows carry l_r = |f_r - y_r|^2 (the Gaussian
log-likelihood with variance 1/2) and s = 1/(rows C), i.e. the MSE's own normalisation. Then the empirical
Fisher is s sum_r grad l_r grad l_r^T, and Monte-Carlo targets are y ~ softmax(f) or y ~ N(f, I/2).

J v is a double-backward vector-Jacobian product (the R-op by the "double vjp" trick) and J^T w an ordinary
one, through a graph kept per batch when there is one batch (`cache_graph`), so a product costs two backward
passes and no forward. `exact_diagonal()` forms diag(J^T M J) from M's factor columns (one vjp per row and
column; for small outputs).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from evaluations.probes.curvature import CurvatureOperator, batched_vjp, vjp
from evaluations.probes.params import Selection
from taxonomy.errors import ProbeError

OPERATORS = ("ggn", "fisher", "mc_fisher")
CHUNK_ELEMENTS = 1 << 22  # entries of an output-Hessian product's temporaries at once (32 MiB in float64)


def by_rows(u: torch.Tensor, rows: int, part: Callable[[slice], torch.Tensor]) -> torch.Tensor:
    """M u computed over chunks r of the output rows, `part(r)` = (M u)[..., r, :], each written over u[..., r, :]:
    a product holds u and one chunk's temporaries (about CHUNK_ELEMENTS entries), never a second array of
    u's size, whatever the vocabulary. Small u: one chunk (no copy)."""
    step = max(1, CHUNK_ELEMENTS * rows // max(u.numel(), 1))
    if step >= rows:
        return part(slice(None))
    for lo in range(0, rows, step):
        r = slice(lo, lo + step)
        u[..., r, :] = part(r)
    return u


class OutputCurvature(CurvatureOperator):
    """J^T M J summed over batches (row-weighted); a subclass defines `_apply` (M u) and `_factor` (M's columns)."""

    label = "output curvature"

    def __init__(self, model: nn.Module, loss, data, params: Selection = None, batch_size: int | None = None,
                 mode: str = "eval", cache_graph: bool | None = None):
        super().__init__(model, loss, data, params=params, batch_size=batch_size, mode=mode)
        self.kind = self.needs_likelihood(self.label)
        self.cache_graph = len(self.batches) == 1 if cache_graph is None else cache_graph
        self._graphs: dict[int, tuple] = {}

    def _linear(self, i: int, batch) -> tuple:
        """(leaves, outputs with graph, outputs detached, targets, dummy u, J^T u with its graph) for batch i."""
        if i in self._graphs:
            return self._graphs[i]
        with torch.enable_grad():
            leaves = {n: t.detach().requires_grad_(True) for n, t in self.primals.items()}
            out, targets = self.outputs(leaves, batch)
            dummy = torch.zeros_like(out, requires_grad=True)
            jt = vjp([out], list(leaves.values()), [dummy], create_graph=True)
        self._check_targets(targets)
        graph = (leaves, out, out.detach(), targets, dummy, jt)
        if self.cache_graph:
            self._graphs[i] = graph
        return graph

    def _check_targets(self, targets: torch.Tensor) -> None:
        if self.kind == "cross_entropy" and not _class_indices(targets):
            raise ProbeError(f"{self.label}: cross-entropy targets must be class indices, one per output row "
                             "(no ignored -100 rows: an Objective drops them)")

    def _jvp(self, graph: tuple, tangents: dict[str, torch.Tensor], batched: bool) -> torch.Tensor:
        """J v ([rows, C], or [k, rows, C] for `batched` tangents) by the double-vjp trick."""
        leaves, _, f, _, dummy, jt = graph
        used = [(g, tangents[n]) for n, g in zip(leaves, jt) if g is not None and g.requires_grad]
        if not used:
            return torch.zeros((len(next(iter(tangents.values()))),) * batched + tuple(f.shape), dtype=f.dtype,
                               device=f.device)
        if batched:
            (ju,) = batched_vjp([g for g, _ in used], [dummy], [t for _, t in used], retain_graph=True)
        else:
            (ju,) = vjp([g for g, _ in used], [dummy], [t for _, t in used], retain_graph=True)
        return torch.zeros_like(f) if ju is None else ju

    def _vjp(self, graph: tuple, w: torch.Tensor, batched: bool, retain: bool) -> dict[str, torch.Tensor | None]:
        leaves, out = graph[0], graph[1]
        if not batched:
            return dict(zip(leaves, vjp([out], list(leaves.values()), [w], retain_graph=retain)))
        return dict(zip(leaves, batched_vjp([out], list(leaves.values()), [w], retain_graph=retain)))

    def _product(self, tangent: dict[str, torch.Tensor], i: int, batch) -> dict[str, torch.Tensor | None]:
        graph = self._linear(i, batch)
        w = self._apply(i, graph[2], graph[3], self._jvp(graph, tangent, False))
        return self._vjp(graph, w.to(graph[1].dtype), False, self.cache_graph)

    def _products(self, tangents: dict[str, torch.Tensor], i: int, batch) -> dict[str, torch.Tensor | None]:
        graph = self._linear(i, batch)
        w = self._apply(i, graph[2], graph[3], self._jvp(graph, tangents, True))
        return self._vjp(graph, w.to(graph[1].dtype), True, True)

    def _apply(self, i: int, f: torch.Tensor, y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """M u for batch i's outputs f and targets y; u: [..., rows, C]."""
        raise NotImplementedError

    def _factor(self, i: int, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """A [rows, C, K] with M_r = A_r A_r^T (the batch's scaling included)."""
        raise NotImplementedError

    def exact_diagonal(self, max_vjps: int = 200_000) -> torch.Tensor:
        """diag(J^T M J) exactly: sum over rows r and factor columns c of (J_r^T a_rc)^2 (rows * K vjps per batch,
        batched over K; refused above `max_vjps` in all, where the Hutchinson diagonal is the way)."""
        cost = self._diagonal_cost()
        if cost > max_vjps:
            raise ProbeError(f"{self.label}: the exact diagonal needs {cost:,} vector-Jacobian products "
                             f"(over max_vjps={max_vjps:,}); use the Hutchinson diagonal estimate")
        return self.accumulate(self._batch_diagonal, (self.size,))

    def _diagonal_cost(self) -> int:
        costs: list[int] = []
        with torch.no_grad():
            self.each_batch(lambda i, b: costs.append(self._linear_cost(i, b)))
        return sum(costs)

    def _linear_cost(self, i: int, batch) -> int:
        f, y = self.outputs(self.primals, batch)
        self._check_targets(y)
        return int(f.shape[0]) * int(self._factor(i, f.detach(), y).shape[-1])

    def _batch_diagonal(self, i: int, batch) -> torch.Tensor:
        graph = self._linear(i, batch)
        factor = self._factor(i, graph[2], graph[3]).to(graph[1].dtype)  # [rows, C, K]
        out = torch.zeros(self.size, dtype=self.dtype, device=self.device)
        rows, k = factor.shape[0], factor.shape[-1]
        for r in range(rows):
            cot = torch.zeros((k, *graph[2].shape), dtype=factor.dtype, device=factor.device)
            cot[:, r] = factor[r].T
            parts = self._vjp(graph, cot, True, True)
            out += (self.flatten_rows(parts, k) ** 2).sum(0)
        return out


def _class_indices(targets: torch.Tensor) -> bool:
    return targets.dim() == 1 and not targets.is_floating_point() and not bool((targets < 0).any())


def _onehot_sub(p: torch.Tensor, labels: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """p * sum_s c_s - sum_s c_s e_{labels_s} with c: [..., rows, S], labels: [rows, S] -> [..., rows, C]."""
    idx = labels.expand(*c.shape)
    return (p * c.sum(-1, keepdim=True)).scatter_add(-1, idx, -c)


def _ce_outer(p: torch.Tensor, labels: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """sum_s (p - e_{y_s}) (p - e_{y_s})^T u per row, never forming a C x C matrix."""
    c = (p * u).sum(-1, keepdim=True) - u.gather(-1, labels.expand(*u.shape[:-1], labels.shape[-1]))
    return _onehot_sub(p, labels, c)


class GGNOperator(OutputCurvature):
    """The generalized Gauss-Newton J^T H_out J of the mean loss (see the module docstring); positive semi-definite."""

    label = "GGN"

    def _apply(self, i: int, f: torch.Tensor, y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        if self.kind == "mse":
            return u.mul_(2.0 / f.numel())

        def part(r: slice) -> torch.Tensor:
            p, ur = torch.softmax(f[r], -1), u[..., r, :]
            return (p * ur - p * (p * ur).sum(-1, keepdim=True)) / f.shape[0]

        return by_rows(u, f.shape[0], part)

    def _factor(self, i: int, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        rows, classes = f.shape
        if self.kind == "mse":
            eye = torch.eye(classes, dtype=f.dtype, device=f.device)
            return eye.expand(rows, classes, classes) * math.sqrt(2.0 / f.numel())
        p = torch.softmax(f, -1)
        root = p.sqrt()
        return (torch.diag_embed(root) - p[:, :, None] * root[:, None, :]) / math.sqrt(rows)


class EmpiricalFisherOperator(OutputCurvature):
    """The empirical Fisher s sum_r grad l_r grad l_r^T at the observed targets (scaling: the module docstring)."""

    label = "empirical Fisher"

    def _residual(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 2.0 * (f - y.to(f.dtype))

    def _apply(self, i: int, f: torch.Tensor, y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        labels = y.reshape(-1, 1) if self.kind == "cross_entropy" else y

        def part(r: slice) -> torch.Tensor:
            ur = u[..., r, :]
            if self.kind == "mse":
                g = self._residual(f[r], labels[r])
                return g * (g * ur).sum(-1, keepdim=True) / f.numel()
            return _ce_outer(torch.softmax(f[r], -1), labels[r], ur) / f.shape[0]

        return by_rows(u, f.shape[0], part)

    def _factor(self, i: int, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.kind == "mse":
            return self._residual(f, y)[:, :, None] / math.sqrt(f.numel())
        g = torch.softmax(f, -1) - F.one_hot(y, f.shape[1]).to(f.dtype)
        return g[:, :, None] / math.sqrt(f.shape[0])


class MonteCarloFisherOperator(OutputCurvature):
    """The Monte-Carlo Fisher: `samples` targets per row from the model's predictive distribution (categorical for
    cross-entropy, N(f, I/2) for squared error), drawn once with `seed` in batch order; E = the GGN."""

    label = "Monte-Carlo Fisher"

    def __init__(self, model: nn.Module, loss, data, params: Selection = None, batch_size: int | None = None,
                 mode: str = "eval", cache_graph: bool | None = None, samples: int = 1, seed: int = 0):
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
            raise ProbeError(f"samples: expected a positive integer, got {samples!r}")
        super().__init__(model, loss, data, params=params, batch_size=batch_size, mode=mode, cache_graph=cache_graph)
        self.samples, self.seed = samples, seed
        self._draws = self._draw()

    def _draw(self) -> list[torch.Tensor]:
        """Per batch: sampled labels [rows, S] (cross-entropy) or standard normals [rows, C, S] (squared error)."""
        gen = torch.Generator().manual_seed(self.seed)
        draws: list[torch.Tensor] = []

        def draw(_: int, batch) -> None:
            f = self.outputs(self.primals, batch)[0].detach().double().cpu()
            if self.kind == "mse":
                sample = torch.randn(*f.shape, self.samples, generator=gen, dtype=torch.float64)
            else:
                sample = torch.multinomial(torch.softmax(f, -1), self.samples, replacement=True, generator=gen)
            draws.append(sample.to(self.device))

        with torch.no_grad():
            self.each_batch(draw)
        return draws

    def _apply(self, i: int, f: torch.Tensor, y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        draw = self._draws[i]

        def part(r: slice) -> torch.Tensor:
            ur = u[..., r, :]
            if self.kind == "mse":
                eps = draw[r].to(f.dtype)
                c = torch.einsum("...rc,rcs->...rs", ur, eps)
                return torch.einsum("...rs,rcs->...rc", c, eps) * (2.0 / (f.numel() * self.samples))
            return _ce_outer(torch.softmax(f[r], -1), draw[r], ur) / (f.shape[0] * self.samples)

        return by_rows(u, f.shape[0], part)

    def _factor(self, i: int, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        draw = self._draws[i]
        if self.kind == "mse":
            return -math.sqrt(2.0) * draw.to(f.dtype) / math.sqrt(f.numel() * self.samples)
        onehot = F.one_hot(draw, f.shape[1]).to(f.dtype).permute(0, 2, 1)  # [rows, C, S]
        return (torch.softmax(f, -1)[:, :, None] - onehot) / math.sqrt(f.shape[0] * self.samples)


def curvature_operator(name: str, model: nn.Module, loss, data, params: Selection = None, **options):
    """The operator called `name` ("hessian", "ggn", "fisher", "mc_fisher") on `model`, `loss` and `data`."""
    from evaluations.probes.hvp import HessianOperator

    classes = {"hessian": HessianOperator, "ggn": GGNOperator, "fisher": EmpiricalFisherOperator,
               "mc_fisher": MonteCarloFisherOperator}
    if name not in classes:
        raise ProbeError(f"operator: expected one of {', '.join(classes)}, got {name!r}")
    return classes[name](model, loss, data, params=params, **options)
