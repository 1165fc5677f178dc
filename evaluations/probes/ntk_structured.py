"""Structured empirical NTK for Linear layers, never forming the Jacobian (Novak et al. 2022, "Fast finite width NTK").

For y = W a + b applied once per example, df_c/dW = g_c a^T with g_c = df_c/dy, so the layer's
contribution is K_l[(i, c), (j, c')] = (a_i . a_j + [bias]) * (g_ic . g_jc'): the elementwise
product of the input Gram matrix and the output-gradient Gram matrix (Novak et al. 2022, Sec. 3,
"structured derivatives" for a matrix-multiply primitive). Inputs a come from forward hooks,
output gradients g from one backward pass per output. Parameters of any other module (or of a
Linear applied to non-2D input or more than once) fall back to Jacobian contraction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call

from evaluations.probes.hvp import select_params
from evaluations.probes.ntk import _empty, ntk_jacobian


def _factors(model: nn.Module, x: torch.Tensor, linears: dict[str, nn.Linear], chunk: int):
    """Per Linear: inputs [n, d_in], output gradients [n, C, d_out], and how often it ran / input rank."""
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
    grads: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
    clean = {n: True for n in linears}
    state = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}
    state.update({n: b.detach() for n, b in model.named_buffers()})
    for s in range(0, len(x), chunk):
        seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in linears}
        hooks = [
            mod.register_forward_hook(lambda m, i, o, name=name, seen=seen: seen[name].append((i[0], o)))
            for name, mod in linears.items()
        ]
        try:
            with torch.enable_grad():
                out = functional_call(model, state, (x[s : s + chunk],))
        finally:
            for h in hooks:
                h.remove()
        out = out.reshape(out.shape[0], -1)
        live = []
        for name in linears:
            calls = seen[name]
            if len(calls) != 1 or calls[0][0].dim() != 2:
                clean[name] = False
            elif clean[name]:
                live.append(name)
        outs = [seen[n][0][1] for n in live]
        per_output = []
        for c in range(out.shape[1]):
            g = torch.autograd.grad(out[:, c].sum(), outs, retain_graph=c < out.shape[1] - 1, allow_unused=True)
            per_output.append([torch.zeros_like(o) if gi is None else gi for gi, o in zip(g, outs)])
        for k, name in enumerate(live):
            inputs[name].append(seen[name][0][0].detach())
            grads[name].append(torch.stack([p[k] for p in per_output], dim=1).detach())
    return (
        {n: torch.cat(inputs[n]) for n in linears if clean[n]},
        {n: torch.cat(grads[n]) for n in linears if clean[n]},
    )


def ntk_structured(
    model: nn.Module,
    x1: torch.Tensor,
    x2: torch.Tensor | None = None,
    kind: str = "full",
    params: str | Sequence[str] | None = None,
    chunk: int | None = None,
    max_bytes: float = 2e9,
) -> torch.Tensor:
    """Empirical NTK (layouts as `empirical_ntk`) from per-layer Gram matrices; other parameters by Jacobians."""
    chosen = set(select_params(model, params))
    linears = {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and any(f"{name}.{p}" in chosen for p in ("weight", "bias"))
    }
    same = x2 is None
    x2 = x1 if same else x2
    step = chunk or 1024
    a1, g1 = _factors(model, x1, linears, step)
    a2, g2 = (a1, g1) if same else _factors(model, x2, linears, step)
    c = g1[next(iter(g1))].shape[1] if g1 else None
    if c is None:
        with torch.no_grad():
            c = int(model(x1[:1]).reshape(1, -1).shape[1])
    n1, n2 = len(x1), len(x2)
    dtype = next(model.parameters()).dtype
    out = _empty(n1, n2, c, kind, dtype)
    covered: set[str] = set()
    eq = {"full": "iad,jbd->iajb", "block": "iad,jad->aij", "trace": "iad,jad->ij"}[kind]
    with torch.no_grad():
        for name in a1:
            w_in, b_in = f"{name}.weight" in chosen, f"{name}.bias" in chosen and linears[name].bias is not None
            gram_in = (a1[name] @ a2[name].T) if w_in else torch.zeros(n1, n2, dtype=dtype)
            if b_in:
                gram_in = gram_in + 1.0
            gram_out = torch.einsum(eq, g1[name], g2[name])
            if kind == "full":
                part = gram_in[:, None, :, None] * gram_out
            elif kind == "block":
                part = gram_in[None] * gram_out
            else:
                part = gram_in * gram_out
            out += part.reshape(out.shape)
            covered |= {f"{name}.weight"} if w_in else set()
            covered |= {f"{name}.bias"} if b_in else set()
    rest = [n for n in select_params(model, params) if n not in covered]
    if rest:
        out += ntk_jacobian(model, x1, None if same else x2, kind=kind, params=rest, chunk=chunk,
                            max_bytes=max_bytes)
    return out
