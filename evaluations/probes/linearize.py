"""Kernel performance at a checkpoint (Fort et al. 2020, Sec. 3): NTK regression and the linearized model.

- NTK regression: kernel ridge regression on one-hot targets with the empirical (output-traced)
  NTK of a checkpoint, alpha = (K_train + ridge I)^-1 Y, predictions K_test,train alpha.
- Linearized model (Lee et al. 2019, eq. 5): f_lin(x; w) = f_t(x) + J_t(x) (w - w_t), evaluated
  with one `torch.func.jvp`, trained with SGD and cross-entropy like the network.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.func import functional_call, jvp

from evaluations.probes.ntk import empirical_ntk


@dataclass
class KernelRegression:
    accuracy: float
    train_accuracy: float
    ridge: float

    def to_json(self) -> dict:
        return asdict(self)


def kernel_ridge_predict(k_train: torch.Tensor, y_train: torch.Tensor, k_test_train: torch.Tensor,
                         num_classes: int, ridge: float = 1e-3) -> torch.Tensor:
    """Scores [n_test, C] of kernel ridge regression on one-hot targets; ridge is relative to mean(diag K)."""
    k = k_train.double()
    onehot = torch.nn.functional.one_hot(y_train.long(), num_classes).double()
    lam = ridge * float(k.diagonal().mean())
    alpha = torch.linalg.solve(k + lam * torch.eye(len(k), dtype=k.dtype), onehot)
    return k_test_train.double() @ alpha


def ntk_regression(model: nn.Module, x_train, y_train, x_test, y_test, ridge: float = 1e-3,
                   num_classes: int | None = None, method: str = "auto") -> KernelRegression:
    """Test accuracy of kernel ridge regression with `model`'s empirical trace NTK."""
    c = num_classes or int(max(y_train.max(), y_test.max())) + 1
    k_train = empirical_ntk(model, x_train, kind="trace", method=method)
    k_test = empirical_ntk(model, x_test, x_train, kind="trace", method=method)
    train_scores = kernel_ridge_predict(k_train, y_train, k_train, c, ridge)
    test_scores = kernel_ridge_predict(k_train, y_train, k_test, c, ridge)
    acc = float((test_scores.argmax(1) == y_test).double().mean())
    train_acc = float((train_scores.argmax(1) == y_train).double().mean())
    return KernelRegression(acc, train_acc, ridge)


class LinearizedModel(nn.Module):
    """f_lin(x) = f_t(x) + J_t(x) (w - w_t): a module whose only parameters are w (initialized at w_t),
    so `torch.optim.SGD(lin.parameters(), ...)` trains the linearized model (gradients flow through the jvp)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        object.__setattr__(self, "model", model)  # not a submodule: the only parameters are the weights w
        self.anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.buffers_t = {n: b.detach().clone() for n, b in model.named_buffers()}
        self.names = list(self.anchor)
        self.weights = nn.ParameterList([nn.Parameter(t.clone()) for t in self.anchor.values()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = {n: w - self.anchor[n] for n, w in zip(self.names, self.weights)}

        def f(p):
            return functional_call(self.model, {**self.buffers_t, **p}, (x,))

        out, tangent_out = jvp(f, (self.anchor,), (delta,))
        return out + tangent_out


def linearize(model: nn.Module) -> LinearizedModel:
    """The linearization of `model` around its current parameters."""
    return LinearizedModel(model)
