"""Geometry of paths and model sets in the terms of the mode-connectivity SoK.

- `convexity(result)`: along one path, the fraction of points at or below the chord, the largest and mean
  excess over the chord, and the discrete second difference (v[i-1] - 2 v[i] + v[i+1]) / h^2 (a convex
  1-D function has it >= 0 everywhere).
- `mode_convexity(model, states, data)`: the SoK's "mode convexity" of a set of models, the largest pairwise
  linear barrier (0 when every segment between members stays under its chord).
- `connectivity(model, states, data, threshold)`: pairwise barrier matrix; models grouped into linearly
  connected basins = connected components of the graph joining pairs whose barrier <= threshold (single
  linkage at `threshold`); `dendrogram()` draws scipy's single-linkage tree when matplotlib is present.
- `determinism(model, states, data)`: how much runs that differ only in seed agree, in weight space
  (L2 distance, and relative to the mean norm) and function space (mean L2 distance between predicted
  probability vectors; fraction of inputs whose predicted class differs).
- `directedness(base, states)`: cosine similarity of the update directions (task vectors theta_i - base);
  with `successive=True`, of the successive updates theta_{i+1} - theta_i of one trajectory.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from evaluations.landscape.barriers import barrier
from evaluations.landscape.evaluate import PathResult, evaluate_path, iter_batches
from evaluations.landscape.params import as_params, check_points, flatten, subtract
from evaluations.landscape.paths import linear_path
from evaluations.results import fields_json
from merging.modes import eval_mode
from taxonomy.errors import BasinError


@dataclass(frozen=True)
class Convexity:
    fraction_below_chord: float
    max_excess: float
    mean_excess: float  # mean over the path of max(0, v - chord)
    min_second_difference: float
    mean_second_difference: float
    fraction_locally_convex: float  # share of interior points with second difference >= 0

    def to_json(self) -> dict:
        return fields_json(self)


def convexity(result: PathResult, kind: str = "loss", atol: float = 1e-12) -> Convexity:
    """Convexity measures of the loss (or error) along an evaluated path (alphas need not be uniform)."""
    a = np.asarray(result.alphas, float)
    v = np.asarray(result.loss if kind == "loss" else result.error, float)
    if len(a) < 3:
        raise BasinError("convexity needs at least 3 points on the path")
    chord = (a[-1] - a) / (a[-1] - a[0]) * v[0] + (a - a[0]) / (a[-1] - a[0]) * v[-1]
    excess = v - chord
    h0, h1 = a[1:-1] - a[:-2], a[2:] - a[1:-1]
    # non-uniform second difference: 2 * [ (v+ - v)/h1 - (v - v-)/h0 ] / (h0 + h1)
    d2 = 2 * ((v[2:] - v[1:-1]) / h1 - (v[1:-1] - v[:-2]) / h0) / (h0 + h1)
    return Convexity(
        fraction_below_chord=float(np.mean(excess <= atol)),
        max_excess=float(excess.max()),
        mean_excess=float(np.clip(excess, 0, None).mean()),
        min_second_difference=float(d2.min()),
        mean_second_difference=float(d2.mean()),
        fraction_locally_convex=float(np.mean(d2 >= -atol)),
    )


@dataclass
class Connectivity:
    names: list[str]
    matrix: np.ndarray  # [n, n] barriers; 0 on the diagonal
    threshold: float
    basins: list[list[int]]
    kind: str
    form: str

    def to_json(self) -> dict:
        return fields_json(self) | {"basin_names": [[self.names[i] for i in b] for b in self.basins]}

    def linkage(self) -> np.ndarray:
        from scipy.cluster.hierarchy import linkage
        from scipy.spatial.distance import squareform

        sym = np.maximum(self.matrix, self.matrix.T)
        np.fill_diagonal(sym, 0.0)
        return linkage(squareform(np.clip(sym, 0, None), checks=False), method="single")

    def dendrogram(self, path: str) -> str | None:
        """Save scipy's single-linkage dendrogram of the barrier matrix to `path` (None without matplotlib)."""
        from evaluations.landscape.plots import plot_dendrogram

        return plot_dendrogram(self, path)


