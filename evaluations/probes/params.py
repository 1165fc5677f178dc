"""One parameter-selection rule for every probe that restricts itself to some parameters.

The NTK (every method), the Hessian operator (and so Lanczos, Hutchinson, sharpness) and `measure_minimum`
take `params`, which is one of

- None: every trainable parameter (`requires_grad`);
- a string: a regular expression that must match a whole parameter name or a whole dotted prefix of it
  (`"fc1"` selects `fc1.weight` and `fc1.bias`, `r"layers\\.[0-3]\\.attn"` the attention of four blocks,
  `r".*\\.bias"` every bias); a trailing "." is ignored (`"2."` is `"2"`);
- an `nn.Module` of the model (its parameters) or a parameter tensor of the model;
- a sequence mixing literal names or dotted prefixes (no regular expression), modules and parameter tensors.

Names come back in the model's order, each once (a tied parameter under its first name). A string, module
or tensor that selects no trainable parameter is a `BasinError` naming it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from taxonomy.errors import ProbeError

Selection = str | nn.Module | torch.Tensor | Sequence[str | nn.Module | torch.Tensor] | None


def _prefixes(name: str) -> list[str]:
    """"a.b.c" -> ["a", "a.b", "a.b.c"]."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _strip(text: str) -> str:
    return text[:-1] if text.endswith(".") and not text.endswith("\\.") else text


def _by_regex(pattern: str, names: list[str]) -> list[str]:
    try:
        rx = re.compile(_strip(pattern))
    except re.error as err:
        raise ProbeError(f"params: {pattern!r} is not a valid regular expression ({err})") from None
    return [n for n in names if any(rx.fullmatch(p) for p in _prefixes(n))]


def _by_name(entry: str, names: list[str]) -> list[str]:
    w = _strip(entry)
    return [n for n in names if n == w or n.startswith(w + ".")]


def _describe(entry: object, modules: dict[int, str]) -> str:
    if isinstance(entry, nn.Module):
        where = modules.get(id(entry))
        return f"module {where!r} ({type(entry).__name__})" if where is not None else f"a {type(entry).__name__} module"
    return f"a tensor of shape {tuple(entry.shape)}"


def _by_identity(entry: nn.Module | torch.Tensor, model: nn.Module, trainable: set[str]) -> list[str]:
    owner = {id(p): n for n, p in model.named_parameters()}
    tensors = list(entry.parameters()) if isinstance(entry, nn.Module) else [entry]
    found = [owner[id(t)] for t in tensors if id(t) in owner]
    if not found:
        modules = {id(m): n for n, m in model.named_modules()}
        raise ProbeError(f"params: {_describe(entry, modules)} is not part of the model")
    return [n for n in found if n in trainable]


def _one(entry: object, model: nn.Module, names: list[str], literal: bool) -> list[str]:
    if isinstance(entry, str):
        return _by_name(entry, names) if literal else _by_regex(entry, names)
    if isinstance(entry, (nn.Module, torch.Tensor)):
        return _by_identity(entry, model, set(names))
    raise ProbeError(f"params: expected None, a regular expression, a module, a tensor or a sequence of names, "
                     f"prefixes, modules or tensors; got {type(entry).__name__}")


def select_params(model: nn.Module, params: Selection) -> list[str]:
    """Names of the trainable parameters of `model` that `params` selects (rule: see the module docstring)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        return names
    single = isinstance(params, (str, nn.Module, torch.Tensor))
    entries = [params] if single else list(params) if isinstance(params, Sequence) else [params]
    if not entries:
        raise ProbeError("params: an empty selection (use None for every trainable parameter)")
    chosen: set[str] = set()
    for entry in entries:
        hit = _one(entry, model, names, literal=not single)
        if not hit:
            modules = {id(m): n for n, m in model.named_modules()}
            label = repr(entry) if isinstance(entry, str) else _describe(entry, modules)
            raise ProbeError(f"params: {label} selects no trainable parameter of the model (have {names[:6]}...)")
        chosen.update(hit)
    return [n for n in names if n in chosen]
