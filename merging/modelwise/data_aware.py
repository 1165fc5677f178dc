"""Data-aware merges: Fisher merging and RegMean (importance-weighted averaging).

- Fisher merging (Matena and Raffel 2022, Merging Models with Fisher-Weighted Averaging, eq. 3):
  theta* = sum_i w_i F_i theta_i / sum_i w_i F_i per parameter entry, with F_i the diagonal
  empirical Fisher of model i, the mean over examples of the squared gradient of the per-example
  loss (negative log-likelihood of the true label), plus a small epsilon.
- RegMean (Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights of Language Models,
  eq. 2-3): for every Linear layer, W*^T = (sum_i G~_i)^-1 sum_i G~_i W_i^T with G_i = X_i^T X_i the
  Gram matrix of the layer's inputs on model i's data and G~ = alpha G + (1 - alpha) diag(G); every
  other parameter (biases included) is the weighted average.

Both take nn.Modules of one architecture and data, and return a state dict.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from merging.alignment.activation_matching import run_model
from merging.batches import input_batches, xy_batches
from merging.modes import eval_mode
from taxonomy import get as get_info
from taxonomy.errors import BasinError

_FISHER = get_info("fisher").defaults()  # the defaults are the taxonomy entries'
_REGMEAN = get_info("regmean").defaults()


def _check_models(models: Sequence[nn.Module], weights: Sequence[float] | None) -> list[float]:
    if len(models) < 1:
        raise BasinError("merge: no models given")
    ref = {k: tuple(v.shape) for k, v in models[0].state_dict().items()}
    for i, m in enumerate(models[1:], 1):
        other = {k: tuple(v.shape) for k, v in m.state_dict().items()}
        if other != ref:
            diff = sorted(set(ref.items()) ^ set(other.items()))[0][0]
            raise BasinError(f"merge: model {i} differs from model 0 in architecture at tensor {diff!r}")
    w = [1.0] * len(models) if weights is None else [float(x) for x in weights]
    if len(w) != len(models) or sum(w) <= 0 or min(w) < 0:
        raise BasinError(f"merge: weights must be {len(models)} non-negative numbers with a positive sum, got {w}")
    return w


def _per_model(data: Any, n: int) -> list[Any]:
    """One dataset per model: a list of n datasets, or one dataset shared by all."""
    if isinstance(data, list) and len(data) == n and n > 1:
        return data
    return [data] * n


def _add_squared_gradients(total: dict[str, torch.Tensor], example_grad: Callable, params: dict, x: torch.Tensor,
                           y: torch.Tensor, batched: Callable | None) -> bool:
    """Add the squared per-example gradients of one batch to `total` (float64): vmapped when the model allows it,
    else one example at a time (models with data-dependent control flow, e.g. transformers' attention-mask checks,
    which vmap cannot trace), holding one example's gradient at a time. Returns whether vmap still applies."""
    if batched is not None:
        try:
            grads = batched(params, x, y)
        except RuntimeError as err:
            if "vmap" not in str(err):
                raise
        else:
            for k, g in grads.items():
                total[k] += (g.double() ** 2).sum(0)
            return True
    for i in range(len(x)):
        for k, g in example_grad(params, x[i], y[i]).items():
            total[k] += g.double() ** 2
    return False


def diagonal_fisher(model: nn.Module, data: Any, loss_fn: Callable | None = None) -> dict[str, torch.Tensor]:
    """Mean over examples of the squared per-example gradient of `loss_fn` (default cross-entropy)."""
    from torch.func import functional_call, grad, vmap

    loss_fn = loss_fn or nn.functional.cross_entropy
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def example_loss(p, x, y):
        out = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    example_grad = grad(example_loss)
    batched: Callable | None = vmap(example_grad, in_dims=(None, 0, 0))
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in params.items()}
    count = 0
    # outer no_grad: tensors outside `params` that require grad (a task head hidden from named_parameters) must not
    # record an outer autograd graph into the float64 sums (it grew by a model's size per example); torch.func.grad
    # ignores an outer no_grad, so the gradients themselves are unchanged
    with eval_mode(model), torch.no_grad():
        for x, y in xy_batches(data):
            try:
                vmapped = _add_squared_gradients(total, example_grad, params, x, y, batched)
            except RuntimeError as err:
                raise BasinError(f"data: a batch of shape {tuple(x.shape)} does not fit the model "
                                 f"({str(err).splitlines()[0]})") from None
            batched = batched if vmapped else None
            count += len(x)
    if count == 0:
        raise BasinError("data: no examples")
    return {k: v / count for k, v in total.items()}


