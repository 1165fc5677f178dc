"""KFAC and EKFAC: Kronecker-factored approximations of the GGN / Fisher as linear operators.

For a layer y = M a with M = [W | b] (see `evaluations.probes.kfac_capture`), the GGN of the mean loss
L = (1/R) sum_r l_r over the R output rows of the data is (1/R) sum_r sum_s (J_r^T s)(J_r^T s)^T over the
seeds s of the output Hessian of l_r (its square-root columns for "type-2", sampled gradients for "mc", the
observed gradient for "empirical"). Its block for M, with the row-major vec(M) of PyTorch's flattening, is
approximated (Martens & Grosse 2015, eq. 1-3; Grosse & Martens 2016, KFC, for convolutions) by

    G (x) A,   A = mean over the layer's positions of a a^T,   G = (1/R) sum over seeds and positions of g g^T,

where g is the backpropagated gradient at the layer's output. The scaling convention: A is a mean over
every position the layer sees (examples x tokens x spatial locations), G a sum over positions divided by the
number of output rows (and by `mc_samples`); positions and rows are treated as one batch axis ("KFAC-expand",
Eschenhagen et al. 2023, "Kronecker-factored approximate curvature for modern neural network architectures").
`kfac_approx="reduce"` (their KFAC-reduce) first reduces each example's positions -- a the mean of its features,
g the sum of its output gradients -- so A = mean over examples of a a^T and G = sum over seeds and examples of
g g^T / rows; it is exact for one example whose layer output is summed over positions, and equals expand where
a layer sees one position per example. Both match curvlinops' `kfac_approx` (float64 rounding,
benchmarks/curvature_kfac.py). With one output row per example (an MLP or a CNN classifier) this is
curvlinops' `KFACLinearOperator` for a loss with reduction="mean" (cross-entropy; mse averaged over every
output entry, as `torch.nn.functional.mse_loss`), and it is the exact GGN block for a single example. The
empirical Fisher is (1/R) sum_r grad l_r grad l_r^T of the rows' own losses (for mse l_r = |f_r - y_r|^2 / k,
so its expectation under the matching Gaussian is the type-2 GGN); curvlinops normalises the mse empirical
Fisher by the R * k loss terms instead, k times this one.

EKFAC (George et al. 2018) keeps the eigenbasis Q_G (x) Q_A of the KFAC block and re-fits its diagonal:
scale[i, j] = (1/R) sum over examples and seeds of (Q_G^T dM Q_A)[i, j]^2, dM the example's gradient for the
seed (summed over its positions), computed in a second pass over the data.

Each layer is one block of a block-diagonal operator on the selected parameters (flat vectors in the order
of `op.names`). `matvec` / `matmat` go through the factors (G V A) or the eigenbasis, never the full matrix;
`inverse(damping)` is the exact inverse of K + damping I (damping added to each Kronecker eigenvalue
lambda_G,i lambda_A,j, or to each EKFAC scale); `logdet(damping)` is log det(K + damping I) and `trace()`
tr K. Factors and all products are float64; `matvec` returns its input's dtype. The factors are positive
semi-definite by construction: eigenvalues (and EKFAC scales) below n * eps * the largest are roundoff and
set to 0, so a singular K has logdet -inf and no undamped inverse.

The network runs in eval mode (Dropout off, BatchNorm running statistics). "type-2" costs one backward pass
per output class per batch; for a large vocabulary use "mc".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from evaluations.objective import LOSSES
from evaluations.probes.curvature import CurvatureOperator
from evaluations.probes.kfac_capture import Layer, LayerCapture, layers_of, seeds
from evaluations.probes.operator import Operator
from evaluations.probes.params import Selection
from taxonomy.errors import ProbeError

KINDS = ("kfac", "ekfac")
FISHER_TYPES = ("type-2", "mc", "empirical")
APPROXIMATIONS = ("expand", "reduce")


def _roundoff_to_zero(values: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a positive semi-definite matrix with the roundoff ones (below n * eps * largest) set to 0."""
    tol = max(values.shape) * torch.finfo(values.dtype).eps * float(values.abs().max())
    return torch.where(values > tol, values, torch.zeros_like(values))


