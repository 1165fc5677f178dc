"""Structured empirical NTK for Linear and Conv2d layers, never forming the network's Jacobian.

Novak, Sohl-Dickstein & Schoenholz 2022 ("Fast finite width neural tangent kernel", Sec. 3-4, structured
derivatives). A layer y_p = W u_p + b applied at positions p (one position for a Linear on [n, d] inputs,
the tokens of a Linear on [n, ..., d], the output pixels of a Conv2d, whose u_p are the unfolded input
patches) has df_c/dW = sum_p g_cp u_p^T with g_cp = df_c/dy_p, so its contribution to the kernel is

    K_W[(i, a), (j, b)] = sum_{p, q} <g_iap, g_jbq> <u_ip, u_jq>,     K_b[(i, a), (j, b)] = <sum_p g_iap, sum_q g_jbq>

(for a single position: the elementwise product of the input Gram matrix and the output-gradient Gram
matrix). Inputs u come from forward hooks (`torch.nn.functional.unfold` for Conv2d), output gradients g
from one backward pass per network output. Two contraction orders, chosen per layer by operation count:
"gram" (the Gram matrices above, contracted position by position) and "factor" (per-example weight
gradients sum_p g_p u_p^T assembled from the factors, then contracted; cheaper when the positions
outnumber the weight's columns, as for small images). Parameters of any other module (or of a module
applied more than once, a grouped or non-2D convolution) fall back to Jacobian contraction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from evaluations.probes.hvp import select_params
from evaluations.probes.ntk import _empty, ntk_jacobian
from taxonomy.errors import BasinError

ORDERS = ("auto", "gram", "factor")
_OUT_EQ = {"full": "iad,jbd->iajb", "block": "iad,jad->aij", "trace": "iad,jad->ij"}


@dataclass
class Factors:
    """A layer's structured derivative on a set of inputs."""

    patches: torch.Tensor  # [n, P, K]: the layer's input at each of its P positions (unfolded patches for conv)
    grads: torch.Tensor  # [n, C, P, O]: d f_c / d (layer output at position p)


def _conv_input(mod: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]] | None:
    """The input as `F.unfold` must see it (explicit non-zero or asymmetric padding applied) and the padding left."""
    if mod.padding_mode != "zeros":
        return F.pad(x, mod._reversed_padding_repeated_twice, mode=mod.padding_mode), (0, 0)
    if isinstance(mod.padding, str):
        if mod.padding == "valid":
            return x, (0, 0)
        pads: list[int] = []
        for d, k in zip(reversed(mod.dilation), reversed(mod.kernel_size)):  # 'same' (stride 1): maybe asymmetric
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads), (0, 0)
    return x, tuple(mod.padding)


def _patches(mod: nn.Module, inp: torch.Tensor) -> torch.Tensor | None:
    """[n, P, K] patches of one call's input, or None where the structured rule does not apply."""
    if isinstance(mod, nn.Linear):
        return inp.reshape(inp.shape[0], -1, inp.shape[-1]) if inp.dim() >= 2 else None
    if isinstance(mod, nn.Conv2d) and mod.groups == 1 and inp.dim() == 4:
        padded, pad = _conv_input(mod, inp)
        u = F.unfold(padded, mod.kernel_size, dilation=mod.dilation, padding=pad, stride=mod.stride)
        return u.transpose(1, 2)
    return None


def _positions(mod: nn.Module, grad_out: torch.Tensor) -> torch.Tensor:
    """[n, P, O] output gradients per position (matching `_patches`' P)."""
    if isinstance(mod, nn.Conv2d):
        return grad_out.reshape(grad_out.shape[0], grad_out.shape[1], -1).transpose(1, 2)
    return grad_out.reshape(grad_out.shape[0], -1, grad_out.shape[-1])


