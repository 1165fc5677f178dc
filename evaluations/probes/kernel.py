"""Comparing kernels and activation patterns (Fort et al. 2020, "Deep learning versus kernel learning", Sec. 2).

- kernel distance S(K1, K2) = 1 - <K1, K2>_F / (|K1|_F |K2|_F) (Fort et al. eq. 3), scale invariant;
- kernel velocity v(t) = S(K_t, K_{t+dt}) / dt (Fort et al. eq. 4);
- kernel-target alignment A(K, Y Y^T) = <K, Y Y^T>_F / (|K|_F |Y Y^T|_F) (Cristianini et al. 2002),
  optionally on centred kernels (Cortes, Mohri & Rostamizadeh 2012);
- ReLU activation-pattern distance: the fraction of (example, unit) pairs whose on/off state
  differs between two models on a probe set (normalized Hamming distance, Fort et al. Sec. 4.2).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from merging.modes import eval_mode
from taxonomy.errors import ProbeError


def kernel_distance(k1: torch.Tensor | np.ndarray, k2: torch.Tensor | np.ndarray) -> float:
    """S = 1 - <K1, K2>_F / (|K1|_F |K2|_F), computed in float64; 0 for identical (or proportional) kernels.
    Kernels: tensors or arrays (an `NTKResult`'s)."""
    if tuple(k1.shape) != tuple(k2.shape):
        raise ProbeError(f"kernel_distance: kernels have shapes {tuple(k1.shape)} and {tuple(k2.shape)}")
    a, b = torch.as_tensor(k1).double().reshape(-1), torch.as_tensor(k2).double().reshape(-1)
    denom = a.norm() * b.norm()
    if denom == 0:
        raise ProbeError("kernel_distance: a kernel is all zeros")
    return float(1.0 - torch.dot(a, b) / denom)


def kernel_velocity(k1: torch.Tensor | np.ndarray, k2: torch.Tensor | np.ndarray, dt: float) -> float:
    """v = S(K_t, K_{t+dt}) / dt."""
    if dt <= 0:
        raise ProbeError(f"kernel_velocity: dt must be positive, got {dt}")
    return kernel_distance(k1, k2) / dt


def _center(k: torch.Tensor) -> torch.Tensor:
    n = k.shape[0]
    h = torch.eye(n, dtype=k.dtype) - 1.0 / n
    return h @ k @ h


def kernel_alignment(k: torch.Tensor | np.ndarray, y: torch.Tensor, num_classes: int | None = None,
                     centered: bool = True) -> float:
    """Alignment of an [n, n] kernel (tensor or array) with the labels' kernel Y Y^T (one-hot Y), or of an [nC, nC]
    kernel with vec(Y)."""
    y = y.reshape(-1)
    c = num_classes or int(y.max()) + 1
    onehot = torch.nn.functional.one_hot(y.long(), c).double()
    k = torch.as_tensor(k).double()
    if k.shape == (len(y), len(y)):
        target = onehot @ onehot.T
    elif k.shape == (len(y) * c, len(y) * c):
        v = onehot.reshape(-1)
        target = torch.outer(v, v)
    else:
        raise ProbeError(f"kernel_alignment: kernel shape {tuple(k.shape)} does not fit {len(y)} labels, {c} classes")
    if centered:
        k, target = _center(k), _center(target)
    return 1.0 - kernel_distance(k, target)


@torch.no_grad()
def activation_patterns(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """On/off states (bool, concatenated over every nn.ReLU module's output units) for each example: [n, units]."""
    states: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda m, i, o: states.append((o > 0).reshape(len(o), -1)))
             for m in model.modules() if isinstance(m, nn.ReLU)]
    if not hooks:
        raise ProbeError("activation_patterns: the model has no nn.ReLU modules")
    try:
        with eval_mode(model):
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(states, dim=1)


def activation_pattern_distance(model_a: nn.Module, model_b: nn.Module, x: torch.Tensor) -> float:
    """Normalized Hamming distance between the two models' ReLU on/off patterns on probe inputs `x`."""
    pa, pb = activation_patterns(model_a, x), activation_patterns(model_b, x)
    if pa.shape != pb.shape:
        raise ProbeError(f"activation_pattern_distance: patterns have shapes {tuple(pa.shape)} and {tuple(pb.shape)}")
    return float((pa != pb).double().mean())
