"""Empirical neural tangent kernel K(x, x') = J(x) J(x')^T (Jacot et al. 2018), three ways.

- "jacobian": per-example Jacobians by `vmap(jacrev)` and their contraction, chunked over
  examples so that at most `max_bytes` of Jacobian is held (the first method of PyTorch's
  "neural tangent kernels" tutorial).
- "ntk_vp": NTK-vector products, K e = J(x) (J(x')^T e), via one `vjp` and batched `jvp`s over
  a chunk of basis cotangents at a time (the tutorial's second method), never forming J.
- "structured": per Linear or Conv2d layer, the kernel is the elementwise product of the input Gram
  matrix and the output-gradient Gram matrix, summed over positions for convolutions (Novak et al. 2022,
  structured derivatives); other parameters fall back to "jacobian". Exact under in-place operations; a
  layer whose structured gradient disagrees with autograd's goes to "jacobian" too. See `ntk_structured.py`.

Every method runs attention through its math kernels (`math_attention`) and selects parameters by the rule of
`evaluations.probes.params`. `empirical_ntk_result` returns an `NTKResult`: the kernel and how it was computed.

Kinds: "full" -> [n1*C, n2*C] (row i*C + a is example i, output a); "block" -> [C, n1, n2]
(the per-output diagonal blocks K_aa); "trace" -> [n1, n2] = sum_a K_aa (the output-traced kernel).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

from evaluations.probes.attention import math_attention
from evaluations.probes.params import Selection, select_params
from evaluations.probes.result import ProbeResult
from merging.modes import eval_mode
from taxonomy.errors import ProbeError

KINDS = ("full", "block", "trace")
METHODS = ("auto", "jacobian", "ntk_vp", "structured")


def _split(model: nn.Module, params: Selection) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(selected, fixed) parameters and buffers, by the shared selection rule (`evaluations.probes.params`)."""
    chosen = set(select_params(model, params))
    state = {n: p.detach() for n, p in model.named_parameters()}
    state.update({n: b.detach() for n, b in model.named_buffers()})
    sel = {n: t for n, t in state.items() if n in chosen}
    fixed = {n: t for n, t in state.items() if n not in chosen}
    return sel, fixed


