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
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from evaluations.probes.ntk import empty_kernel, ntk_jacobian
from evaluations.probes.params import Selection, select_params
from taxonomy.errors import ProbeError

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
    """[n, P, K] patches of one call's input (a copy: later in-place operations on it leave it unchanged),
    or None where the structured rule does not apply."""
    if isinstance(mod, nn.Linear):
        return inp.reshape(inp.shape[0], -1, inp.shape[-1]).clone() if inp.dim() >= 2 else None
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


def pname(module: str, param: str) -> str:
    """The state-dict name of a module's parameter ("" is the root module)."""
    return f"{module}.{param}" if module else param


Calls = dict[str, list[tuple[torch.Tensor | None, torch.Tensor]]]


def _forward(model: nn.Module, state: dict, x: torch.Tensor,
             layers: dict[str, nn.Module]) -> tuple[torch.Tensor, Calls]:
    """[n, C] outputs and, per layer, each call's (patches, output). The hook hands the network a copy of the
    layer's output and keeps the original, which no later in-place operation (ReLU(inplace=True), x += f(x))
    can then modify: the gradient taken with respect to it is the gradient with respect to the layer's output."""
    seen: Calls = {n: [] for n in layers}

    def hook(mod: nn.Module, inputs: tuple, out: torch.Tensor, name: str) -> torch.Tensor:
        seen[name].append((_patches(mod, inputs[0].detach()), out))
        return out.clone()

    hooks = [mod.register_forward_hook(lambda m, i, o, name=name: hook(m, i, o, name)) for name, mod in layers.items()]
    try:
        with torch.enable_grad():
            out = functional_call(model, state, (x,))
    finally:
        for h in hooks:
            h.remove()
    return out.reshape(out.shape[0], -1), seen


def _unsupported(calls: list) -> str | None:
    """Why the structured rule cannot take a layer with these calls, or None."""
    if len(calls) != 1:
        return f"called {len(calls)} times in one forward pass"
    if calls[0][0] is None:
        return "an input or configuration the structured rule does not cover"
    if not calls[0][1].requires_grad:
        return "its output does not depend on its parameters"
    return None


