"""Thin I/O for the CLI: checkpoints into a model's parameter dict, user factories, a first-batch check.

Checkpoints are read by `merging.io.checkpoint.open_checkpoint`: safetensors, or a PyTorch pickle only with
`allow_pickle=True` (`--allow-pickle`), then with `torch.load(weights_only=True)`; no pickle code ever runs.
`module:fn` factories are code the user names on the command line, imported and called as given.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from taxonomy.errors import DataError


def load_into(ref: str, model: nn.Module, allow_pickle: bool = False) -> nn.Module:
    """Copy checkpoint `ref` into `model`'s own tensors, one tensor at a time from the memory-mapped file
    (merging.io.checkpoint.open_checkpoint; a `.pt` only with `allow_pickle`, then weights_only=True), so loading
    holds one model, never a second copy. Names are checked first (`evaluations.models.check_names`: a tied
    tensor may be saved under one name only; tensors the model recomputes, e.g. non-persistent buffers, are
    skipped); returns `model`."""
    from evaluations.load_names import fused_view
    from evaluations.models import check_names, copy_weights
    from merging.io.checkpoint import open_checkpoint

    ckpt = fused_view(model, open_checkpoint(ref, allow_pickle=allow_pickle))
    copy_weights(model, ckpt, check_names(model, ckpt, ref))
    return model


def load_data(spec: str) -> object:
    """Call the `module:fn` data factory; it returns (x, y) tensors or a DataLoader (a one-shot iterator
    is read into a list, so that it can be checked and then evaluated)."""
    from merging.objects import load_object

    fn = load_object(spec, f"--data {spec}", files=True)
    data = fn() if callable(fn) else fn
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        if len(x) != len(y):
            raise DataError(f"--data {spec}: x has {len(x)} rows but y has {len(y)}")
        return tuple(data)
    if isinstance(data, Iterator):
        return list(data)
    if hasattr(data, "__iter__"):
        return data
    raise DataError(f"--data {spec}: expected (x, y) tensors or a DataLoader, got {type(data).__name__}")


def build_model(spec: str) -> nn.Module:
    from merging.objects import load_object

    factory = load_object(spec, f"--model-factory {spec}", files=True)
    if not callable(factory):
        raise DataError(f"--model-factory {spec}: is a {type(factory).__name__}, not a callable")
    model = factory()
    if not isinstance(model, nn.Module):
        raise DataError(f"--model-factory {spec}: returned a {type(model).__name__}, not an nn.Module")
    return model.eval()


def check_runs(model: nn.Module, data: object, spec: str, loss_fn=None) -> None:
    """Run `model` and the loss on two rows of the first batch: data of the wrong width, dtype or labels is a
    one-line error naming `--data` instead of a traceback from deep inside the evaluation."""
    from evaluations.landscape.evaluate import default_loss, iter_batches

    first = next(iter(iter_batches(data)), None)
    if first is None:
        raise DataError(f"--data {spec}: no batches")
    x, y = first
    try:
        with torch.no_grad():
            (loss_fn or default_loss)(model(x[:2]), y[:2])
    except (RuntimeError, ValueError, IndexError, TypeError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"--data {spec}: the model cannot be evaluated on it "
                         f"(x {tuple(x.shape)} {x.dtype}, y {tuple(y.shape)} {y.dtype}): {reason}") from None
