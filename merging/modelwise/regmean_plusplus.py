"""RegMean++ (Nguyen et al. 2025, "RegMean++: Enhancing Effectiveness and Generalization of Regression
Mean for Model Merging", sec. 3): RegMean with the merged model's own features.

RegMean solves every Linear layer independently from the Gram matrices G_i = X_i^T X_i of the
layer's inputs X_i in candidate model i. RegMean++ merges block by block in forward order: the
input of block l for model i's data is the output of the already merged blocks 1..l-1,
X_i^(l) = f_M^(l-1)(X_i^(l-1)), and block l's Linear layers get their Gram matrices from candidate
i's block l run on that input (so the features inside a block are still the candidate's). Each
layer is then solved by RegMean's closed form W* = [(sum_i G~_i)^-1 sum_i G~_i W_i^T]^T, and
every other tensor is the weighted average, as in RegMean.

Blocks: the items of the model's `nn.ModuleList`s holding Linear layers (a transformer's layers), or
the names given; a Linear outside every block (an MLP's layers, a pooler) is a block of its own.
Every forward pass runs through `torch.func.functional_call` on a mixed state (merged tensors
before the block, the candidate's from the block on), never a copy of a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from merging.alignment.activation_matching import run_model
from merging.batches import input_batches
from merging.modelwise.data_aware import _check_models, _per_model, average_states, gram_matrices, regmean_solve
from merging.modes import eval_mode
from taxonomy import get as get_info
from taxonomy.errors import BasinError

_DEFAULTS = get_info("regmean_plusplus").defaults()


def repeated_blocks(model: nn.Module) -> list[str]:
    """Names of the items of every outermost `nn.ModuleList` whose items hold a Linear layer."""
    out: list[str] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or any(name.startswith(b + ".") for b in out):
            continue
        for i, item in enumerate(mod):
            if any(isinstance(m, nn.Linear) for m in item.modules()):
                out.append(f"{name}.{i}" if name else str(i))
    return out


def _block_of(layer: str, blocks: Sequence[str]) -> str:
    return next((b for b in blocks if layer == b or layer.startswith(b + ".")), layer)


def forward_order(model: nn.Module, data: Any) -> list[str]:
    """Names of the Linear layers in the order a forward pass over `data`'s first batch first calls them."""
    order: list[str] = []
    handles = [mod.register_forward_pre_hook(lambda _m, _i, name=name: order.append(name) if name not in order
                                             else None)
               for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    try:
        with eval_mode(model), torch.no_grad():
            args, kwargs = next(iter(input_batches(data)), ((), {}))
            run_model(model, args, kwargs, "the model")
    finally:
        for h in handles:
            h.remove()
    return order


def merge_units(model: nn.Module, data: Any, blocks: Sequence[str] | None = None) -> list[tuple[str, list[str]]]:
    """(block name, its Linear layers in forward order) for every block, in forward order."""
    blocks = repeated_blocks(model) if blocks is None else list(blocks)
    units: dict[str, list[str]] = {}
    for layer in forward_order(model, data):
        units.setdefault(_block_of(layer, blocks), []).append(layer)
    if not units:
        raise BasinError("regmean_plusplus: no Linear layer ran on the data")
    return list(units.items())


def _owned(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def regmean_plusplus_merge(models: Sequence[nn.Module], data: Any, alpha: float = _DEFAULTS["alpha"],
                           weights: Sequence[float] | None = None, blocks: Sequence[str] | None = None
                           ) -> dict[str, torch.Tensor]:
    """RegMean++ merge (see the module docstring); `data` is shared or one dataset per model."""
    if not 0.0 <= alpha <= 1.0:
        raise BasinError(f"regmean_plusplus: alpha must lie in [0, 1], got {alpha}")
    w = _check_models(models, weights)
    datasets = _per_model(data, len(models))
    states = [m.state_dict() for m in models]
    merged = average_states(states, w)
    units = merge_units(models[0], datasets[0], blocks)
    for u, (_block, layers) in enumerate(units):
        later = [b for b, _ in units[u:]]
        grams = []
        for model, state, d in zip(models, states, datasets):
            mixed = {k: (state[k] if _owned(k, later) else v) for k, v in merged.items()}
            grams.append(gram_matrices(model, d, mixed, layers))
        for layer in layers:
            if any(layer not in g for g in grams):
                raise BasinError(f"regmean_plusplus: layer {layer!r} saw no data in one of the models")
            key = f"{layer}.weight"
            merged[key] = regmean_solve([g[layer] for g in grams], [s[key] for s in states], alpha)
    return merged
