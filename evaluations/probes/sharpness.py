"""Sharpness measures around a trained model.

- epsilon-sharpness (Keskar et al. 2017, eq. 3): 100 * (max_{z in C_eps} L(w + z) - L(w)) / (1 + L(w)),
  C_eps = {z : |z_i| <= eps (|w_i| + 1)}, the max found by projected (sign) gradient ascent;
- adaptive sharpness (Kwon et al. 2021, ASAM, eq. 6-8): max_{|T_w^-1 e|_2 <= rho} L(w + e) - L(w) with
  T_w = diag(|w| + eta), by normalized gradient ascent in the rescaled coordinates (steps=1 is ASAM's update);
- the ratio of the top Hessian eigenvalue to the Hessian trace.

The ascents run a fixed number of steps; `converged` says whether the last step changed the perturbed loss
by at most `tol` relative (None for a single step, ASAM's one-step definition, which is not an iteration).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from evaluations.probes.hvp import HessianOperator
from evaluations.probes.lanczos import lanczos
from evaluations.probes.operator import as_operator, operator_mode
from evaluations.probes.result import ProbeResult
from evaluations.probes.trace import hutchinson_trace
from merging.reductions import norm64


@dataclass
class Sharpness(ProbeResult):
    """A sharpness value with its ascent: `iterations` is `steps` (each one gradient and one loss)."""

    value: float
    loss: float
    perturbed_loss: float
    kind: str
    steps: int = 0
    converged: bool | None = None
    history: list[float] = field(default_factory=list)  # the perturbed loss after each ascent step
    mode: str = "eval"  # the network's mode for every loss and gradient (see evaluations.probes.hvp.network_mode)

    @property
    def iterations(self) -> int:
        return self.steps


def _plateaued(history: list[float], tol: float) -> bool | None:
    if len(history) < 2:
        return None
    return abs(history[-1] - history[-2]) <= tol * max(abs(history[-2]), 1e-12)


def epsilon_sharpness(model, loss_fn, data, epsilon: float = 1e-3, steps: int = 10, params=None,
                      tol: float = 1e-3, mode: str = "eval") -> Sharpness:
    """Keskar et al.'s epsilon-sharpness (in percent), maximized over the box by `steps` projected sign-ascent steps.

    `mode`: the network's mode for every loss and gradient ("eval" or "train", see `network_mode`)."""
    op = HessianOperator(model, loss_fn, data, params=params, mode=mode)
    w = op.flat_params()
    box = epsilon * (w.abs() + 1)
    base = op.loss()
    z = torch.zeros_like(w)
    best = base
    history = []
    for _ in range(steps):
        z = torch.clamp(z + 2.0 * box / steps * torch.sign(op.gradient(w + z)), -box, box)
        history.append(op.loss(w + z))
        best = max(best, history[-1])
    return Sharpness(100.0 * (best - base) / (1.0 + base), base, best, "epsilon", steps, _plateaued(history, tol),
                     history, mode)


def adaptive_sharpness(model, loss_fn, data, rho: float = 0.5, eta: float = 0.01, steps: int = 1,
                       params=None, tol: float = 1e-3, mode: str = "eval") -> Sharpness:
    """ASAM's adaptive sharpness: L(w + e) - L(w) at the ascent point in the ball |T_w^-1 e|_2 <= rho."""
    op = HessianOperator(model, loss_fn, data, params=params, mode=mode)
    w = op.flat_params()
    t = w.abs() + eta
    base = op.loss()
    u = torch.zeros_like(w)  # e = T_w u, |u| <= rho
    history = []
    for _ in range(steps):
        g = t * op.gradient(w + t * u)  # gradient w.r.t. u
        u = u + (rho / steps) * g / max(norm64(g), 1e-30)  # norms of the whole parameter vector: float64 sums
        u = u * min(1.0, rho / max(norm64(u), 1e-30))
        history.append(op.loss(w + t * u))
    perturbed = history[-1] if history else base
    return Sharpness(perturbed - base, base, perturbed, "adaptive", steps, _plateaued(history, tol), history, mode)


def top_to_trace_ratio(op, tol: float = 1e-3, rtol: float = 1e-2, seed: int = 0) -> dict:
    """lambda_max / tr(H) with the trace's standard error propagated; `op`: a `LinearOperator` or a matrix."""
    op = as_operator(op)
    top = lanczos(op, k=1, tol=tol, seed=seed)
    tr = hutchinson_trace(op, rtol=rtol, seed=seed)
    ratio = float(top.values[0]) / tr.mean
    return {"ratio": ratio, "stderr": abs(ratio) * tr.stderr / abs(tr.mean), "top": float(top.values[0]),
            "trace": tr.mean, "converged": bool(top.converged and tr.converged), "mode": operator_mode(op)}