def layer_factors(model: nn.Module, x: torch.Tensor, layers: dict[str, nn.Module], chunk: int) -> dict[str, Factors]:
    """Factors of every layer in `layers` that ran exactly once per forward pass on a supported input."""
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    grads: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    clean = {n: True for n in layers}
    state = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}
    state.update({n: b.detach() for n, b in model.named_buffers()})
    for s in range(0, len(x), chunk):
        seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in layers}
        hooks = [
            mod.register_forward_hook(lambda m, i, o, name=name, seen=seen: seen[name].append((i[0], o)))
            for name, mod in layers.items()
        ]
        try:
            with torch.enable_grad():
                out = functional_call(model, state, (x[s : s + chunk],))
        finally:
            for h in hooks:
                h.remove()
        out = out.reshape(out.shape[0], -1)
        live, patches = [], {}
        for name, mod in layers.items():
            calls = seen[name]
            u = _patches(mod, calls[0][0]) if len(calls) == 1 else None
            if u is None or not calls[0][1].requires_grad:
                clean[name] = False
            elif clean[name]:
                live.append(name)
                patches[name] = u.detach()
        outs = [seen[n][0][1] for n in live]
        per_output = []
        for c in range(out.shape[1]):
            g = torch.autograd.grad(out[:, c].sum(), outs, retain_graph=c < out.shape[1] - 1, allow_unused=True)
            per_output.append([torch.zeros_like(o) if gi is None else gi.detach() for gi, o in zip(g, outs)])
        for k, name in enumerate(live):
            inputs[name].append(patches[name])
            grads[name].append(torch.stack([_positions(layers[name], p[k]) for p in per_output], dim=1))
    return {n: Factors(torch.cat(inputs[n]), torch.cat(grads[n])) for n in layers if clean[n]}


def _cost(f1: Factors, f2: Factors, kind: str) -> dict[str, float]:
    """Multiply-adds of the weight kernel by each contraction order (per the shapes of the factors)."""
    n1, c, p, o = f1.grads.shape
    n2, k = len(f2.grads), f1.patches.shape[2]
    cc = c * c if kind == "full" else c
    return {
        "gram": n1 * n2 * (p * p * k + p * p * c * o + p * cc * o) if p > 1 else n1 * n2 * (k + cc * o),
        "factor": (n1 + n2) * c * p * o * k + n1 * n2 * cc * o * k,
    }


def _blocks(n1: int, n2: int, pair_bytes: float, example_bytes: float, max_bytes: float, same: bool):
    """Row and column slices covering [n1, n2] so that one block's temporaries fit `max_bytes`.

    With `same`, only blocks on or below the diagonal are listed (the caller mirrors the others)."""
    side = max(1, int(math.sqrt(max_bytes / max(pair_bytes, 1.0))))
    side = max(1, min(side, int(max_bytes / 2 / max(example_bytes, 1.0))))
    rows = [slice(s, min(s + side, n1)) for s in range(0, n1, side)]
    cols = [slice(s, min(s + side, n2)) for s in range(0, n2, side)]
    return [(r, c) for bi, r in enumerate(rows) for bj, c in enumerate(cols) if not same or bj <= bi]


def _weight_block(f1: Factors, f2: Factors, r: slice, c: slice, kind: str, order: str, bias: bool) -> torch.Tensor:
    """The weight (and, with one position, bias) kernel on rows r x columns c, in the kind's layout."""
    u1, g1, u2, g2 = f1.patches[r], f1.grads[r], f2.patches[c], f2.grads[c]
    eq = _OUT_EQ[kind]
    if u1.shape[1] == 1:  # one position: (input Gram [+ 1 for the bias]) * output-gradient Gram
        gram_in = u1[:, 0] @ u2[:, 0].T
        if bias:
            gram_in = gram_in + 1.0
        gram_out = torch.einsum(eq, g1[:, :, 0], g2[:, :, 0])
        return gram_out * {"full": gram_in[:, None, :, None], "block": gram_in[None], "trace": gram_in}[kind]
    if order == "factor":
        j1 = torch.einsum("iapo,ipk->iaok", g1, u1).flatten(2)
        j2 = torch.einsum("iapo,ipk->iaok", g2, u2).flatten(2)
        return torch.einsum(eq, j1, j2)
    gram_in = torch.einsum("ipk,jqk->ijpq", u1, u2)
    if kind == "full":
        return torch.einsum("iapo,ijpbo->iajb", g1, torch.einsum("ijpq,jbqo->ijpbo", gram_in, g2))
    mixed = torch.einsum("ijpq,jaqo->ijpao", gram_in, g2)
    return torch.einsum("iapo,ijpao->" + ("aij" if kind == "block" else "ij"), g1, mixed)