def _output_grads(out: torch.Tensor, outs: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Per network output c, the gradients of sum_i f_ic with respect to each layer output (graph kept)."""
    per_output = []
    for c in range(out.shape[1]):
        g = torch.autograd.grad(out[:, c].sum(), outs, retain_graph=True, allow_unused=True)
        per_output.append([torch.zeros_like(o) if gi is None else gi.detach() for gi, o in zip(g, outs)])
    return per_output


def _mismatch(est: torch.Tensor, ref: torch.Tensor | None) -> float:
    """|est - ref| / max(|est|, |ref|) in float64 (0 when both vanish; a missing ref is zero)."""
    est = est.double()
    ref = torch.zeros_like(est) if ref is None else ref.double().reshape(est.shape)
    scale = max(float(est.norm()), float(ref.norm()))
    return float((est - ref).norm()) / scale if scale > 0 else 0.0


def _verify(out: torch.Tensor, factors: dict[str, Factors], used: dict[str, list[str]], state: dict,
            seed: int = 0) -> dict[str, float]:
    """Relative error, per layer, of the structured gradient of a random projection <v, f> of the outputs
    against autograd's (one extra backward pass): exact structure gives rounding error only, while an
    operation the hooks cannot see (an in-place op on a captured tensor, the weight used outside the
    module) gives an O(1) error."""
    v = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    v = v.to(out.device, out.dtype)
    keys = [(name, p) for name, ps in used.items() for p in ps]
    auto = torch.autograd.grad((out * v).sum(), [state[pname(n, p)] for n, p in keys], allow_unused=True)
    errors: dict[str, float] = {}
    for (name, p), ref in zip(keys, auto):
        f = factors[name]
        gv = torch.einsum("icpo,ic->ipo", f.grads, v)
        est = torch.einsum("ipo,ipk->ok", gv, f.patches) if p == "weight" else gv.sum((0, 1))
        errors[name] = max(errors.get(name, 0.0), _mismatch(est, ref))
    return errors


def _chunk_factors(model: nn.Module, state: dict, x: torch.Tensor, layers: dict[str, nn.Module],
                   used: dict[str, list[str]], why: dict[str, str]) -> dict[str, Factors]:
    """One chunk's factors of the layers not yet ruled out (`why` collects the reasons of those ruled out)."""
    out, seen = _forward(model, state, x, layers)
    for name in layers:
        reason = None if name in why else _unsupported(seen[name])
        if reason is not None:
            why[name] = reason
    live = [n for n in layers if n not in why]
    if not live:
        return {}
    outs = [seen[n][0][1] for n in live]
    per_output = _output_grads(out, outs)
    factors = {
        name: Factors(seen[name][0][0], torch.stack([_positions(layers[name], p[k]) for p in per_output], dim=1))
        for k, name in enumerate(live)
    }
    tol = torch.finfo(out.dtype).eps ** 0.5
    for name, err in _verify(out, factors, {n: used[n] for n in live}, state).items():
        if err > tol:
            why[name] = (f"its structured gradient differs from autograd's by {err:.1e} (relative): an in-place "
                         "operation on its input or output, or its weight used outside the module")
            del factors[name]
    return factors


def layer_factors(model: nn.Module, x: torch.Tensor, layers: dict[str, nn.Module], chunk: int,
                  why: dict[str, str] | None = None,
                  used: dict[str, list[str]] | None = None) -> dict[str, Factors]:
    """Factors of every layer in `layers` that ran exactly once per forward pass on a supported input and whose
    structured gradient matches autograd's; the others are named in `why` with the reason. `used`: the
    parameters ("weight", "bias") of each layer the kernel takes (default: those the layer has)."""
    why = {} if why is None else why
    owned = dict(model.named_parameters())  # a tied parameter only under its first name
    used = used or {n: [p for p in ("weight", "bias") if pname(n, p) in owned] for n in layers}
    state = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}
    state.update({n: b.detach() for n, b in model.named_buffers()})
    parts: list[dict[str, Factors]] = []
    for s in range(0, len(x), chunk):
        parts.append(_chunk_factors(model, state, x[s : s + chunk], layers, used, why))
    keep = [n for n in layers if n not in why]
    return {n: Factors(torch.cat([p[n].patches for p in parts]), torch.cat([p[n].grads for p in parts])) for n in keep}


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


def _layer_kernel(view: torch.Tensor, f1: Factors, f2: Factors, params: list[str], kind: str, order: str,
                  same: bool, max_bytes: float) -> None:
    """Add one layer's kernel (its parameters `params`, "weight" and/or "bias") into `view`, block by block."""
    n1, c, p, o = f1.grads.shape
    n2, k = len(f2.grads), f1.patches.shape[2]
    w_in, b_in = "weight" in params, "bias" in params
    single = p == 1
    cost = _cost(f1, f2, kind)
    use = min(cost, key=cost.get) if order == "auto" else order
    per_pair = 4 * (c * c if kind == "full" else c) * (3 if single else 1)
    if not single:
        per_pair += 4 * (p * p + p * c * o if use == "gram" else 0)
    per_example = 4 * (c * o * k if use == "factor" else c * p * o)
    for r, col in _blocks(n1, n2, per_pair, per_example, max_bytes, same):
        part = _weight_block(f1, f2, r, col, kind, use, bias=b_in and single) if w_in else None
        if b_in and not (w_in and single):
            gb = torch.einsum(_OUT_EQ[kind], f1.grads[r].sum(2), f2.grads[col].sum(2))
            part = gb if part is None else part + gb
        _put(view, part, r, col, kind)
        if same and r != col:
            _put(view, _mirror(part, kind), col, r, kind)