def fisher_merge(models: Sequence[nn.Module], data: Any, loss_fn: Callable | None = None,
                 weights: Sequence[float] | None = None, eps: float = _FISHER["eps"]) -> dict[str, torch.Tensor]:
    """Fisher-weighted average of `models` (see the module docstring); `data` is shared or one per model."""
    w = _check_models(models, weights)
    fishers = [diagonal_fisher(m, d, loss_fn) for m, d in zip(models, _per_model(data, len(models)))]
    states = [m.state_dict() for m in models]
    out: dict[str, torch.Tensor] = {}
    for name, ref in states[0].items():
        if not ref.is_floating_point():
            out[name] = ref.clone()
            continue
        if name in fishers[0]:
            num = sum(wi * (f[name] + eps) * s[name].double() for wi, f, s in zip(w, fishers, states))
            den = sum(wi * (f[name] + eps) for wi, f in zip(w, fishers))
            out[name] = (num / den).to(ref.dtype)
        else:
            out[name] = (sum(wi * s[name].double() for wi, s in zip(w, states)) / sum(w)).to(ref.dtype)
    return out


def gram_matrices(model: nn.Module, data: Any, state: Mapping[str, torch.Tensor] | None = None,
                  layers: Collection[str] | None = None) -> dict[str, torch.Tensor]:
    """G = X^T X (float64) of every Linear layer's inputs over `data` (leading axes flattened): of the layers
    named in `layers` only when given, and with the model's tensors replaced by `state` when given
    (`torch.func.functional_call`, no copy of the model)."""
    grams: dict[str, torch.Tensor] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and (layers is None or name in layers):
            def hook(_m, inp, name=name):
                x = inp[0].detach().double().reshape(-1, inp[0].shape[-1])
                grams[name] = grams.get(name, 0) + x.T @ x
            handles.append(mod.register_forward_pre_hook(hook))
    forward = model if state is None else _functional(model, state)
    try:
        with eval_mode(model), torch.no_grad():
            for args, kwargs in input_batches(data):
                run_model(forward, args, kwargs, "the model")
    finally:
        for h in handles:
            h.remove()
    return grams


def _functional(model: nn.Module, state: Mapping[str, torch.Tensor]) -> Callable[..., Any]:
    from torch.func import functional_call

    return lambda *args, **kwargs: functional_call(model, dict(state), args, kwargs)


def regmean_merge(models: Sequence[nn.Module], data: Any, alpha: float = _REGMEAN["alpha"],
                  weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """RegMean merge (see the module docstring); `data` is shared or one dataset per model."""
    if not 0.0 <= alpha <= 1.0:
        raise BasinError(f"regmean: alpha must lie in [0, 1], got {alpha}")
    w = _check_models(models, weights)
    grams = [gram_matrices(m, d) for m, d in zip(models, _per_model(data, len(models)))]
    states = [m.state_dict() for m in models]
    out = average_states(states, w)
    for layer in grams[0]:
        key = f"{layer}.weight" if layer else "weight"
        if any(layer not in g for g in grams):
            raise BasinError(f"regmean: layer {layer!r} saw no data in one of the models")
        out[key] = regmean_solve([g[layer] for g in grams], [s[key] for s in states], alpha)
    return out


def average_states(states: Sequence[Mapping[str, torch.Tensor]], w: Sequence[float]) -> dict[str, torch.Tensor]:
    """The w-weighted average of every floating tensor (float64 accumulation, cast back); others from the first."""
    out: dict[str, torch.Tensor] = {}
    for name, ref in states[0].items():
        if ref.is_floating_point():
            out[name] = (sum(wi * s[name].double() for wi, s in zip(w, states)) / sum(w)).to(ref.dtype)
        else:
            out[name] = ref.clone()
    return out


def regmean_solve(grams: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """W* = [(sum_i G~_i)^-1 sum_i G~_i W_i^T]^T with G~ = alpha G + (1 - alpha) diag(G) (Jin et al. 2023, eq. 3),
    in float64 (least squares when sum_i G~_i is singular), cast to the weights' dtype."""
    scaled = [alpha * g + (1 - alpha) * torch.diag(torch.diag(g)) for g in grams]
    lhs = sum(scaled)
    rhs = sum(si @ wi.double().T for si, wi in zip(scaled, weights))
    solution = torch.linalg.lstsq(lhs, rhs).solution if torch.linalg.matrix_rank(lhs) < len(lhs) else \
        torch.linalg.solve(lhs, rhs)
    return solution.T.to(weights[0].dtype).contiguous()
