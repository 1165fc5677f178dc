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
- A path's end points are models the bench has evaluated already: the row's own body (its test pass) and the
  fine-tunes (evaluated once per pool, `finetune_values`); only the interior points are evaluated along the path.
  Each end point is the model itself (the chord formula a + 1 * (b - a) rounds b's last bits).
"""

from __future__ import annotations

import numpy as np
import torch

from evaluations.bench.pools import HeadedBody, ModelPool, State, Task, TaskPool

N_ALPHAS = 11


def _flat(state: State, names: list[str]) -> torch.Tensor:
    return torch.cat([state[n].double().reshape(-1) for n in names])


def point_values(body: torch.nn.Module, task: Task, logits: torch.Tensor | None = None) -> tuple[float, float]:
    """(loss, accuracy) of `body` on `task`'s test split through its head, as `evaluate_path` measures a point
    (mean cross-entropy, argmax accuracy); `logits` when the caller has them already."""
    from evaluations.landscape.evaluate import _accuracy_hits, default_loss

    if logits is None:
        logits = task.logits(body)
    y = task.test[1]
    n = len(y)
    return float(default_loss(logits, y).double() * n) / n, float(_accuracy_hits(logits, y)) / n


def finetune_values(pool: ModelPool, tasks: TaskPool, model: str, task: str) -> tuple[float, float]:
    """`point_values` of fine-tune `model` on `task`, computed once per pool (held on the pool)."""
    memo = pool.__dict__.setdefault("_finetune_values", {})
    if (model, task) not in memo:
        memo[model, task] = point_values(pool.module(pool.models[model]), tasks[task])
    return memo[model, task]


def _path(body: torch.nn.Module, task: Task, start: State, end: State, ends: tuple[tuple[float, float], ...],
          points: int):
    """The PathResult of start -> end on `task` over `points` alphas, the end points' values given (`ends`)."""
    from evaluations.landscape.evaluate import PathResult, alpha_grid, evaluate_path
    from evaluations.landscape.paths import linear_path

    grid = alpha_grid(points)
    loss, acc = [ends[0][0]], [ends[0][1]]
    if points > 2:
        inner = evaluate_path(HeadedBody(body, task.head), linear_path(*({f"body.{k}": v for k, v in s.items()}
                                                                        for s in (start, end))),
                              task.test, alphas=grid[1:-1], batched=False)
        loss += inner.loss.tolist()
        acc += inner.accuracy.tolist()
    return PathResult(grid.numpy(), np.array(loss + [ends[1][0]]), np.array(acc + [ends[1][1]]))


def pair_path(pool: ModelPool, tasks: TaskPool, a: str, b: str, alphas: int = N_ALPHAS):
    """The mean over tasks a and b of the landscape evaluator's PathResult from body a to body b."""
    from evaluations.landscape.evaluate import PathResult

    body = pool.module(pool.base)
    results = [_path(body, tasks[t], pool.models[a], pool.models[b],
                     (finetune_values(pool, tasks, a, t), finetune_values(pool, tasks, b, t)), alphas) for t in (a, b)]
    return PathResult(results[0].alphas, np.mean([r.loss for r in results], 0),
                      np.mean([r.accuracy for r in results], 0))


def merge_paths(pool: ModelPool, tasks: TaskPool, merged: State, points: int = N_ALPHAS,
                start: dict[str, tuple[float, float]] | None = None) -> dict:
    """Per task: loss/accuracy along merged -> fine-tune, its loss and error barriers (see the module docstring).
    `start`: task -> the merged body's `point_values`, when the caller has evaluated it."""
    from evaluations.landscape.barriers import barrier

    out: dict = {"alphas": None, "loss": {}, "accuracy": {}, "barrier": {}, "error_barrier": {}}
    body = pool.module(pool.base)
    if start is None:
        merged_body = pool.module(merged)
        start = {t: point_values(merged_body, tasks[t]) for t in pool.models}
    for t in pool.models:
        result = _path(body, tasks[t], merged, pool.models[t], (start[t], finetune_values(pool, tasks, t, t)), points)
        out["alphas"] = result.alphas.tolist()
        out["loss"][t], out["accuracy"][t] = result.loss.tolist(), result.accuracy.tolist()
        out["barrier"][t] = barrier(result, "loss").value
        out["error_barrier"][t] = barrier(result, "error").value
    return out


def evaluate_with_values(pool: ModelPool, tasks: TaskPool, state: State
                         ) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """One test pass per task of the body holding `state`: its scores (each task's metric) and its
    `point_values` (a path's start, `merge_paths`)."""
    body = pool.module(state)
    scores, values = {}, {}
    for task in tasks.tasks:
        logits = task.logits(body)
        scores[task.name] = float(task.metric(logits, task.test[1]))
        values[task.name] = point_values(body, task, logits)
    return scores, values


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