def _mirror(part: torch.Tensor, kind: str) -> torch.Tensor:
    """The block (j, i) from the block (i, j) of a symmetric kernel."""
    return {"full": lambda t: t.permute(2, 3, 0, 1), "block": lambda t: t.transpose(1, 2), "trace": lambda t: t.T}[
        kind
    ](part)


def ntk_structured(
    model: nn.Module,
    x1: torch.Tensor,
    x2: torch.Tensor | None = None,
    kind: str = "full",
    params: str | Sequence[str] | None = None,
    chunk: int | None = None,
    max_bytes: float = 2e9,
    order: str = "auto",
) -> torch.Tensor:
    """Empirical NTK (layouts as `empirical_ntk`) from per-layer structured derivatives; other parameters by
    Jacobian contraction. `chunk`: examples per forward/backward pass (default 1024); `max_bytes` bounds the
    temporaries of each kernel block; `order`: the contraction order ("auto" picks the cheaper per layer)."""
    if order not in ORDERS:
        raise BasinError(f"order: expected one of {ORDERS}, got {order!r}")
    chosen = set(select_params(model, params))
    layers = {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, (nn.Linear, nn.Conv2d)) and any(f"{name}.{p}" in chosen for p in ("weight", "bias"))
    }
    same = x2 is None
    x2 = x1 if same else x2
    step = chunk or 1024
    fac1 = layer_factors(model, x1, layers, step)
    fac2 = fac1 if same else layer_factors(model, x2, layers, step)
    with torch.no_grad():
        c = int(model(x1[:1]).reshape(1, -1).shape[1])
    n1, n2 = len(x1), len(x2)
    dtype = next(model.parameters()).dtype
    out = _empty(n1, n2, c, kind, dtype, x1.device)
    view = out.view(n1, c, n2, c) if kind == "full" else out
    covered: set[str] = set()
    with torch.no_grad():
        for name, f1 in fac1.items():
            f2 = fac2[name]
            mod = layers[name]
            w_in = f"{name}.weight" in chosen
            b_in = f"{name}.bias" in chosen and mod.bias is not None
            single = f1.patches.shape[1] == 1
            cost = _cost(f1, f2, kind)
            use = min(cost, key=cost.get) if order == "auto" else order
            _, _, p, o = f1.grads.shape
            k = f1.patches.shape[2]
            per_pair = 4 * (c * c if kind == "full" else c) * (3 if single else 1)
            if not single:
                per_pair += 4 * (p * p + p * c * o if use == "gram" else 0)
            per_example = 4 * (c * o * k if use == "factor" else c * p * o)
            for r, col in _blocks(n1, n2, per_pair, per_example, max_bytes, same):
                part = torch.zeros(0)
                if w_in:
                    part = _weight_block(f1, f2, r, col, kind, use, bias=b_in and single)
                if b_in and not (w_in and single):
                    gb = torch.einsum(_OUT_EQ[kind], f1.grads[r].sum(2), f2.grads[col].sum(2))
                    part = gb if part.numel() == 0 else part + gb
                _put(view, part, r, col, kind)
                if same and r != col:
                    _put(view, _mirror(part, kind), col, r, kind)
            covered |= {f"{name}.weight"} if w_in else set()
            covered |= {f"{name}.bias"} if b_in else set()
    rest = [n for n in select_params(model, params) if n not in covered]
    if rest:
        out += ntk_jacobian(model, x1, None if same else x2, kind=kind, params=rest, chunk=chunk,
                            max_bytes=max_bytes)
    return out


def _put(view: torch.Tensor, part: torch.Tensor, r: slice, c: slice, kind: str) -> None:
    """Add a block into the output (full: [n1, C, n2, C] view; block: [C, n1, n2]; trace: [n1, n2])."""
    if kind == "full":
        view[r, :, c] += part
    elif kind == "block":
        view[:, r, c] += part
    else:
        view[r, c] += part