def basins_from_matrix(matrix: np.ndarray, threshold: float) -> list[list[int]]:
    """Connected components of the graph with an edge where max(B_ij, B_ji) <= threshold."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    m = np.asarray(matrix, float)
    adj = (np.maximum(m, m.T) <= threshold).astype(np.int8)
    _, labels = connected_components(csr_matrix(adj), directed=False)
    groups: dict[int, list[int]] = {}
    for i, lab in enumerate(labels):
        groups.setdefault(int(lab), []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])


def pairwise_barriers(model: nn.Module, states: list, data, alphas=11, kind: str = "loss", form: str = "linear",
                      **evaluate_kwargs) -> np.ndarray:
    """[n, n] matrix of barriers along the straight line between every pair of states."""
    n = len(states)
    params = [as_params(s, f"model {i}") for i, s in enumerate(states)]
    check_points(params, model)
    m = np.zeros((n, n))
    for i, j in combinations(range(n), 2):
        r = evaluate_path(model, linear_path(params[i], params[j]), data, alphas=alphas, **evaluate_kwargs)
        m[i, j] = m[j, i] = barrier(r, kind=kind, form=form).value
    return m


def connectivity(model: nn.Module, states: list, data, threshold: float, alphas=11, kind: str = "loss",
                 form: str = "linear", names: list[str] | None = None, **evaluate_kwargs) -> Connectivity:
    """Pairwise barriers of `states` and their grouping into linearly connected basins."""
    if len(states) < 2:
        raise BasinError(f"connectivity needs at least 2 models, got {len(states)}")
    m = pairwise_barriers(model, states, data, alphas, kind, form, **evaluate_kwargs)
    return Connectivity(names=names or [f"model {i}" for i in range(len(states))], matrix=m, threshold=threshold,
                        basins=basins_from_matrix(m, threshold), kind=kind, form=form)


@dataclass(frozen=True)
class ModeConvexity:
    value: float  # the largest pairwise barrier
    pair: tuple[int, int]
    matrix: np.ndarray

    def to_json(self) -> dict:
        return fields_json(self)


def mode_convexity(model: nn.Module, states: list, data, alphas=11, kind: str = "loss", form: str = "linear",
                   **evaluate_kwargs) -> ModeConvexity:
    """The SoK's mode convexity of a set of models: the largest pairwise barrier (and which pair)."""
    if len(states) < 2:
        raise BasinError(f"mode_convexity needs at least 2 models, got {len(states)}")
    m = pairwise_barriers(model, states, data, alphas, kind, form, **evaluate_kwargs)
    i, j = np.unravel_index(int(np.argmax(m)), m.shape)
    return ModeConvexity(value=float(m[i, j]), pair=(int(min(i, j)), int(max(i, j))), matrix=m)


def _offdiag_mean(m: np.ndarray) -> float:
    n = len(m)
    return float(m[~np.eye(n, dtype=bool)].mean()) if n > 1 else 0.0


@dataclass
class Determinism:
    weight_distance: np.ndarray  # [n, n] ||t_i - t_j||
    relative_weight_distance: np.ndarray  # ||t_i - t_j|| / ((||t_i|| + ||t_j||) / 2)
    function_distance: np.ndarray  # mean over inputs of ||p_i(x) - p_j(x)||_2, p = softmax outputs
    disagreement: np.ndarray  # fraction of inputs with different argmax

    def to_json(self) -> dict:
        return fields_json(self) | {f"mean_{k}": _offdiag_mean(v) for k, v in self.__dict__.items()}


def determinism(model: nn.Module, states: list, data) -> Determinism:
    """Weight- and function-space agreement between models that differ only in their seed."""
    params = [as_params(s, f"model {i}") for i, s in enumerate(states)]
    n = len(params)
    if n < 2:
        raise BasinError(f"determinism needs at least 2 models, got {n}")
    check_points(params, model)  # a state of another architecture: one line naming it, not torch's RuntimeError
    vecs = [flatten(p, sorted(p)) for p in params]
    norms = [float(v.norm()) for v in vecs]
    wd, rwd = np.zeros((n, n)), np.zeros((n, n))
    for i, j in combinations(range(n), 2):
        d = float((vecs[i] - vecs[j]).norm())
        wd[i, j] = wd[j, i] = d
        rwd[i, j] = rwd[j, i] = d / max((norms[i] + norms[j]) / 2, 1e-30)
    with eval_mode(model), torch.no_grad():
        probs = [torch.cat([functional_call(model, p, (x,)).softmax(-1) for x, _ in iter_batches(data)])
                 for p in params]
    fd, dis = np.zeros((n, n)), np.zeros((n, n))
    for i, j in combinations(range(n), 2):
        fd[i, j] = fd[j, i] = float((probs[i] - probs[j]).norm(dim=-1).mean())
        dis[i, j] = dis[j, i] = float((probs[i].argmax(-1) != probs[j].argmax(-1)).double().mean())
    return Determinism(wd, rwd, fd, dis)


@dataclass
class Directedness:
    cosine: np.ndarray  # [n, n] cosine similarity of the update directions
    norms: list[float]

    @property
    def mean_cosine(self) -> float:
        return _offdiag_mean(self.cosine)

    def to_json(self) -> dict:
        return fields_json(self) | {"mean_cosine": self.mean_cosine}


def directedness(base: object, states: list, successive: bool = False) -> Directedness:
    """Cosine similarity of task vectors theta_i - base (or of successive updates of a trajectory)."""
    base_p = as_params(base, "base")
    params = [as_params(s, f"model {i}") for i, s in enumerate(states)]
    check_points([base_p, *params], labels=["base", *(f"model {i}" for i in range(len(params)))])
    if successive:
        seq = [base_p, *params]
        deltas = [subtract(seq[i + 1], seq[i]) for i in range(len(params))]
    else:
        deltas = [subtract(p, base_p) for p in params]
    keys = sorted(deltas[0])
    vecs = torch.stack([flatten(d, keys) for d in deltas])
    norms = vecs.norm(dim=1)
    cos = (vecs @ vecs.T) / torch.clamp(norms[:, None] * norms[None, :], min=1e-30)
    return Directedness(cosine=cos.cpu().numpy(), norms=norms.tolist())