def _candidates(model: nn.Module, names: list[str]) -> dict[str, tuple[nn.Module, list[str]]]:
    """Linear and Conv2d modules with a selected weight or bias: name -> (module, its selected parameters)."""
    chosen = set(names)
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            params = [p for p in ("weight", "bias") if pname(name, p) in chosen]
            if params:
                out[name] = (mod, params)
    return out


@dataclass
class StructuredNTK:
    """The kernel, the parameters each method computed, and why candidate layers left the structured rule."""

    kernel: torch.Tensor
    methods: dict[str, str]  # parameter name -> "structured" or "jacobian"
    fallbacks: dict[str, str]  # Linear/Conv2d module name -> why its parameters took the Jacobian method


def structured_ntk(
    model: nn.Module,
    x1: torch.Tensor,
    x2: torch.Tensor | None = None,
    kind: str = "full",
    params: Selection = None,
    chunk: int | None = None,
    max_bytes: float = 2e9,
    order: str = "auto",
) -> StructuredNTK:
    """`ntk_structured`, with the method taken by each parameter and the reasons for each fallback. A layer
    whose structured gradient disagrees with autograd's (an in-place operation the hooks cannot see) is
    recomputed by the Jacobian method, with a warning."""
    if order not in ORDERS:
        raise ProbeError(f"order: expected one of {ORDERS}, got {order!r}")
    names = select_params(model, params)
    cands = _candidates(model, names)
    layers = {n: m for n, (m, _) in cands.items()}
    used = {n: ps for n, (_, ps) in cands.items()}
    same = x2 is None
    x2 = x1 if same else x2
    why: dict[str, str] = {}
    step = chunk or 1024
    fac1 = layer_factors(model, x1, layers, step, why, used)
    fac2 = fac1 if same else layer_factors(model, x2, layers, step, why, used)
    with torch.no_grad():
        c = int(model(x1[:1]).reshape(1, -1).shape[1])
    n1, n2 = len(x1), len(x2)
    out = empty_kernel(n1, n2, c, kind, next(model.parameters()).dtype, x1.device)
    view = out.view(n1, c, n2, c) if kind == "full" else out
    methods = {}
    with torch.no_grad():
        for name in [n for n in layers if n not in why]:
            _layer_kernel(view, fac1[name], fac2[name], used[name], kind, order, same, max_bytes)
            methods.update({pname(name, p): "structured" for p in used[name]})
    rest = [n for n in names if n not in methods]
    if rest:
        out += ntk_jacobian(model, x1, None if same else x2, kind=kind, params=rest, chunk=chunk,
                            max_bytes=max_bytes)
        methods.update({n: "jacobian" for n in rest})
    for name, reason in why.items():
        if reason.startswith("its structured gradient differs"):
            warnings.warn(f"empirical NTK: layer {name!r}: {reason}; its parameters use the Jacobian method",
                          stacklevel=3)
    return StructuredNTK(out, {n: methods[n] for n in names}, why)


def ntk_structured(
    model: nn.Module,
    x1: torch.Tensor,
    x2: torch.Tensor | None = None,
    kind: str = "full",
    params: Selection = None,
    chunk: int | None = None,
    max_bytes: float = 2e9,
    order: str = "auto",
) -> torch.Tensor:
    """Empirical NTK (layouts as `empirical_ntk`) from per-layer structured derivatives; other parameters by
    Jacobian contraction. `chunk`: examples per forward/backward pass (default 1024); `max_bytes` bounds the
    temporaries of each kernel block; `order`: the contraction order ("auto" picks the cheaper per layer)."""
    return structured_ntk(model, x1, x2, kind, params, chunk, max_bytes, order).kernel


def _put(view: torch.Tensor, part: torch.Tensor, r: slice, c: slice, kind: str) -> None:
    """Add a block into the output (full: [n1, C, n2, C] view; block: [C, n1, n2]; trace: [n1, n2])."""
    if kind == "full":
        view[r, :, c] += part
    elif kind == "block":
        view[:, r, c] += part
    else:
        view[r, c] += part
