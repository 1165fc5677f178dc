"""Lambda sweeps with the lambda-free parts computed once (`ScaledMerge`): the same bits as merging at each lambda,
and as the methods' formulas written out (base + lambda * Delta; CART: m + lambda * sum of truncated vectors)."""

from __future__ import annotations

import pytest
import torch

from merging.methods.isotropic import iso_c_delta, iso_cts_delta
from merging.methods.subspace import truncated, tsv_delta
from merging.modelwise.state_dicts import merge_state_dicts, scaled_merge
from taxonomy.errors import BasinError

LAMBDAS = (0.3, 1.0, 1.7)


def states(n: int = 3, seed: int = 0) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"w": (6, 4), "v": (3, 5), "b": (4,), "s": ()}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    base["ids"] = torch.arange(7)
    models = [{k: (v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
               for k, v in base.items()} for _ in range(n)]
    return base, models


def formula(method: str, base, models, params, lam) -> dict[str, torch.Tensor]:
    """The merges as the methods computed them before the parts were split out."""
    out = {}
    for k, b in base.items():
        xs = [m[k] for m in models]
        if not b.is_floating_point():
            out[k] = b.clone()
            continue
        if method == "cart":
            mean = torch.stack(xs).mean(0)
            if mean.dim() != 2:
                out[k] = mean
                continue
            r = max(1, int(min(mean.shape) * params["rank_ratio"]))
            delta = torch.zeros_like(mean)
            for x in xs:
                delta += truncated(x - mean, r)
            out[k] = mean + lam * delta
            continue
        tvs = [x - b for x in xs]
        if b.dim() != 2:
            delta = torch.stack(tvs).mean(0)
        elif method == "tsv":
            delta = tsv_delta(tvs, params["sv_reduction"])
        elif method == "iso_c":
            delta = iso_c_delta(tvs)
        else:
            delta = iso_cts_delta(tvs, params["common_space_fraction"])
        out[k] = b + lam * delta
    return out


def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8)
                                        if a[k].dim() else a[k].reshape(1).view(torch.uint8),
                                        b[k].view(torch.uint8) if b[k].dim() else b[k].reshape(1).view(torch.uint8))
                                        for k in a)


@pytest.mark.parametrize(("method", "params"), [("tsv", {"sv_reduction": 0.5}), ("iso_c", {}),
                                                 ("iso_cts", {"common_space_fraction": 0.5}),
                                                 ("cart", {"rank_ratio": 0.5})])
def test_scaled_merge_is_the_merge_at_every_lambda_bit_for_bit(method, params):
    base, models = states()
    needs_base = method != "cart"
    sweep = scaled_merge(method, models, base if needs_base else None, params, seed=3)
    for lam in LAMBDAS:
        direct = merge_state_dicts(method, models, base if needs_base else None, {**params, "lambda": lam}, seed=3)
        assert same_bits(sweep.at(lam), direct)
        assert same_bits(direct, formula(method, base, models, params, lam))


def test_scaled_merge_refuses_methods_without_parts_and_checks_lambda():
    base, models = states()
    with pytest.raises(BasinError, match="ties"):
        scaled_merge("ties", models, base)
    with pytest.raises(BasinError, match="lambda"):
        scaled_merge("tsv", models, base).at(float("nan"))
