"""Geometry of a model pool: task-vector norms and cosines, and pairwise barriers among fine-tunes.

- Task vector tau_i = theta_i - theta_0 over the merged body (Ilharco et al. 2023, Editing Models
  with Task Arithmetic); the table reports ||tau_i||_2 and cos(tau_i, tau_j).
- Barrier between fine-tunes i and j: along the linear path of their bodies, v(alpha) is the mean
  over tasks i and j (each through its own head, on its test split) of the loss or the error, and
  the barrier is the chord form max_alpha [v(alpha) - ((1 - alpha) v(0) + alpha v(1))]
  (Entezari et al. 2022, Definition 2.1), computed by `evaluations.landscape`.
- Every merge's landscape columns (`merge_paths`): for each task t, the loss and accuracy along the
  linear path from the merged body (alpha = 0) to fine-tune t's body (alpha = 1), on task t's test
  split through task t's head, and the chord-form barrier of that path.
"""

from __future__ import annotations

import numpy as np
import torch

from evaluations.bench.pools import HeadedBody, ModelPool, State, TaskPool

N_ALPHAS = 11


def _flat(state: State, names: list[str]) -> torch.Tensor:
    return torch.cat([state[n].double().reshape(-1) for n in names])


def pair_path(pool: ModelPool, tasks: TaskPool, a: str, b: str, alphas: int = N_ALPHAS):
    """The mean over tasks a and b of the landscape evaluator's PathResult from body a to body b."""
    from evaluations.landscape.evaluate import PathResult, evaluate_path
    from evaluations.landscape.paths import linear_path

    ends = [{f"body.{k}": v for k, v in pool.models[m].items()} for m in (a, b)]
    results = [evaluate_path(HeadedBody(pool.module(pool.base), tasks[t].head), linear_path(*ends), tasks[t].test,
                             alphas=alphas, batched=False) for t in (a, b)]
    return PathResult(results[0].alphas, np.mean([r.loss for r in results], 0),
                      np.mean([r.accuracy for r in results], 0))


def merge_paths(pool: ModelPool, tasks: TaskPool, merged: State, points: int = N_ALPHAS) -> dict:
    """Per task: loss/accuracy along merged -> fine-tune, its loss and error barriers (see the module docstring)."""
    from evaluations.landscape.barriers import barrier
    from evaluations.landscape.evaluate import evaluate_path
    from evaluations.landscape.paths import linear_path

    start = {f"body.{k}": v for k, v in merged.items()}
    out: dict = {"alphas": None, "loss": {}, "accuracy": {}, "barrier": {}, "error_barrier": {}}
    for t in pool.models:
        end = {f"body.{k}": v for k, v in pool.models[t].items()}
        result = evaluate_path(HeadedBody(pool.module(pool.base), tasks[t].head), linear_path(start, end),
                               tasks[t].test, alphas=points, batched=False)
        out["alphas"] = result.alphas.tolist()
        out["loss"][t], out["accuracy"][t] = result.loss.tolist(), result.accuracy.tolist()
        out["barrier"][t] = barrier(result, "loss").value
        out["error_barrier"][t] = barrier(result, "error").value
    return out


def pool_geometry(pool: ModelPool, tasks: TaskPool, alphas: int = N_ALPHAS) -> dict:
    """Task-vector norms and cosines, and every pair's barrier over `alphas` points (see the module docstring)."""
    from evaluations.landscape.barriers import barrier

    models = list(pool.models)
    names = [n for n in pool.base if pool.base[n].is_floating_point()]
    base = _flat(pool.base, names)
    taus = [_flat(pool.models[m], names) - base for m in models]
    n = len(models)
    cos = [[float(torch.dot(taus[i], taus[j]) / (taus[i].norm() * taus[j].norm()).clamp_min(1e-300))
            for j in range(n)] for i in range(n)]
    loss_bar = [[0.0] * n for _ in range(n)]
    err_bar = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            result = pair_path(pool, tasks, models[i], models[j], alphas)
            loss_bar[i][j] = loss_bar[j][i] = barrier(result, "loss").value
            err_bar[i][j] = err_bar[j][i] = barrier(result, "error").value
    return {"models": models, "distance_from_base": [float(t.norm()) for t in taus], "cosine": cos,
            "barrier": loss_bar, "error_barrier": err_bar, "alphas": alphas,
            "note": f"barrier: loss barrier (chord form, Entezari et al. 2022 def. 2.1) over {alphas} points of the "
                    "linear path between two fine-tuned bodies, on the mean test cross-entropy of the pair's two "
                    "tasks (each through its own head); 0 on the diagonal. error_barrier in the JSON."}
