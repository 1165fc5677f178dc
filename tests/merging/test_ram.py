"""RAM and RAM+ (mergekit `ram`, `ramplus_tl`) against a brute-force float64 reference, entry by entry.

Side by side with mergekit 0.1.5's formulas on the same float32 inputs the outputs were bit-identical
(scratch check, recorded in the commit message); here the reference is an independent loop.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from merging.methods.catalog import get_method
from merging.modelwise.state_dicts import merge_state_dicts


def brute_force(xs: list[np.ndarray], base: np.ndarray, eps: float, plus: tuple[float, float] | None) -> np.ndarray:
    taus = [x.astype(np.float64).ravel() - base.astype(np.float64).ravel() for x in xs]
    n = base.size
    contrib = [[abs(t[j]) > eps for j in range(n)] for t in taus]
    count = [sum(c[j] for c in contrib) for j in range(n)]
    gains = [1.0] * len(xs)
    if plus is not None:
        r, alpha = plus
        for i, c in enumerate(contrib):
            shared = sum(1 for j in range(n) if c[j] and count[j] > 1)
            unique = sum(1 for j in range(n) if c[j] and count[j] == 1)
            gains[i] = 1 + r * min(max(shared / max(unique, eps), 0.0), alpha)
    out = base.astype(np.float64).ravel().copy()
    for j in range(n):
        for i, t in enumerate(taus):
            if contrib[i][j]:
                out[j] += t[j] * gains[i] if count[j] == 1 else t[j] / count[j]
    return out.reshape(base.shape)


def _inputs(shape, n_models, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    xs = []
    for k in range(n_models):  # sparse task vectors with different densities: unique and shared entries
        keep = torch.rand(shape, generator=g) > 0.3 + 0.2 * k
        xs.append(base + torch.randn(shape, generator=g) * keep * 0.01)
    return [x.to(dtype) for x in xs], base.to(dtype)


@pytest.mark.parametrize("shape", [(7, 5), (13,), (3, 4, 6)])
@pytest.mark.parametrize("n_models", [1, 2, 4])
@pytest.mark.parametrize("method, params, plus", [
    ("ram", {}, None),
    ("ram", {"epsilon": 5e-3}, None),
    ("ramplus_tl", {}, (0.1, 0.2)),
    ("ramplus_tl", {"r": 0.5, "alpha": 3.0, "epsilon": 1e-3}, (0.5, 3.0)),
])
def test_ram_matches_brute_force(shape, n_models, method, params, plus):
    xs, base = _inputs(shape, n_models, seed=n_models)
    out = get_method(method)(xs, base, params)
    eps = params.get("epsilon", 1e-5)
    ref = brute_force([x.numpy() for x in xs], base.numpy(), eps, plus)
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-6)
    assert out.dtype == torch.float32


def test_ram_unique_entries_kept_and_overlaps_averaged_by_hand():
    base = torch.zeros(4)
    a = torch.tensor([1.0, 0.0, 2.0, 0.0])
    b = torch.tensor([0.0, 3.0, 4.0, 0.0])
    assert get_method("ram")([a, b], base).tolist() == [1.0, 3.0, 3.0, 0.0]
    # model a: 1 unique, 1 shared -> rho 1 -> lambda 1 + 0.5 * min(1, 0.8) = 1.4; model b: the same
    out = get_method("ramplus_tl")([a, b], base, {"r": 0.5, "alpha": 0.8})
    assert out.tolist() == pytest.approx([1.4, 4.2, 3.0, 0.0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ram_streams_chunked_like_whole(dtype):
    xs, base = _inputs((600, 500), 3, seed=5, dtype=dtype)  # > one chunk: the engine's chunked path
    streamed = merge_state_dicts("ram", [{"w": x} for x in xs], {"w": base})["w"]
    whole = get_method("ram")([x.float() for x in xs], base.float()).to(dtype)
    assert torch.equal(streamed, whole)
    plus = merge_state_dicts("ramplus_tl", [{"w": x} for x in xs], {"w": base})["w"]
    assert plus.dtype == dtype and torch.isfinite(plus.float()).all()


def test_ram_recipe_and_taxonomy():
    from merging.recipe.schema import Recipe
    from taxonomy import get

    assert get("ram").in_mergekit and get("ramplus_tl").needs_base
    r = Recipe.from_yaml("merge_method: ramplus_tl\nbase_model: b\nmodels: [a, c]\nparameters: {r: 0.2, alpha: 1}\n")
    assert r.parameters == {"r": 0.2, "alpha": 1}
