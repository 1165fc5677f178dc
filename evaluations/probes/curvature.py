"""The shared base of every curvature operator (Hessian, GGN, Fisher, KFAC): one loop over the data.

A curvature operator is a `LinearOperator` (evaluations.probes.operator) on the flat vector of the selected
parameters (`params`, see evaluations.probes.params). What it differentiates is a `Task`: `predict(model, batch)
-> (outputs, targets)` and `loss(outputs, targets)` (the batch's mean loss), plus the loss's likelihood `kind`
("cross_entropy", "mse", or None for a custom loss, which has no output Hessian nor predictive distribution).
It comes from either

- an `Objective` (evaluations.objective) and any batches (dicts for transformers models), or
- the legacy `(model, loss_fn, data)` with `(x, y)` data: `predict` is `(model(x), y)` and `loss` is `loss_fn`
  (its kind recognised for `nn.CrossEntropyLoss()`, `nn.MSELoss()`, `F.cross_entropy`, `F.mse_loss`).

The dataset curvature is the batch-size weighted mean of the batch curvatures, in batch order:
C = sum_b w_b C_b with w_b = rows_b / sum rows (rows: a batch's output rows -- examples, predicted tokens),
so it is the curvature of the row-weighted mean loss. Subclasses define the per-batch product
(`_product`, and `_products` for several vectors at once); the loop, weights, network mode, flattening,
`loss()` and `gradient()` live here, once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from evaluations.objective import Objective, standard_loss
from evaluations.probes.attention import math_attention
from evaluations.probes.operator import Operator
from evaluations.probes.params import Selection, select_params
from merging.batches import batch_list as as_batches
from taxonomy.errors import ProbeError

MODES = ("eval", "train")
Batches = Sequence[Any]


@contextmanager
def network_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """The model in `mode` for a curvature probe, every module's own flags restored afterwards.

    "eval": `model.eval()`. "train": eval, then every BatchNorm / InstanceNorm in training mode with
    `track_running_stats` off, so it normalizes with the batch's statistics and updates no running statistic
    (nor `num_batches_tracked`); Dropout and every other module stay in eval mode (no randomness).
    """
    if mode not in MODES:
        raise ProbeError(f"mode: expected 'eval' or 'train', got {mode!r}")
    saved = [(m, m.training, getattr(m, "track_running_stats", None)) for m in model.modules()]
    model.eval()
    if mode == "train":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase):
                m.train()
                m.track_running_stats = False
    try:
        yield
    finally:
        for m, training, track in saved:
            m.training = training
            if track is not None:
                m.track_running_stats = track


def _xy(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch[0], batch[1]
    return model(x), y


def likelihood_kind(loss_fn: object) -> str | None:
    """"cross_entropy" / "mse" for PyTorch's mean-reduced, unweighted standard losses; None for anything else."""
    if loss_fn in (F.cross_entropy, nn.functional.cross_entropy):
        return "cross_entropy"
    if loss_fn is F.mse_loss:
        return "mse"
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        plain = loss_fn.weight is None and loss_fn.label_smoothing == 0 and loss_fn.reduction == "mean"
        return "cross_entropy" if plain else None
    if isinstance(loss_fn, nn.MSELoss):
        return "mse" if loss_fn.reduction == "mean" else None
    return None


