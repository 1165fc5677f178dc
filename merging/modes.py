"""A model's training mode, set for a block of code and restored after it (also when the block raises).

`training_mode(model, mode)` puts `model` and every submodule in training mode `mode` (`nn.Module.train`);
on exit every module gets back the mode it had on entry, its own, so a model whose parts were in different
modes (a frozen BatchNorm in eval mode inside a training model) comes back as it was. `eval_mode(model)` is
`training_mode(model, False)`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

from torch import nn


@contextmanager
def training_mode(model: nn.Module, mode: bool = True) -> Iterator[nn.Module]:
    """`model` in training mode `mode` inside the block; each module's own mode restored after."""
    saved = [(m, m.training) for m in model.modules()]  # parents before their children
    model.train(mode)
    try:
        yield model
    finally:
        model.train(saved[0][1])  # through nn.Module.train and any override of it, as before the block
        for m, was in saved:  # then each module's own flag
            m.training = was


def eval_mode(model: nn.Module) -> AbstractContextManager[nn.Module]:
    """`model` in eval mode inside the block (`training_mode(model, False)`)."""
    return training_mode(model, False)
