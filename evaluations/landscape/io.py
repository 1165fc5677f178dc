"""Thin I/O for the CLI: checkpoints into a model's parameter dict, user data factories, JSON output."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from taxonomy.errors import BasinError


def load_state(ref: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """Read checkpoint `ref` (via merging.checkpoint.open_checkpoint) and check it against `model`'s tensors."""
    from merging.checkpoint import open_checkpoint

    ckpt = open_checkpoint(ref)
    expected = model.state_dict()
    names = set(ckpt.names())
    for k, v in expected.items():
        if k not in names:
            raise BasinError(f"{ref}: tensor {k!r} of the model is missing from the checkpoint")
        shape = tuple(ckpt.meta(k).shape)
        if shape != tuple(v.shape):
            raise BasinError(f"{ref}: tensor {k!r} has shape {shape}, the model expects {tuple(v.shape)}")
    extra = sorted(names - set(expected))
    if extra:
        raise BasinError(f"{ref}: tensor {extra[0]!r} is not in the model built by --model-factory")
    return {k: ckpt.get(k).to(expected[k].dtype) for k in expected}


def load_data(spec: str) -> object:
    """Call the `module:fn` data factory; it returns (x, y) tensors or a DataLoader."""
    from evaluations.factories import load_object

    fn = load_object(spec)
    data = fn() if callable(fn) else fn
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return tuple(data)
    if hasattr(data, "__iter__"):
        return data
    raise BasinError(f"--data {spec}: expected (x, y) tensors or a DataLoader, got {type(data).__name__}")


def build_model(spec: str) -> nn.Module:
    from evaluations.factories import load_object

    model = load_object(spec)()
    if not isinstance(model, nn.Module):
        raise BasinError(f"--model-factory {spec}: returned a {type(model).__name__}, not an nn.Module")
    return model.eval()


def write_json(out: Path, name: str, payload: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(json.dumps(payload, indent=2))
    return path
