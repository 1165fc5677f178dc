"""Directions for landscape slices.

- `random_directions`: Gaussian directions with filter normalization (Li et al. 2018, "Visualizing the Loss
  Landscape of Neural Nets", Sec. 4, Eq. 1): for each filter i of each weight (row i of a Linear weight,
  output channel i of a conv kernel), d_i <- d_i / ||d_i|| * ||theta_i||. 1-D tensors (biases, norm-layer
  scales and shifts) get a zero direction by default (`ignore="biasbn"`, as Li et al.); with `ignore=None`
  they are kept and set equal to the parameter itself (what Li et al.'s released code does for them).
  Buffers (running statistics, counters) are never perturbed.
- `pca_directions`: the top principal directions of a training trajectory's offsets from its final point
  (Li et al. 2018, Sec. 7; centred like scikit-learn's PCA), with their explained-variance ratios.
- `plane_through(a, b, c)`: the plane of three models (Garipov et al. 2018, Sec. 5): u = b - a, v = the part of
  c - a orthogonal to u, both of unit norm, origin a, plus the in-plane coordinates of a, b and c.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from evaluations.landscape.params import Params, as_params, flatten, is_float, unflatten
from evaluations.results import fields_json
from merging.reductions import norm64, row_norms64
from taxonomy.errors import BasinError

NORMALIZE = ("filter", "layer", None)


def _trainable(params: object) -> tuple[Params, set[str]]:
    """(all tensors, names that may be perturbed): a module's parameters, or every floating tensor of a dict."""
    if isinstance(params, nn.Module):
        return as_params(params), {k for k, _ in params.named_parameters()}
    p = as_params(params, "params")
    return p, {k for k, v in p.items() if is_float(v)}


def filter_normalize(direction: Params, params: Params, ignore: str | None = "biasbn") -> Params:
    """Rescale each filter of `direction` to the norm of the matching filter of `params` (Li et al. 2018)."""
    out = {}
    for k, d in direction.items():
        w = params[k]
        if d.dim() <= 1:
            out[k] = torch.zeros_like(d) if ignore == "biasbn" else w.detach().clone()
            continue
        dn = row_norms64(d.reshape(d.shape[0], -1))  # filter norms accumulated in float64
        wn = row_norms64(w.reshape(w.shape[0], -1))
        scale = (wn / torch.clamp(dn, min=1e-30)).to(d.dtype)
        out[k] = d * scale.reshape(-1, *([1] * (d.dim() - 1)))
    return out


def random_directions(params: object, n: int = 1, normalize: str | None = "filter", seed: int = 0,
                      ignore: str | None = "biasbn") -> Params | list[Params]:
    """`n` Gaussian directions shaped like `params` (a module or dict); one dict when n == 1, else a list."""
    if normalize not in NORMALIZE:
        raise BasinError(f"normalize={normalize!r}: choose from {NORMALIZE}")
    if ignore not in ("biasbn", None):
        raise BasinError(f"ignore={ignore!r}: choose 'biasbn' or None")
    full, names = _trainable(params)
    gen = torch.Generator().manual_seed(seed)
    dirs = []
    for _ in range(n):
        d = {k: torch.randn(v.shape, generator=gen, dtype=torch.float32).to(v.device, v.dtype) for k, v in full.items()
             if k in names}
        if normalize == "filter":
            d = filter_normalize(d, full, ignore)
        elif normalize == "layer":
            d = {k: (v * (norm64(full[k]) / max(norm64(v), 1e-30)) if v.dim() > 1 or ignore is None
                     else torch.zeros_like(v)) for k, v in d.items()}
        elif ignore == "biasbn":
            d = {k: v if v.dim() > 1 else torch.zeros_like(v) for k, v in d.items()}
        d.update({k: torch.zeros_like(v) for k, v in full.items() if k not in names and is_float(v)})
        dirs.append(d)
    return dirs[0] if n == 1 else dirs


@dataclass
class PCADirections:
    directions: list[Params]
    explained_variance_ratio: list[float]
    coordinates: np.ndarray  # [n_points, k]: the trajectory projected on the directions (origin: final point)

    def to_json(self) -> dict:
        return fields_json(self, exclude=("directions",))


def pca_directions(trajectory: list[object], k: int = 2, final: object | None = None) -> PCADirections:
    """Top-k PCA directions of the offsets theta_i - theta_final along a trajectory (Li et al. 2018, Sec. 7)."""
    pts = [as_params(t, f"trajectory[{i}]") for i, t in enumerate(trajectory)]
    end = as_params(final, "final") if final is not None else pts[-1]
    keys = sorted(k_ for k_, v in end.items() if is_float(v))
    m = torch.stack([flatten(p, keys) - flatten(end, keys) for p in pts])  # [n, P]
    if len(pts) < k + 1:
        raise BasinError(f"pca_directions: need more than k={k} trajectory points, got {len(pts)}")
    centred = m - m.mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    var = s**2
    ratio = (var[:k] / var.sum()).tolist()
    vecs = vh[:k]
    sub = {k_: end[k_] for k_ in keys}
    dirs = [{**{k_: torch.zeros_like(v) for k_, v in end.items() if is_float(v)}, **unflatten(vec, sub, keys)}
            for vec in vecs]
    return PCADirections(directions=dirs, explained_variance_ratio=ratio, coordinates=(m @ vecs.T).cpu().numpy())


@dataclass
class Plane:
    origin: Params
    u: Params
    v: Params
    points: np.ndarray  # [3, 2] in-plane coordinates of a, b, c

    def to_json(self) -> dict:
        return fields_json(self, exclude=("origin", "u", "v"))


def plane_through(a: object, b: object, c: object) -> Plane:
    """The plane through three models with an orthonormal basis (Garipov et al. 2018, Sec. 5)."""
    pa, pb, pc = as_params(a, "a"), as_params(b, "b"), as_params(c, "c")
    keys = sorted(k for k, v in pa.items() if is_float(v))
    va, vb, vc = (flatten(p, keys) for p in (pa, pb, pc))
    u = vb - va
    un = u.norm()
    if un == 0:
        raise BasinError("plane_through: a and b are the same point")
    u = u / un
    w = vc - va
    v = w - (w @ u) * u
    vn = v.norm()
    if vn == 0:
        raise BasinError("plane_through: a, b and c are collinear")
    v = v / vn
    sub = {k: pa[k] for k in keys}
    zeros = {k: torch.zeros_like(t) for k, t in pa.items() if is_float(t)}
    du = {**zeros, **{k: t.to(torch.float64) for k, t in unflatten(u, sub, keys).items()}}
    dv = {**zeros, **{k: t.to(torch.float64) for k, t in unflatten(v, sub, keys).items()}}
    du = {k: t.to(pa[k].dtype) for k, t in du.items()}
    dv = {k: t.to(pa[k].dtype) for k, t in dv.items()}
    pts = np.array([[0.0, 0.0], [float(un), 0.0], [float(w @ u), float(w @ v)]])
    return Plane(origin=pa, u=du, v=dv, points=pts)
