"""scikit-learn's digits as tensors, small reference models, and a deterministic trainer.

Shared by tests, examples and the built-in benchmark suite. Pixels are centred and scaled by
one global scale (per-pixel standardization blows up on pixels that are constant in a split).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class DigitsSplit:
    x_train: torch.Tensor  # [n, 64] float32
    y_train: torch.Tensor  # [n] int64
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def train(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x_train, self.y_train

    @property
    def test(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x_test, self.y_test


def load_digits_split(test_fraction: float = 0.25, seed: int = 0) -> DigitsSplit:
    """The 1,797 8x8 digits, shuffled with `seed`, split, centred and globally scaled."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = np.asarray(data.data, dtype=np.float32)
    y = np.asarray(data.target, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    n_test = int(round(len(x) * test_fraction))
    x_train, x_test = x[n_test:], x[:n_test]
    mean = x_train.mean()
    scale = x_train.std()
    to_t = torch.from_numpy
    return DigitsSplit(
        to_t((x_train - mean) / scale), to_t(y[n_test:]), to_t((x_test - mean) / scale), to_t(y[:n_test])
    )


def load_digits_all() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits (centred, globally scaled) in their original order."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = np.asarray(data.data, dtype=np.float32)
    x = (x - x.mean()) / x.std()
    return torch.from_numpy(x), torch.from_numpy(np.asarray(data.target, dtype=np.int64))


def make_mlp(widths: list[int], seed: int | None = None) -> nn.Sequential:
    """ReLU MLP with Linear layers of the given widths, e.g. [64, 512, 512, 10]."""
    if seed is not None:
        torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int = 30,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
) -> nn.Module:
    """Minibatch training with cross-entropy; the batch order is drawn from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}")
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(-1) == y).float().mean())
