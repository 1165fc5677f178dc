"""Task arithmetic family: hand-worked examples, independent numpy references, properties, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from merging.methods import philox
from merging.methods.apply import tensor_rng
from merging.methods.catalog import get_method
from merging.methods.sparsify import kth_largest, rank_keep_probability, topk_mask
from merging.modelwise.state_dicts import merge_state_dicts
from taxonomy import BasinError

GTA = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della",
       "della_linear"]


def run(method: str, tensors, base, seed: int = 0, name: str = "w", **params) -> torch.Tensor:
    """Merge one tensor through merge_state_dicts (the public path: parameter checks, seeding)."""
    out = merge_state_dicts(method, [{name: t} for t in tensors], {name: base}, params, seed=seed)
    return out[name]


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- hand-worked examples


def test_task_arithmetic_by_hand():
    base = torch.tensor([1.0, 2.0, 3.0])
    m1, m2 = torch.tensor([2.0, 2.0, 3.0]), torch.tensor([1.0, 0.0, 5.0])  # tau1 = [1,0,0], tau2 = [0,-2,2]
    out = run("task_arithmetic", [m1, m2], base, weight=[1.0, 0.5], **{"lambda": 2.0})
    torch.testing.assert_close(out, torch.tensor([3.0, 0.0, 5.0]))  # base + 2 * [1, -1, 1]
    out = run("task_arithmetic", [m1, m2], base, weight=[1.0, 0.5], normalize=True)
    torch.testing.assert_close(out, base + torch.tensor([1.0, -1.0, 1.0]) / 1.5)
    forget = run("task_arithmetic", [m1], base, weight=-1.0)  # negation removes the task
    torch.testing.assert_close(forget, torch.tensor([0.0, 2.0, 3.0]))


def test_ties_2x3_by_hand():
    base = torch.zeros(2, 3)
    tau1 = torch.tensor([[3.0, -1.0, 0.5], [-2.0, 4.0, 0.1]])
    tau2 = torch.tensor([[-1.0, -2.0, 0.2], [1.0, -3.0, 5.0]])
    # density 0.5 keeps 3 of 6: trim1 = [[3,0,0],[-2,4,0]], trim2 = [[0,-2,0],[0,-3,5]]
    # weights 1,1: sum = [[3,-2,0],[-2,1,5]] -> signs [[+,-,+],[-,+,+]]; -3 at (1,1) disagrees and is dropped
    out = run("ties", [tau1, tau2], base, density=0.5)
    torch.testing.assert_close(out, torch.tensor([[3.0, -2.0, 0.0], [-2.0, 4.0, 5.0]]))
    # weights 1,2: weighted trim2 = [[0,-4,0],[0,-6,10]]; sum = [[3,-4,0],[-2,-2,10]] -> (1,1) elects -, so 4 drops;
    # disjoint mean divides by the agreeing weights [[1,2,1],[1,2,2]]
    out = run("ties", [tau1, tau2], base, density=0.5, weight=[1.0, 2.0])
    torch.testing.assert_close(out, torch.tensor([[3.0, -2.0, 0.0], [-2.0, -3.0, 5.0]]))


def test_breadcrumbs_by_hand():
    tau = torch.tensor([0.1, -5.0, 0.3, 2.0, -0.2, 1.0, 0.05, -0.4, 3.0, 0.6])
    # n=10, density 0.5 keeps 5, gamma 0.1 drops the largest (|-5|), then the 4 smallest (0.05, 0.1, 0.2, 0.3)
    out = run("breadcrumbs", [tau], torch.zeros(10), density=0.5, gamma=0.1)
    torch.testing.assert_close(out, torch.tensor([0, 0, 0, 2.0, 0, 1.0, 0, -0.4, 3.0, 0.6]))
    # gamma * n < 1: no outlier removed (mergekit's slice would keep nothing here)
    out = run("breadcrumbs", [tau], torch.zeros(10), density=0.3, gamma=0.01)
    torch.testing.assert_close(out, torch.tensor([0, -5.0, 0, 2.0, 0, 0, 0, 0, 3.0, 0]))


def test_della_probabilities_by_hand():
    keep = rank_keep_probability(torch.tensor([[0.1, 3.0, 2.0], [5.0, 1.0, 0.0]]), density=0.5, epsilon=0.1)
    # ascending ranks per row [0,2,1] and [2,1,0] -> 0.4 + 0.2 * rank / 2
    torch.testing.assert_close(keep, torch.tensor([[0.4, 0.6, 0.5], [0.6, 0.5, 0.4]]))
    one_d = rank_keep_probability(torch.tensor([2.0, 1.0]), density=0.3, epsilon=0.2)
    torch.testing.assert_close(one_d, torch.tensor([0.5, 0.1]))


def test_model_stock_by_hand():
    base = torch.zeros(2)
    m1, m2 = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    # cos = 1/sqrt(2), N = 2: t = 2c / (1 + c) = 2 (sqrt(2) - 1); average = [1, 0.5]
    t = 2 * (math.sqrt(2) - 1)
    torch.testing.assert_close(run("model_stock", [m1, m2], base), torch.tensor([t, t / 2]))
    # orthogonal task vectors: t = 0, the base
    torch.testing.assert_close(run("model_stock", [torch.tensor([1.0, 0]), torch.tensor([0, 1.0])], base), base)


def test_sce_by_hand():
    base = torch.ones(3)
    tau1, tau2 = torch.tensor([1.0, -2.0, 0.0]), torch.tensor([3.0, 2.0, 0.0])
    # weights: mean squares 5/3, 13/3 -> 5/18, 13/18; elected signs of [4, 0, 0] are all +
    out = run("sce", [base + tau1, base + tau2], base)
    torch.testing.assert_close(out, base + torch.tensor([44 / 18, 2.0, 0.0]))
    # select_topk 2/3: variances [1, 4, 0], 2 nonzero -> keep 1 entry (index 1); equal weights; + elected
    out = run("sce", [base + tau1, base + tau2], base, select_topk=2 / 3)
    torch.testing.assert_close(out, base + torch.tensor([0.0, 2.0, 0.0]))


def test_tsv_orthogonal_tasks_by_hand():
    e, f = torch.eye(4), torch.eye(3)
    tau1 = 3 * torch.outer(e[0], f[0])
    tau2 = 2 * torch.outer(e[1], f[2])
    # r = 3, 1/T = 1/2 keeps 1 component each; [e0 e1] and [f0 f2] are orthonormal already: the sum
    out = run("tsv", [tau1, tau2], torch.zeros(4, 3))
    torch.testing.assert_close(out, tau1 + tau2, atol=1e-6, rtol=0)
    bias = run("tsv", [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0])], torch.zeros(2), **{"lambda": 0.5})
    torch.testing.assert_close(bias, torch.tensor([1.0, 0.5]))  # 1-D: lambda * mean


# ---------------------------------------------------------------- independent numpy references


def np_topk_trim(tau: np.ndarray, density: float) -> np.ndarray:
    flat = tau.reshape(-1)
    k = int(density * flat.size)
    keep = np.argsort(-np.abs(flat), kind="stable")[:k]
    out = np.zeros_like(flat)
    out[keep] = flat[keep]
    return out.reshape(tau.shape)


def np_disjoint(weighted: list[np.ndarray], weights: list[float], normalize: bool) -> np.ndarray:
    stack = np.stack(weighted)
    elected = np.where(stack.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(stack) == elected
    mixed = (stack * agree).sum(0)
    divisor = (np.array(weights).reshape(-1, *[1] * (stack.ndim - 1)) * agree).sum(0)
    divisor[divisor == 0] = 1
    return mixed / divisor if normalize else mixed


def test_ties_against_numpy():
    base = rand(7, 9, seed=1)
    models = [base + rand(7, 9, seed=s) for s in (2, 3, 4)]
    weights, densities = [0.7, 1.3, -0.4], [0.3, 0.5, 0.9]
    out = run("ties", models, base, weight=weights, density=densities, **{"lambda": 1.5})
    b = base.numpy()
    trimmed = [np_topk_trim(m.numpy() - b, d) * w for m, d, w in zip(models, densities, weights)]
    expected = b + 1.5 * np_disjoint(trimmed, weights, normalize=True)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_breadcrumbs_ties_against_numpy():
    base = rand(10, 20, seed=5)
    models = [base + rand(10, 20, seed=s) for s in (6, 7)]
    out = run("breadcrumbs_ties", models, base, density=0.6, gamma=0.05, weight=[1.0, 0.5])
    b = base.numpy()
    weighted = []
    for m, w in zip(models, [1.0, 0.5]):
        flat = (m.numpy() - b).reshape(-1)
        order = np.argsort(np.abs(flat))  # ascending
        keep = order[200 - 120 - 10: 200 - 10]  # drop 10 largest, keep 120
        t = np.zeros_like(flat)
        t[keep] = flat[keep]
        weighted.append(t.reshape(b.shape) * w)
    np.testing.assert_allclose(out.numpy(), b + np_disjoint(weighted, [1.0, 0.5], normalize=False), rtol=1e-5,
                               atol=1e-6)


def test_dare_against_formula_with_the_documented_draws():
    base = rand(5, 8, seed=8)
    models = [base + rand(5, 8, seed=s) for s in (9, 10)]
    seed, name = 3, "layer.w"
    for rescale in (True, "unbiased"):
        out = run("dare_ties", models, base, seed=seed, name=name, density=0.4, rescale=rescale, weight=[1.0, 2.0])
        # the contract: a key from the tensor's generator; entry j of model i is kept when Philox's word for
        # (key, stream i, entry j) is below the float32 uniform's threshold (keep_mask, checked against Random123's
        # known answers and a scalar reference in test_dare_kernel.py)
        key = int(torch.randint(0, 2**62, (1,), generator=tensor_rng(seed, name)))
        weighted = []
        for i, (m, w) in enumerate(zip(models, [1.0, 2.0])):
            tau = (m - base).numpy()
            keep = philox.keep_mask(key, i, 0, 40, philox.keep_threshold(0.4)).numpy().reshape(tau.shape)
            kept = tau * keep
            scale = 1 / 0.4 if rescale == "unbiased" else np.abs(tau).sum() / np.abs(kept).sum()
            weighted.append(kept * scale * w)
        expected = base.numpy() + np_disjoint(weighted, [1.0, 2.0], normalize=False)
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_della_against_formula_with_the_documented_draws():
    base = rand(4, 6, seed=11)
    models = [base + rand(4, 6, seed=s) for s in (12, 13)]
    out = run("della", models, base, seed=1, name="x", density=0.5, epsilon=0.2, rescale="unbiased")
    # the contract: a key from the tensor's generator; entry j of model i is kept when the float32 uniform of
    # Philox's word for (key, stream i, entry j) is below its keep probability (as DARE's masks)
    key = int(torch.randint(0, 2**62, (1,), generator=tensor_rng(1, "x")))
    weighted = []
    for i, m in enumerate(models):
        tau = (m - base).numpy()
        ranks = np.argsort(np.argsort(np.abs(tau), axis=1), axis=1)
        p = 0.3 + 0.4 * ranks / 5
        keep = philox.uniforms(key, i, 0, tau.size).numpy().reshape(tau.shape) < p
        weighted.append(tau * keep / p)
    expected = base.numpy() + np_disjoint(weighted, [1.0, 1.0], normalize=True)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_against_numpy(filter_wise):
    base = rand(6, 5, seed=14)
    models = [base + rand(6, 5, seed=s) + 0.8 for s in (15, 16, 17)]
    out = run("model_stock", models, base, filter_wise=filter_wise)
    b = base.numpy()
    taus = [m.numpy() - b for m in models]
    axis = 1 if filter_wise else None
    cos = np.mean([np.sum(taus[i] * taus[j], axis=axis, keepdims=True)
                   / (np.linalg.norm(taus[i], axis=axis, keepdims=True) * np.linalg.norm(taus[j], axis=axis,
                                                                                         keepdims=True))
                   for i in range(3) for j in range(i + 1, 3)], axis=0)
    t = 3 * cos / (1 + 2 * cos)
    expected = t * np.mean([m.numpy() for m in models], axis=0) + (1 - t) * b
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_sce_against_numpy():
    base = rand(6, 7, seed=18)
    models = [base + rand(6, 7, seed=s) * s for s in (19, 20, 21)]
    out = run("sce", models, base, select_topk=0.5)
    b = base.numpy()
    taus = np.stack([m.numpy() - b for m in models])
    var = taus.var(axis=0)
    k = int(np.count_nonzero(var) * 0.5)
    keep = np.zeros(var.size, bool)
    keep[np.argsort(-var.reshape(-1), kind="stable")[:k]] = True
    taus = taus * keep.reshape(var.shape)
    energy = (taus ** 2).reshape(3, -1).mean(1)
    w = (energy / energy.sum()).reshape(3, 1, 1)
    agree = np.sign(taus) == np.where(taus.sum(0) >= 0, 1.0, -1.0)
    expected = b + (taus * w * agree).sum(0) / np.maximum((w * agree).sum(0), 1e-6)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_tsv_against_numpy():
    base = rand(8, 6, seed=22)
    models = [base + rand(8, 6, seed=s) for s in (23, 24, 25)]
    out = run("tsv", models, base, **{"lambda": 0.8})
    b = base.numpy().astype(np.float64)
    us, ss, vs = [], [], []
    for m in models:
        u, s, vt = np.linalg.svd(m.numpy() - b, full_matrices=False)
        k = int(6 / 3)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vt[:k])

    def polar(x):
        p, _, qt = np.linalg.svd(x, full_matrices=False)
        return p @ qt

    u_perp, v_perp = polar(np.hstack(us)), polar(np.vstack(vs))
    np.testing.assert_allclose(u_perp.T @ u_perp, np.eye(6), atol=1e-10)  # interference removed: orthonormal
    expected = b + 0.8 * (u_perp * np.concatenate(ss)) @ v_perp
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- the fast top-k


def test_topk_mask_radix_path_against_sort_with_ties():
    g = torch.Generator().manual_seed(0)
    continuous = torch.rand(200_003, generator=g)
    tied = torch.randint(0, 50, (200_003,), generator=g).float()  # heavy ties
    for values in (continuous, tied):
        for k in (1, 17, 100_000, 200_002):
            mask = topk_mask(values, k)
            assert int(mask.sum()) == k
            order = np.lexsort((np.arange(values.numel()), -values.numpy()))  # value desc, then index asc
            expected = np.zeros(values.numel(), bool)
            expected[order[:k]] = True
            np.testing.assert_array_equal(mask.numpy(), expected)
            assert float(kth_largest(values, k)) == float(np.sort(values.numpy())[::-1][k - 1])
    assert bool((topk_mask(tied, 50_000) <= topk_mask(tied, 90_000)).all())  # nested


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize("method", GTA + ["sce", "tsv"])
def test_density_one_single_model_returns_the_model(method):
    base, model = rand(5, 4, seed=30), rand(5, 4, seed=31)
    params = {} if method in ("sce", "tsv") else {"density": 1.0}
    torch.testing.assert_close(run(method, [model], base, **params), model, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", GTA + ["tsv"])
def test_lambda_zero_returns_the_base(method):
    base = rand(5, 4, seed=32)
    models = [rand(5, 4, seed=33), rand(5, 4, seed=34)]
    params = {"lambda": 0.0} if method == "tsv" else {"lambda": 0.0, "density": 0.5}
    torch.testing.assert_close(run(method, models, base, **params), base)


@pytest.mark.parametrize("rescale,shape,draws", [("unbiased", (2, 10), 3000), (True, (40, 100), 400)])
def test_dare_expectation_is_the_task_vector(rescale, shape, draws):
    """E[dare(tau)] = tau: exactly for 1/density; for mergekit's L1 rescale (the kept fraction
    concentrates at density) on a tensor large enough for the kept fraction to concentrate."""
    base, model = torch.zeros(shape), rand(*shape, seed=35)
    fn = get_method("dare_linear")
    total = torch.zeros_like(model)
    for i in range(draws):
        total += fn([model], base, {"density": 0.3, "rescale": rescale}, tensor_rng(i, "w"))
    mean = total / draws
    # per entry: tau/p is seen with probability p; the std of the mean is |tau| sqrt((1-p)/p / draws)
    stderr = model.abs() * math.sqrt((1 - 0.3) / 0.3 / draws)
    assert bool(((mean - model).abs() <= 6 * stderr + 1e-6).all())
    assert float((mean - model).abs().max()) > 0  # it is random: not the task vector itself


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "sce", "task_arithmetic", "model_stock", "tsv"])
def test_result_is_invariant_to_model_order(method):
    base = rand(6, 6, seed=40)
    models = [base + rand(6, 6, seed=s) for s in (41, 42, 43)]
    params = {"density": 0.5, "weight": [1.0, 0.5, 2.0]} if method in ("ties", "breadcrumbs_ties") else {}
    out = run(method, models, base, **params)
    perm = [2, 0, 1]
    params_p = dict(params)
    if "weight" in params:
        params_p["weight"] = [params["weight"][i] for i in perm]
    out_p = run(method, [models[i] for i in perm], base, **params_p)
    torch.testing.assert_close(out, out_p, atol=1e-5, rtol=1e-5)


def test_random_methods_are_deterministic_given_seed_and_name():
    base = rand(8, 8, seed=50)
    models = [base + rand(8, 8, seed=s) for s in (51, 52)]
    for method in ("dare_ties", "dare_linear", "della", "della_linear"):
        a = run(method, models, base, seed=7, name="w", density=0.5)
        assert torch.equal(a, run(method, models, base, seed=7, name="w", density=0.5))
        assert not torch.equal(a, run(method, models, base, seed=8, name="w", density=0.5))
        assert not torch.equal(a, run(method, models, base, seed=7, name="v", density=0.5))
    # tensor order in the state dict does not matter: each tensor's draws depend on its name only
    sd = [{"a": m, "b": m * 2} for m in models]
    sd_rev = [{"b": m * 2, "a": m} for m in models]
    one = merge_state_dicts("dare_ties", sd, {"a": base, "b": base * 2}, {"density": 0.5}, seed=3)
    two = merge_state_dicts("dare_ties", sd_rev, {"b": base * 2, "a": base}, {"density": 0.5}, seed=3)
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_int8_mask_is_accepted_and_ignored():
    base = rand(4, 4, seed=60)
    models = [rand(4, 4, seed=61), rand(4, 4, seed=62)]
    torch.testing.assert_close(run("ties", models, base, density=0.5, int8_mask=True),
                               run("ties", models, base, density=0.5))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_density_outside_range_is_an_error(density):
    with pytest.raises(BasinError, match="density"):
        run("ties", [torch.ones(3)], torch.zeros(3), density=density)


def test_bad_parameters_are_errors():
    with pytest.raises(BasinError, match=r"density \+- epsilon"):
        run("della", [torch.ones(3)], torch.zeros(3), density=0.1, epsilon=0.15)
    with pytest.raises(BasinError, match="rescale"):
        run("dare_linear", [torch.ones(3)], torch.zeros(3), rescale="l7")
    with pytest.raises(BasinError, match="gamma"):
        run("breadcrumbs", [torch.ones(3)], torch.zeros(3), gamma=2.0)
    with pytest.raises(BasinError, match="at least 2 models"):
        run("model_stock", [torch.ones(3)], torch.zeros(3))
    with pytest.raises(BasinError, match="opposite"):
        run("model_stock", [torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])], torch.zeros(2))


def test_shape_mismatch_and_missing_tensor_are_errors():
    with pytest.raises(BasinError, match="w: model 1 has shape"):
        merge_state_dicts("ties", [{"w": torch.ones(3)}, {"w": torch.ones(4)}], {"w": torch.zeros(3)})
    with pytest.raises(BasinError, match="w: base has shape"):
        merge_state_dicts("ties", [{"w": torch.ones(3)}], {"w": torch.zeros(4)})
    with pytest.raises(BasinError, match="needs a base"):
        merge_state_dicts("ties", [{"w": torch.ones(3)}])
    # a model missing a tensor that the base has
    with pytest.raises(BasinError, match="base tensor names differ"):
        merge_state_dicts("ties", [{"w": torch.ones(3)}], {"w": torch.zeros(3), "v": torch.zeros(2)})