@dataclass(frozen=True)
class Task:
    """What an operator differentiates: `predict(model, batch) -> (outputs, targets)`, the batch's mean `loss`,
    the likelihood `kind` (None: a custom loss) and a `name` for reports."""

    predict: Callable[[nn.Module, Any], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    kind: str | None
    name: str


def as_task(loss: Objective | Callable) -> Task:
    """An `Objective`, or a legacy `loss_fn(outputs, targets)` on `(x, y)` batches, as a `Task`."""
    if isinstance(loss, Objective):
        return Task(loss.predict, partial(standard_loss, loss.loss), loss.loss, loss.name)
    if not callable(loss):
        raise ProbeError(f"loss: expected an Objective or a loss function, got {type(loss).__name__}")
    name = getattr(loss, "__name__", type(loss).__name__)
    return Task(_xy, loss, likelihood_kind(loss), f"loss {name}")


def vjp(outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], cotangents: Sequence[torch.Tensor],
        retain_graph: bool | None = None, create_graph: bool = False) -> tuple[torch.Tensor | None, ...]:
    """sum_i J_i^T c_i: `torch.autograd.grad(outputs, inputs, cotangents, allow_unused=True)` as the gradient of
    the scalar sum_i <outputs_i, c_i>, bit-identical (its backward hands each output exactly c_i: 1 * c_i).

    A tensor `grad_outputs` makes torch import torch.fx.experimental.symbolic_shapes (sympy; 1.5-2.5 s once per
    process) to check shapes; a scalar output does not, so no product pays that import. Outputs that do not
    require grad contribute nothing (their inputs' parts are None).
    """
    with torch.enable_grad():
        terms = [(o * c).sum() for o, c in zip(outputs, cotangents) if o.requires_grad]
        if not terms:
            return (None,) * len(inputs)
        return torch.autograd.grad(sum(terms[1:], terms[0]), list(inputs), retain_graph=retain_graph,
                                   create_graph=create_graph, allow_unused=True)


def batched_vjp(outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], cotangents: Sequence[torch.Tensor],
                retain_graph: bool | None = None, create_graph: bool = False) -> tuple[torch.Tensor | None, ...]:
    """k vjps at once (cotangents [k, *output shape]): `torch.autograd.grad(..., is_grads_batched=True)`'s own path,
    torch's legacy vmap over the autograd engine's backward, bit-identical, without its shape check of tensor
    `grad_outputs` (that imports sympy, 1-2.5 s once per process; the shapes are checked here). Outputs that do
    not require grad contribute nothing."""
    from torch import _vmap_internals
    from torch.autograd.graph import _engine_run_backward

    pairs = [(o, c) for o, c in zip(outputs, cotangents) if o.requires_grad]
    for o, c in pairs:
        if tuple(c.shape[1:]) != tuple(o.shape):
            raise ProbeError(f"batched_vjp: cotangent of shape {tuple(c.shape)} for an output of shape "
                             f"{tuple(o.shape)}")
    if not pairs:
        return (None,) * len(inputs)
    outs, cots = tuple(o for o, _ in pairs), tuple(c for _, c in pairs)
    retain = create_graph if retain_graph is None else retain_graph

    def one(grads):
        return _engine_run_backward(outs, grads, retain, create_graph, tuple(inputs), True, accumulate_grad=False)

    with torch.enable_grad():
        return _vmap_internals._vmap(one, 0, 0, allow_none_pass_through=True)(cots)


class _Predict(nn.Module):
    """`predict(model, batch)` as a module, so `functional_call` swaps the model's parameters under any predict."""

    def __init__(self, model: nn.Module, predict: Callable):
        super().__init__()
        self.m = model
        self.predict = predict

    def forward(self, batch):
        return self.predict(self.m, batch)


