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
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from evaluations.probes.attention import math_attention
from evaluations.probes.operator import Operator
from evaluations.probes.params import Selection, select_params
from taxonomy.errors import ProbeError

Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]
MODES = ("eval", "train")
METHODS = ("double_backward", "forward_over_reverse")


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


def as_batches(data, batch_size: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`(x, y)` tensors (optionally split into batches) or an iterable of `(x, y)` batches -> list of batches."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        if len(x) != len(y):
            raise ProbeError(f"data: x has {len(x)} examples but y has {len(y)}")
        if batch_size is None or batch_size >= len(x):
            return [(x, y)]
        return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    if isinstance(data, Iterable):
        batches = [(b[0], b[1]) for b in data]
        if not batches:
            raise ProbeError("data: no batches")
        return batches
    raise ProbeError(f"data: expected (x, y) tensors or an iterable of batches, got {type(data).__name__}")


class HessianOperator(Operator):
    """The Hessian of `loss_fn(model(x), y)` (mean over `data`) w.r.t. the selected parameters.

    `mode`: the network's mode ("eval", the default, or "train": BatchNorm batch statistics; see
    `network_mode`); `method`: the differentiation route ("double_backward" or "forward_over_reverse").

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
        if mode not in MODES:
            raise ProbeError(f"mode: expected 'eval' or 'train', got {mode!r}")
        self.method = method
        self.mode = mode
        self.model = model
        self.loss_fn = loss_fn
        self.batches = as_batches(data, batch_size)
        self.n_examples = sum(len(b[0]) for b in self.batches)
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
        # double backward: keep each batch's gradient graph so an HVP costs one backward pass (default: one batch)
        self.cache_graph = len(self.batches) == 1 if cache_graph is None else cache_graph
        self._graphs: dict[int, tuple] = {}  # batch id -> (leaf params, gradient with its graph)
        self._hvp = self._make_hvp()

    def _loss(self, p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(functional_call(self.model, {**self.fixed, **p}, (x,)), y)

    def _make_hvp(self):
        # built once per operator: the per-call work is one jvp (forward-over-reverse) or one backward pass
        # through the cached gradient graph (double backward), never a rebuilt closure or graph
        grad_fn = grad(self._loss)

        def hvp(v: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
            try:
                return jvp(lambda p: grad_fn(p, x, y), (self.primals,), (v,))[1]
            except RuntimeError as err:  # a forward-mode rule missing or broken in torch (e.g. F.mse_loss's)
                self._fall_back(err, hvp_double)
                return hvp_double(v, x, y)

        def hvp_double(v: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
            p, g = self._gradient_graph(x, y)
            with torch.enable_grad():
                hv = torch.autograd.grad(g, list(p.values()), grad_outputs=[v[n] for n in p], allow_unused=True,
                                         retain_graph=self.cache_graph)
            return {n: torch.zeros_like(p[n]) if h is None else h for n, h in zip(p, hv)}

        return hvp if self.method == "forward_over_reverse" else hvp_double

    def _fall_back(self, err: RuntimeError, hvp_double) -> None:
        """Forward-over-reverse failed: the same Hessian by double backward from now on (warned, and in `method`)."""
        warnings.warn(f"HessianOperator: forward_over_reverse failed ({str(err).splitlines()[0]}); "
                      "using double_backward", RuntimeWarning, stacklevel=4)
        self.method = "double_backward"
        self._hvp = hvp_double

    def _gradient_graph(self, x: torch.Tensor, y: torch.Tensor):
        """(leaf parameters, gradient with its graph) for one batch; kept for reuse when `cache_graph`."""
        if id(x) in self._graphs:
            return self._graphs[id(x)]
        with torch.enable_grad():
            p = {n: t.detach().requires_grad_(True) for n, t in self.primals.items()}
            g = torch.autograd.grad(self._loss(p, x, y), list(p.values()), create_graph=True)
        if self.cache_graph:
            self._graphs[id(x)] = (p, g)
        return p, g

    @contextmanager
    def context(self) -> Iterator[None]:
        """The network in `self.mode` and attention on the math backend (see the module docstring)."""
        with network_mode(self.model, self.mode), math_attention():
            yield

    def unflatten(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(v, self.numels)
        return {n: part.reshape(s) for n, part, s in zip(self.names, parts, self.shapes)}

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def flat_params(self) -> torch.Tensor:
        return self.flatten(self.primals)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        if v.shape != (self.size,):
            raise ProbeError(f"HessianOperator: vector has shape {tuple(v.shape)}, expected ({self.size},)")
        tangent = self.unflatten(v.to(self.device, self.dtype))  # any device in, the same device out
        with self.context():
            if len(self.batches) == 1:  # one full-batch pass: no accumulation buffer
                out = self.flatten(self._hvp(tangent, *self.batches[0]))
            else:
                out = torch.zeros(self.size, dtype=self.dtype, device=self.device)
                for x, y in self.batches:
                    out += self.flatten(self._hvp(tangent, x, y)) * (len(x) / self.n_examples)
        self.n_products += 1
        return out.to(v.device, v.dtype)

    __matmul__ = matvec

    def matmat(self, vs: torch.Tensor, chunk: int = 64) -> torch.Tensor:
        """Apply to each row of `vs` ([k, size]) -> [k, size]: `chunk` rows per pass, batched by `vmap`
        (`is_grads_batched` for double backward); one row at a time where an operation has no batching rule."""
        if vs.dim() != 2 or vs.shape[1] != self.size:
            raise ProbeError(f"HessianOperator.matmat: expected [k, {self.size}] rows, got {tuple(vs.shape)}")
        try:
            return torch.cat([self._matmat(vs[s : s + chunk]) for s in range(0, len(vs), chunk)])
        except (RuntimeError, NotImplementedError):
            return torch.stack([self.matvec(v) for v in vs])

    def _matmat(self, vs: torch.Tensor) -> torch.Tensor:
        rows = vs.to(self.device, self.dtype)
        tangents = {n: t.reshape(len(rows), *s) for n, t, s in zip(self.names, torch.split(rows, self.numels, 1),
                                                                      self.shapes)}
        out = torch.zeros(len(rows), self.size, dtype=self.dtype, device=self.device)
        with self.context():
            for x, y in self.batches:
                if self.method == "forward_over_reverse":
                    parts = vmap(lambda v, x=x, y=y: self._hvp(v, x, y))(tangents)
                else:
                    p, g = self._gradient_graph(x, y)
                    with torch.enable_grad():
                        hv = torch.autograd.grad(g, list(p.values()), grad_outputs=[tangents[n] for n in p],
                                                 allow_unused=True, retain_graph=True, is_grads_batched=True)
                    parts = {n: torch.zeros_like(tangents[n]) if h is None else h for n, h in zip(p, hv)}
                flat = torch.cat([parts[n].reshape(len(rows), -1) for n in self.names], 1)
                out += flat * (len(x) / self.n_examples)
        self.n_products += len(rows)
        return out.to(vs.device, vs.dtype)

    def dense(self) -> torch.Tensor:
        """The full [size, size] matrix (size Hessian-vector products); for tiny models and tests."""
        if self.size > 20_000:
            raise ProbeError(f"HessianOperator.dense: {self.size} parameters is too many to form the Hessian")
        eye = torch.eye(self.size, dtype=self.dtype, device=self.device)
        return self.matmat(eye)

    def gradient(self, flat: torch.Tensor | None = None) -> torch.Tensor:
        """The flat gradient of the mean loss over `data` at the stored parameters (free when the gradient
        graphs are cached), or at `flat` (a flat vector of the selected parameters)."""
        out = torch.zeros(self.size, dtype=self.dtype, device=self.device)
        cached = flat is None and self.method == "double_backward" and self.cache_graph
        p = self.primals if flat is None else self.unflatten(flat)
        with self.context():
            for x, y in self.batches:
                if cached:
                    _, g = self._gradient_graph(x, y)
                    part = torch.cat([t.detach().reshape(-1) for t in g])
                else:
                    part = self.flatten(grad(self._loss)(p, x, y))
                out += part * (len(x) / self.n_examples)
        return out

    def loss(self, flat: torch.Tensor | None = None) -> float:
        """Mean loss over `data` at the stored parameters, or at `flat` (a flat vector of the selected ones)."""
        p = self.primals if flat is None else self.unflatten(flat)
        total = 0.0
        with torch.no_grad(), self.context():
            for x, y in self.batches:
                total += float(self.loss_fn(functional_call(self.model, {**self.fixed, **p}, (x,)), y)) * len(x)
        return total / self.n_examples