@dataclass
class KroneckerBlock:
    """One layer's block on vec(M), M = [W | b] restricted to the selected parameters ([out, cols]).

    KFAC: G (x) A. EKFAC: (Q_G (x) Q_A) diag(vec scale) (Q_G (x) Q_A)^T."""

    layer: Layer
    A: torch.Tensor  # [cols, cols] float64
    G: torch.Tensor  # [out, out] float64
    kind: str = "kfac"
    refit: torch.Tensor | None = None  # EKFAC's [out, cols] scale
    _eigen: tuple | None = field(default=None, repr=False)

    @property
    def module(self) -> str:
        return self.layer.name

    @property
    def params(self) -> list[str]:
        return [p.name for p in self.layer.pieces]

    def eigen(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(lambda_G, Q_G, lambda_A, Q_A): exact eigendecompositions of the factors (float64), cached."""
        if self._eigen is None:
            lg, qg = torch.linalg.eigh(self.G)
            la, qa = torch.linalg.eigh(self.A)
            self._eigen = (_roundoff_to_zero(lg), qg, _roundoff_to_zero(la), qa)
        return self._eigen

    def scale(self) -> torch.Tensor:
        """The block's eigenvalues in the Kronecker eigenbasis, [out, cols]."""
        if self.kind == "ekfac":
            return _roundoff_to_zero(self.refit)
        lg, _, la, _ = self.eigen()
        return torch.outer(lg, la)

    def spectral(self, vs: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Q_G (fn(scale) * (Q_G^T V Q_A)) Q_A^T for V [k, out, cols]."""
        _, qg, _, qa = self.eigen()
        return qg @ (fn(self.scale()) * (qg.T @ vs @ qa)) @ qa.T

    def apply(self, vs: torch.Tensor) -> torch.Tensor:
        """The block times V [k, out, cols] (KFAC: G V A, the factors' product; EKFAC: through the eigenbasis)."""
        if self.kind == "kfac":
            return self.G @ vs @ self.A
        return self.spectral(vs, lambda s: s)

    def trace(self) -> float:
        if self.kind == "kfac":
            return float(torch.trace(self.G) * torch.trace(self.A))
        return float(self.refit.sum())

    def gather(self, xs: torch.Tensor) -> torch.Tensor:
        """Rows of flat vectors [k, n] -> this block's V [k, out, cols]."""
        k, out = xs.shape[0], self.layer.out
        return torch.cat([xs[:, p.offset : p.offset + p.numel].reshape(k, out, p.cols) for p in self.layer.pieces], 2)

    def scatter(self, vs: torch.Tensor, into: torch.Tensor) -> None:
        """Write V [k, out, cols] back into the rows of flat vectors `into` [k, n]."""
        parts = torch.split(vs, [p.cols for p in self.layer.pieces], dim=2)
        for p, part in zip(self.layer.pieces, parts):
            into[:, p.offset : p.offset + p.numel] = part.reshape(len(vs), p.numel)


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ProbeError(f"{name}: expected one of {allowed}, got {value!r}")


def _check_objective(objective) -> None:
    if getattr(objective, "loss", None) not in LOSSES or not callable(getattr(objective, "predict", None)):
        raise ProbeError(f"objective: expected an evaluations.objective.Objective (predict, loss in {LOSSES}), "
                         f"got {type(objective).__name__}")


def _damping(damping: float) -> float:
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not math.isfinite(damping) or damping < 0:
        raise ProbeError(f"damping: expected a finite number >= 0, got {damping!r}")
    return float(damping)


def _predict(objective, model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    outputs, targets = objective.predict(model, batch)
    if not isinstance(outputs, torch.Tensor) or outputs.dim() != 2 or outputs.shape[0] == 0:
        shape = tuple(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs).__name__
        name = getattr(objective, "name", type(objective).__name__)
        raise ProbeError(f"objective {name!r}: predict must return 2-D outputs [rows, C], got {shape}")
    return outputs, targets


@dataclass
class _Sweep:
    """One pass over the operator's data (its shared batch loop): forward with the capture hooks, then one
    backward per seed."""

    op: CurvatureOperator
    layers: list[Layer]
    fisher_type: str
    generator: torch.Generator
    mc_samples: int

    def run(self, on_features, on_gradient) -> int:
        """Call on_features(i, a) per layer call and on_gradient(i, g) per seed; return the number of rows
        (times `mc_samples` for "mc")."""
        rows = [0]

        def visit(_: int, batch) -> None:
            with torch.enable_grad(), LayerCapture(self.layers, on_features) as capture:
                outputs, targets = _predict(self.op.objective, self.op.model, batch)
            capture.check_calls()
            for seed in seeds(self.op.objective.loss, self.fisher_type, outputs, targets, self.generator,
                              self.mc_samples):
                for i, g in enumerate(capture.output_gradients(outputs, seed)):
                    on_gradient(i, g)
            rows[0] += int(outputs.shape[0])

        self.op.each_batch(visit)
        if rows[0] != self.op.n_examples:  # the operator's row weights and the factors' scaling agree
            raise ProbeError(f"KFAC: the objective gave {rows[0]} output rows, then {self.op.n_examples} "
                             "(predict is not deterministic)")
        return rows[0] * (self.mc_samples if self.fisher_type == "mc" else 1)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _shared(t: torch.Tensor, approx: str, reduce: str) -> torch.Tensor:
    """[B, T, d] rows over a weight-shared axis T -> the rows KFAC sums over (Eschenhagen et al. 2023, Sec. 3):
    "expand": every position a row [B * T, d]; "reduce": one row per example [B, d], the positions reduced by
    `reduce` ("mean" for features, "sum" for output gradients)."""
    if approx == "expand":
        return _flat(t)
    return t.mean(1) if reduce == "mean" else t.sum(1)


def kronecker_factors(sweep: _Sweep, approx: str = "expand") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(A, G) per layer: A the mean of a a^T over the rows `_shared` makes (positions, or examples for
    "reduce"), G the sum of g g^T over seeds and those rows / the objective's output rows."""
    device = sweep.op.device
    a_sum = [torch.zeros(n.cols, n.cols, dtype=torch.float64, device=device) for n in sweep.layers]
    g_sum = [torch.zeros(n.out, n.out, dtype=torch.float64, device=device) for n in sweep.layers]
    positions = [0] * len(sweep.layers)

    def on_features(i: int, a: torch.Tensor) -> None:
        a = _shared(a, approx, "mean")
        a_sum[i] += a.T @ a
        positions[i] += a.shape[0]

    def on_gradient(i: int, g: torch.Tensor) -> None:
        g = _shared(g, approx, "sum")
        g_sum[i] += g.T @ g

    rows = sweep.run(on_features, on_gradient)
    factors = [(a / max(n, 1), g / rows) for a, g, n in zip(a_sum, g_sum, positions)]
    for layer, (a, g) in zip(sweep.layers, factors):
        if not (torch.isfinite(a).all() and torch.isfinite(g).all()):
            raise ProbeError(f"KFAC: module {layer.name!r}: a non-finite Kronecker factor (non-finite activations "
                             "or outputs)")
    return factors


def _squared_projections(g: torch.Tensor, a: torch.Tensor, chunk_elements: int = 1 << 22) -> torch.Tensor:
    """sum_b (sum_t g[b, t] a[b, t]^T)^2 for rotated rows g [B, T, out], a [B, T, cols] -> [out, cols].

    One position per example: the square of an outer product is the outer product of the squares, one matmul.
    Otherwise per example, in chunks of about `chunk_elements` entries."""
    if g.shape[1] == 1:
        return (g[:, 0] ** 2).T @ (a[:, 0] ** 2)
    step = max(1, chunk_elements // (g.shape[2] * a.shape[2]))
    total = g.new_zeros(g.shape[2], a.shape[2])
    for lo in range(0, g.shape[0], step):
        total += (torch.einsum("bto,btc->boc", g[lo : lo + step], a[lo : lo + step]) ** 2).sum(0)
    return total


def ekfac_scales(sweep: _Sweep, blocks: list[KroneckerBlock]) -> list[torch.Tensor]:
    """George et al. 2018, eq. 9: the mean over examples and seeds of (Q_G^T dM Q_A)^2, dM = sum_t g_t a_t^T."""
    s_sum = [torch.zeros(b.layer.out, b.layer.cols, dtype=torch.float64, device=b.A.device) for b in blocks]
    rotated: dict[int, torch.Tensor] = {}

    def on_features(i: int, a: torch.Tensor) -> None:
        rotated[i] = a @ blocks[i].eigen()[3]

    def on_gradient(i: int, g: torch.Tensor) -> None:
        s_sum[i] += _squared_projections(g @ blocks[i].eigen()[1], rotated[i])

    rows = sweep.run(on_features, on_gradient)
    return [s / rows for s in s_sum]


class KFACOperator(CurvatureOperator):
    """KFAC / EKFAC approximation of the GGN ("type-2"), MC Fisher ("mc") or empirical Fisher ("empirical") of
    `objective`'s mean loss over `data`, block-diagonal over the nn.Linear / nn.Conv2d layers that own the
    selected parameters (`params`: see evaluations.probes.params). A `LinearOperator` on flat vectors (order
    `op.names`); `op.blocks` holds each layer's factors. `seed` drives the "mc" samples (`mc_samples` per row).
    `kfac_approx`: "expand" (every position of a weight-shared axis -- tokens, feature-map locations -- as its
    own row) or "reduce" (features averaged and output gradients summed over those positions, per example;
    Eschenhagen et al. 2023); they agree where a layer sees one position per example.
    The factor passes run in the shared batch loop of `CurvatureOperator` (eval mode, batch order), which
    also gives `gradient()` and `loss()` of the objective's mean loss. Convention: see the module docstring."""

    def __init__(self, model: nn.Module, objective, data, params: Selection = None, kind: str = "kfac",
                 fisher_type: str = "type-2", seed: int = 0, mc_samples: int = 1, kfac_approx: str = "expand"):
        _choice("kind", kind, KINDS)
        _choice("fisher_type", fisher_type, FISHER_TYPES)
        _choice("kfac_approx", kfac_approx, APPROXIMATIONS)
        _check_objective(objective)
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ProbeError(f"mc_samples: expected a positive integer, got {mc_samples!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ProbeError(f"seed: expected an integer >= 0, got {seed!r}")
        super().__init__(model, objective, data, params=params, mode="eval")
        self.kind, self.fisher_type, self.seed, self.kfac_approx = kind, fisher_type, seed, kfac_approx
        layers = layers_of(model, self.names, self.numels)
        sweep = _Sweep(self, layers, fisher_type, torch.Generator().manual_seed(seed), mc_samples)
        self.blocks = [KroneckerBlock(layer, a, g, kind) for layer, (a, g) in
                       zip(layers, kronecker_factors(sweep, kfac_approx))]
        if kind == "ekfac":
            for block, scale in zip(self.blocks, ekfac_scales(sweep, self.blocks)):
                block.refit = scale

    def _blockwise(self, vs: torch.Tensor, fn: Callable[[KroneckerBlock, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        self._check_rows(vs)
        xs = vs.detach().to(self.device, torch.float64)
        out = torch.zeros_like(xs)
        for block in self.blocks:
            block.scatter(fn(block, block.gather(xs)), out)
        self.n_products += len(vs)
        return out.to(vs.dtype if vs.is_floating_point() else self.dtype)

    def matmat(self, vs: torch.Tensor) -> torch.Tensor:
        """K applied to each row of `vs` ([k, n]) -> [k, n], block by block through the factors."""
        return self._blockwise(vs, KroneckerBlock.apply)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        if v.dim() != 1:
            raise ProbeError(f"KFACOperator.matvec: expected a vector of length {self.size}, got {tuple(v.shape)}")
        return self.matmat(v.reshape(1, -1))[0]

    __matmul__ = matvec

    def trace(self) -> float:
        """tr K: tr(G) tr(A) per KFAC block, the sum of the scales per EKFAC block."""
        return sum(block.trace() for block in self.blocks)

    def logdet(self, damping: float = 0.0) -> float:
        """log det(K + damping I) = sum of log(eigenvalue + damping) over every block (-inf if singular)."""
        d = _damping(damping)
        return float(sum(torch.log(block.scale() + d).sum() for block in self.blocks))

    def inverse(self, damping: float = 0.0) -> KFACInverse:
        """(K + damping I)^{-1} as an operator (exact: damping added to each Kronecker eigenvalue)."""
        d = _damping(damping)
        smallest = min(float(block.scale().min()) for block in self.blocks)
        if smallest + d <= 0:
            raise ProbeError(f"KFAC inverse: the operator is singular (smallest eigenvalue {smallest:g}); "
                             "pass damping > 0")
        return KFACInverse(self, d)


class KFACInverse(Operator):
    """(K + damping I)^{-1} of a `KFACOperator` K, block by block in the Kronecker eigenbasis."""

    def __init__(self, op: KFACOperator, damping: float):
        self.op, self.damping = op, damping
        self.shape, self.dtype, self.device, self.mode = op.shape, op.dtype, op.device, op.mode
        self.names = op.names

    def matmat(self, vs: torch.Tensor) -> torch.Tensor:
        return self.op._blockwise(vs, lambda block, v: block.spectral(v, lambda s: 1.0 / (s + self.damping)))

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        if v.dim() != 1:
            raise ProbeError(f"KFACInverse.matvec: expected a vector of length {self.shape[0]}, got {tuple(v.shape)}")
        return self.matmat(v.reshape(1, -1))[0]