def _outputs(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        return int(model(x[:1]).reshape(1, -1).shape[1])


def reduce_kernel(full: torch.Tensor, kind: str) -> torch.Tensor:
    """[n1, C, n2, C] -> the requested kind's layout."""
    n1, c, n2, _ = full.shape
    if kind == "full":
        return full.reshape(n1 * c, n2 * c)
    diag = torch.diagonal(full, dim1=1, dim2=3)  # [n1, n2, C]
    if kind == "block":
        return diag.permute(2, 0, 1).contiguous()
    return diag.sum(-1)


def _check(kind: str, method: str) -> None:
    if kind not in KINDS:
        raise ProbeError(f"kind: expected one of {KINDS}, got {kind!r}")
    if method not in METHODS:
        raise ProbeError(f"method: expected one of {METHODS}, got {method!r}")


def jacobians(model: nn.Module, sel: dict, fixed: dict, x: torch.Tensor) -> list[torch.Tensor]:
    """Per-example Jacobians of the flattened output, one [n, C, numel] tensor per selected parameter."""

    def f_single(p, xi):
        return functional_call(model, {**fixed, **p}, (xi.unsqueeze(0),)).reshape(-1)

    jac = vmap(jacrev(f_single), (None, 0))(sel, x)
    return [j.reshape(j.shape[0], j.shape[1], -1) for j in jac.values()]


def _contract(j1: list[torch.Tensor], j2: list[torch.Tensor], kind: str) -> torch.Tensor:
    eq = {"full": "iap,jbp->iajb", "block": "iap,jap->aij", "trace": "iap,jap->ij"}[kind]
    return sum(torch.einsum(eq, a, b) for a, b in zip(j1, j2))


def ntk_jacobian(model, x1, x2=None, kind="full", params=None, chunk: int | None = None,
                 max_bytes: float = 2e9) -> torch.Tensor:
    """Empirical NTK by Jacobian contraction, in example chunks of `chunk` rows (default: fit `max_bytes`)."""
    sel, fixed = _split(model, params)
    same = x2 is None
    x2 = x1 if same else x2
    c = _outputs(model, x1)
    n_params = sum(t.numel() for t in sel.values())
    if chunk is None:
        chunk = max(1, int(max_bytes / (2 * 4 * c * n_params)))
    out = empty_kernel(len(x1), len(x2), c, kind, next(iter(sel.values())).dtype, x1.device)
    starts1 = range(0, len(x1), chunk)
    starts2 = range(0, len(x2), chunk)
    with torch.no_grad():
        j2_once = None if same or len(starts2) > 1 else jacobians(model, sel, fixed, x2)
        for s1 in starts1:
            j1 = jacobians(model, sel, fixed, x1[s1 : s1 + chunk])
            for s2 in starts2:
                if same and s2 == s1:
                    j2 = j1
                elif j2_once is not None:
                    j2 = j2_once
                else:
                    j2 = jacobians(model, sel, fixed, x2[s2 : s2 + chunk])
                _put(out, _contract(j1, j2, kind), s1, s2, c, kind)
    return out


def empty_kernel(n1: int, n2: int, c: int, kind: str, dtype: torch.dtype = torch.float32,
           device: torch.device | str = "cpu") -> torch.Tensor:
    shape = {"full": (n1 * c, n2 * c), "block": (c, n1, n2), "trace": (n1, n2)}[kind]
    return torch.zeros(shape, dtype=dtype, device=device)


def _put(out: torch.Tensor, part: torch.Tensor, s1: int, s2: int, c: int, kind: str) -> None:
    if kind == "full":
        a, _, b, _ = part.shape
        out[s1 * c : (s1 + a) * c, s2 * c : (s2 + b) * c] = part.reshape(a * c, b * c)
    elif kind == "block":
        out[:, s1 : s1 + part.shape[1], s2 : s2 + part.shape[2]] = part
    else:
        out[s1 : s1 + part.shape[0], s2 : s2 + part.shape[1]] = part


def ntk_vp(model, x1, x2=None, kind="full", params=None, chunk: int | None = None,
           max_bytes: float = 2e9) -> torch.Tensor:
    """Empirical NTK by NTK-vector products: columns K[:, (j, b)] = J(x1) J(x2)^T e_(j,b), `chunk` columns at a time."""
    sel, fixed = _split(model, params)
    x2 = x1 if x2 is None else x2
    c = _outputs(model, x1)
    n1, n2 = len(x1), len(x2)
    n_params = sum(t.numel() for t in sel.values())

    def f(p, x):
        return functional_call(model, {**fixed, **p}, (x,)).reshape(len(x), -1)

    if chunk is None:
        chunk = max(1, int(max_bytes / (4 * (n_params + 4 * n1 * c))))
    with torch.no_grad():
        _, vjp_fn = vjp(lambda p: f(p, x2), sel)

        def column(cot: torch.Tensor) -> torch.Tensor:
            (tangent,) = vjp_fn(cot)
            return jvp(lambda p: f(p, x1), (sel,), (tangent,))[1]

        cols = []
        eye = torch.eye(n2 * c, dtype=next(iter(sel.values())).dtype, device=x1.device)
        for s in range(0, n2 * c, chunk):
            cots = eye[s : s + chunk].reshape(-1, n2, c)
            cols.append(vmap(column)(cots))  # [chunk, n1, C]
        full = torch.cat(cols).reshape(n2, c, n1, c).permute(2, 3, 0, 1)  # [n1, C, n2, C]
    return reduce_kernel(full, kind)


@dataclass
class NTKResult(ProbeResult):
    """An empirical NTK: the kernel (layout by `kind`), the method asked for, the method each selected
    parameter took, and the Linear/Conv2d layers the structured rule left to the Jacobian method, with why.
    The kernel is computed exactly (no iteration): `converged` is True and `iterations` 0. `kernel` is a numpy
    float64 array (the model dtype's values; `empirical_ntk` returns the tensor itself)."""

    ARRAYS = ("kernel",)
    kernel: np.ndarray
    kind: str
    method: str
    methods: dict[str, str]
    fallbacks: dict[str, str] = field(default_factory=dict)

    @property
    def converged(self) -> bool:
        return True

    @property
    def iterations(self) -> int:
        return 0

    @property
    def fell_back(self) -> bool:
        """Whether a layer the structured method was asked to take went to the Jacobian method instead."""
        return bool(self.fallbacks)

    def to_json(self, kernel: bool = False) -> dict:
        out = {"kind": self.kind, "method": self.method, "shape": list(self.kernel.shape), "converged": True,
               "iterations": 0, "methods": dict(self.methods), "fallbacks": dict(self.fallbacks)}
        if kernel:
            out["kernel"] = self.kernel.tolist()
        return out


def _compute(model: nn.Module, x: torch.Tensor, x2: torch.Tensor | None, kind: str, method: str,
             params: Selection, chunk: int | None, max_bytes: float) -> tuple[torch.Tensor, dict, dict]:
    """(the kernel, a tensor in the model's dtype; the method per parameter; the structured rule's fallbacks)."""
    _check(kind, method)
    if x2 is not None and x2.shape[1:] != x.shape[1:]:
        raise ProbeError(f"x2: example shape {tuple(x2.shape[1:])} differs from x's {tuple(x.shape[1:])}")
    select_params(model, params)  # a selection matching nothing fails here, naming it
    with eval_mode(model), math_attention():
        if method in ("auto", "structured"):
            from evaluations.probes.ntk_structured import structured_ntk

            s = structured_ntk(model, x, x2, kind=kind, params=params, chunk=chunk, max_bytes=max_bytes)
            return s.kernel, s.methods, s.fallbacks
        fn = ntk_jacobian if method == "jacobian" else ntk_vp
        k = fn(model, x, x2, kind=kind, params=params, chunk=chunk, max_bytes=max_bytes)
        return k, {n: method for n in select_params(model, params)}, {}


def empirical_ntk_result(
    model: nn.Module,
    x: torch.Tensor,
    x2: torch.Tensor | None = None,
    kind: str = "full",
    method: str = "auto",
    params: Selection = None,
    chunk: int | None = None,
    max_bytes: float = 2e9,
) -> NTKResult:
    """The empirical NTK with how it was computed (arguments as `empirical_ntk`), the kernel as numpy float64."""
    kernel, methods, fallbacks = _compute(model, x, x2, kind, method, params, chunk, max_bytes)
    return NTKResult(kernel, kind, method, methods, fallbacks)


def empirical_ntk(
    model: nn.Module,
    x: torch.Tensor,
    x2: torch.Tensor | None = None,
    kind: str = "full",
    method: str = "auto",
    params: Selection = None,
    chunk: int | None = None,
    max_bytes: float = 2e9,
) -> torch.Tensor:
    """The empirical NTK of `model` between inputs `x` and `x2` (default `x`), see the module docstring for layouts.

    method "auto" uses "structured" (exact, fast for Linear and Conv2d layers, general fallback for the rest; a
    layer whose structured gradient disagrees with autograd's, as after an in-place operation the hooks cannot
    see, falls back with a warning). `params`: the parameters differentiated (`evaluations.probes.params`:
    None = all trainable, a regular expression, names or prefixes, modules, tensors). `chunk` bounds the examples
    (jacobian, structured) or kernel columns (ntk_vp) handled at once. `empirical_ntk_result` also returns how.
    """
    return _compute(model, x, x2, kind, method, params, chunk, max_bytes)[0]