class CurvatureOperator(Operator):
    """A curvature matrix of a model's loss over `data` w.r.t. the selected parameters (see the module docstring).

    `loss`: an `Objective` or a legacy loss function; `data`: `(x, y)` tensors (split by `batch_size`) or an
    iterable of batches; `mode`: the network's mode ("eval" / "train", see `network_mode`).
    Attributes: `names`, `shapes`, `numels`, `size`, `rows` (per batch), `weights` (per batch), `n_products`.
    """

    def __init__(self, model: nn.Module, loss, data, params: Selection = None, batch_size: int | None = None,
                 mode: str = "eval"):
        if mode not in MODES:
            raise ProbeError(f"mode: expected 'eval' or 'train', got {mode!r}")
        self.mode = mode
        self.model = model
        self.task = as_task(loss)
        self.objective = loss if isinstance(loss, Objective) else None
        self.loss_fn = None if self.objective is not None else loss
        self.batches = as_batches(data, batch_size)
        self.names = select_params(model, params)
        state = {n: p.detach() for n, p in model.named_parameters()}
        state.update({n: b.detach() for n, b in model.named_buffers()})
        self.fixed = {n: t for n, t in state.items() if n not in self.names}
        self.primals = {n: state[n] for n in self.names}
        self.shapes = [self.primals[n].shape for n in self.names]
        self.numels = [self.primals[n].numel() for n in self.names]
        self.size = sum(self.numels)
        self.shape = (self.size, self.size)
        self.dtype = next(iter(self.primals.values())).dtype
        self.device = next(iter(self.primals.values())).device
        self.n_products = 0
        self._module = _Predict(model, self.task.predict)
        self._fixed_m = {"m." + n: t for n, t in self.fixed.items()}
        self.rows = self._count_rows()
        self.n_examples = sum(self.rows)
        if self.n_examples == 0:
            raise ProbeError("data: no output rows to measure (every target masked?)")
        self.weights = [r / self.n_examples for r in self.rows]

    # --- what is differentiated -------------------------------------------------------------------------------
    def _count_rows(self) -> list[int]:
        """Output rows per batch: len(x) for (x, y) data under a legacy loss, else one forward pass per batch."""
        if self.objective is None:
            return [len(b[0]) for b in self.batches]
        rows: list[int] = []
        with torch.no_grad():
            self.each_batch(lambda _, b: rows.append(int(self.outputs(self.primals, b)[0].shape[0])))
        return rows

    def outputs(self, p: dict[str, torch.Tensor], batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(outputs, targets) of one batch with the selected parameters set to `p` (the others fixed)."""
        state = {**self._fixed_m, **{"m." + n: t for n, t in p.items()}}
        return functional_call(self._module, state, (batch,))

    def batch_loss(self, p: dict[str, torch.Tensor], batch) -> torch.Tensor:
        """The batch's mean loss at `p`; differentiable."""
        return self.task.loss(*self.outputs(p, batch))

    def needs_likelihood(self, what: str) -> str:
        """The likelihood kind, or a `ProbeError` naming the loss when it has none (`what`: the operator)."""
        if self.task.kind is None:
            raise ProbeError(f"{what}: needs a likelihood loss (cross-entropy or mean squared error, or an Objective); "
                             f"{self.task.name} has no known output Hessian or predictive distribution")
        return self.task.kind

    @contextmanager
    def context(self) -> Iterator[None]:
        """The network in `self.mode` and attention on the math backend (every evaluation runs inside)."""
        with network_mode(self.model, self.mode), math_attention():
            yield

    # --- flat vectors -----------------------------------------------------------------------------------------
    def unflatten(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(v, self.numels)
        return {n: part.reshape(s) for n, part, s in zip(self.names, parts, self.shapes)}

    def unflatten_rows(self, vs: torch.Tensor) -> dict[str, torch.Tensor]:
        """[k, size] -> {name: [k, *shape]}."""
        parts = torch.split(vs, self.numels, 1)
        return {n: t.reshape(len(vs), *s) for n, t, s in zip(self.names, parts, self.shapes)}

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def flatten_rows(self, tensors: dict[str, torch.Tensor | None], k: int) -> torch.Tensor:
        """{name: [k, *shape] or None (unused: zero)} -> [k, size]."""
        return torch.cat([torch.zeros(k, m, dtype=self.dtype, device=self.device) if tensors.get(n) is None
                          else tensors[n].reshape(k, -1) for n, m in zip(self.names, self.numels)], 1)

    def flat_params(self) -> torch.Tensor:
        return self.flatten(self.primals)

    # --- the batch loop, once ---------------------------------------------------------------------------------
    def each_batch(self, visit: Callable[[int, Any], None]) -> None:
        """visit(b, batch_b) for every batch in batch order, inside `context()`: the one loop over the data
        (products, gradient and loss here; KFAC's factor passes)."""
        with self.context():
            for i, batch in enumerate(self.batches):
                visit(i, batch)

    def accumulate(self, part: Callable[[int, Any], torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        """sum_b w_b part(b, batch_b) in batch order, inside `context()` (one batch: its part as it is)."""
        if len(self.batches) == 1:
            with self.context():
                return part(0, self.batches[0])
        out = torch.zeros(shape, dtype=self.dtype, device=self.device)

        def add(i: int, batch) -> None:
            out.add_(part(i, batch) * self.weights[i])

        self.each_batch(add)
        return out

    def _product(self, tangent: dict[str, torch.Tensor], i: int, batch) -> dict[str, torch.Tensor | None]:
        """The batch's curvature times one tangent ({name: tensor}); defined by each operator."""
        raise NotImplementedError

    def _products(self, tangents: dict[str, torch.Tensor], i: int, batch) -> dict[str, torch.Tensor | None]:
        """The batch's curvature times k tangents ({name: [k, *shape]}); by default one at a time."""
        k = len(next(iter(tangents.values())))
        rows = [self.flatten_rows({n: t[j][None] for n, t in self._product(
            {n: t[j] for n, t in tangents.items()}, i, batch).items() if t is not None}, 1)[0] for j in range(k)]
        return self.unflatten_rows(torch.stack(rows))

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        if v.shape != (self.size,):
            raise ProbeError(f"{type(self).__name__}: vector has shape {tuple(v.shape)}, expected ({self.size},)")
        tangent = self.unflatten(v.to(self.device, self.dtype))  # any device in, the same device out
        out = self.accumulate(lambda i, b: self.flatten_rows(
            {n: None if t is None else t[None] for n, t in self._product(tangent, i, b).items()}, 1)[0], (self.size,))
        self.n_products += 1
        return out.to(v.device, v.dtype)

    __matmul__ = matvec

    def matmat(self, vs: torch.Tensor, chunk: int = 64) -> torch.Tensor:
        """Apply to each row of `vs` ([k, size]) -> [k, size]: `chunk` rows per pass, batched where the operator
        can (`_products`); one row at a time where an operation has no batching rule."""
        if vs.dim() != 2 or vs.shape[1] != self.size:
            raise ProbeError(f"{type(self).__name__}.matmat: expected [k, {self.size}] rows, got {tuple(vs.shape)}")
        try:
            return torch.cat([self._matmat(vs[s : s + chunk]) for s in range(0, len(vs), chunk)])
        except (RuntimeError, NotImplementedError):
            return torch.stack([self.matvec(v) for v in vs])

    def _matmat(self, vs: torch.Tensor) -> torch.Tensor:
        tangents = self.unflatten_rows(vs.to(self.device, self.dtype))
        k = len(vs)
        out = self.accumulate(lambda i, b: self.flatten_rows(self._products(tangents, i, b), k), (k, self.size))
        self.n_products += k
        return out.to(vs.device, vs.dtype)

    def dense(self) -> torch.Tensor:
        """The full [size, size] matrix (size products); for tiny models and tests."""
        if self.size > 20_000:
            raise ProbeError(f"{type(self).__name__}.dense: {self.size} parameters is too many to form the matrix")
        return self.matmat(torch.eye(self.size, dtype=self.dtype, device=self.device))

    # --- loss and gradient (the optional part of the protocol) -------------------------------------------------
    def _batch_gradient(self, p: dict[str, torch.Tensor], i: int, batch) -> torch.Tensor:
        # torch.autograd.grad, not torch.func.grad: the same values without torch.func's lazy torch._dynamo import
        with torch.enable_grad():
            leaves = {n: t.detach().requires_grad_(True) for n, t in p.items()}
            loss = self.batch_loss(leaves, batch)
            if not loss.requires_grad:  # a loss that no selected parameter reaches
                return torch.zeros(self.size, dtype=self.dtype, device=self.device)
            parts = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        return self.flatten({n: torch.zeros_like(t) if g is None else g for (n, t), g in zip(leaves.items(), parts)})

    def gradient(self, flat: torch.Tensor | None = None) -> torch.Tensor:
        """The flat gradient of the mean loss over `data` at the stored parameters, or at `flat`."""
        p = self.primals if flat is None else self.unflatten(flat)
        out = torch.zeros(self.size, dtype=self.dtype, device=self.device)

        def add(i: int, batch) -> None:
            out.add_(self._batch_gradient(p, i, batch) * self.weights[i])

        self.each_batch(add)
        return out

    def loss(self, flat: torch.Tensor | None = None) -> float:
        """Mean loss over `data` at the stored parameters, or at `flat` (a flat vector of the selected ones)."""
        p = self.primals if flat is None else self.unflatten(flat)
        total = [0.0]

        def add(i: int, batch) -> None:
            total[0] += float(self.batch_loss(p, batch)) * self.rows[i]

        with torch.no_grad():
            self.each_batch(add)
        return total[0] / self.n_examples
