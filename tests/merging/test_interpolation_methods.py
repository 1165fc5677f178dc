"""Interpolation-family merge methods against direct formulas (numpy, float64) and hand-worked cases."""

import math

import numpy as np
import pytest
import torch

import taxonomy
from merging.methods.apply import CHUNK_ELEMENTS
from merging.methods.catalog import get_method
from merging.modelwise.state_dicts import merge_state_dicts
from taxonomy import BasinError

SQRT2 = math.sqrt(2.0)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def close(actual, expected, atol=1e-5, rtol=1e-5):
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), np.asarray(expected), atol=atol, rtol=rtol)


# --- direct references (float64 numpy, written from the published formulas) ---------------------

def ref_slerp(t, a, b, threshold=0.9995):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cos = np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b))
    if abs(cos) > threshold:
        return (1 - t) * a + t * b
    om = np.arccos(cos)
    return np.sin((1 - t) * om) / np.sin(om) * a + np.sin(t * om) / np.sin(om) * b


def ref_multislerp(xs, w, base=None, normalize=True, eps=1e-8):
    """mergekit's steps: unit vectors, tangent space at the normalized weighted mean, exp map, mean norm."""
    xs = np.stack([np.asarray(x, np.float64).ravel() for x in xs])
    if base is not None:
        xs = xs - np.asarray(base, np.float64).ravel()
    w = np.asarray(w, np.float64)
    w = w / w.sum() if normalize else w
    norms = np.linalg.norm(xs, axis=1, keepdims=True)
    u = xs / (norms + eps)
    m = (w[:, None] * u).sum(0)
    m = m / np.linalg.norm(m)
    tangent = (w[:, None] * (u - (u @ m)[:, None] * m)).sum(0)
    tn = np.linalg.norm(tangent) + eps
    out = (m * np.cos(tn) + tangent * np.sin(tn) / tn) * (norms[:, 0] * w).sum()
    return out if base is None else out + np.asarray(base, np.float64).ravel()


# --- linear and the uniform soup ----------------------------------------------------------------

def test_linear_unnormalized_and_zero_sum():
    xs = [rand(4, 3, seed=i) for i in range(3)]
    out = merge_state_dicts("linear", [{"w": x} for x in xs], params={"weight": [0.5, -1.0, 2.0], "normalize": False})
    close(out["w"], 0.5 * xs[0].numpy() - xs[1].numpy() + 2 * xs[2].numpy())
    with pytest.raises(BasinError, match="sum to zero"):
        merge_state_dicts("linear", [{"w": x} for x in xs[:2]], params={"weight": [1.0, -1.0]})


def test_model_soup_is_the_plain_mean_and_has_an_alias():
    xs = [rand(5, 2, seed=i) for i in range(4)]
    out = merge_state_dicts("model_soup", [{"w": x} for x in xs])
    close(out["w"], np.mean([x.numpy() for x in xs], axis=0))
    assert taxonomy.get("uniform_soup").name == "model_soup"
    assert torch.equal(merge_state_dicts("uniform_soup", [{"w": xs[0]}] * 4)["w"], xs[0])  # (4x)/4 is exact


# --- slerp ----------------------------------------------------------------------------------------

def test_slerp_orthogonal_vectors_hand_worked():
    a, b = torch.tensor([2.0, 0.0, 0.0]), torch.tensor([0.0, 3.0, 0.0])
    out = get_method("slerp")([b], a, {"t": 0.5})
    close(out, (a + b).numpy() / SQRT2)  # sin(pi/4) / sin(pi/2) = 1/sqrt(2) on each raw vector
    out = get_method("slerp")([b], a, {"t": 1 / 3})  # angle 30 degrees along the quarter circle
    close(out, [2 * math.sin(math.pi / 3), 3 * math.sin(math.pi / 6), 0.0])


@pytest.mark.parametrize("t", [0.1, 0.5, 0.77])
def test_slerp_random_against_formula(t):
    a, b = rand(6, 5, seed=1), rand(6, 5, seed=2)
    out = merge_state_dicts("slerp", [{"w": b}], base={"w": a}, params={"t": t})
    close(out["w"], ref_slerp(t, a.numpy(), b.numpy()))


def test_slerp_endpoints_are_bit_exact_in_any_dtype():
    a, b = rand(7, 3, seed=3).to(torch.bfloat16), rand(7, 3, seed=4).to(torch.bfloat16)
    assert torch.equal(merge_state_dicts("slerp", [{"w": b}], base={"w": a}, params={"t": 0})["w"], a)
    assert torch.equal(merge_state_dicts("slerp", [{"w": b}], base={"w": a}, params={"t": 1})["w"], b)
    x = rand(4, 4, seed=5)
    assert torch.equal(merge_state_dicts("slerp", [{"w": x}], base={"w": x.clone()}, params={"t": 0.3})["w"], x)


def test_slerp_colinear_fallback_uses_mergekits_threshold():
    a = torch.tensor([1.0, 0.0])
    for cos, colinear in ((0.9996, True), (0.999, False), (-0.9999, True)):
        b = 3 * torch.tensor([cos, math.sqrt(1 - cos**2)])
        out = get_method("slerp")([b], a, {"t": 0.4}).numpy()
        lerp = 0.6 * a.numpy() + 0.4 * b.numpy()
        close(out, ref_slerp(0.4, a.numpy(), b.numpy()))
        assert np.allclose(out, lerp, atol=1e-7) == colinear, cos


def test_slerp_bad_parameters_are_named():
    sd = {"w": torch.ones(2)}
    with pytest.raises(BasinError, match="'t'"):
        merge_state_dicts("slerp", [sd], base=sd, params={"t": 1.5})
    with pytest.raises(BasinError, match="'t'"):
        merge_state_dicts("slerp", [sd], base=sd)  # t is required, as in mergekit
    with pytest.raises(BasinError, match="at most 1"):
        merge_state_dicts("slerp", [sd, sd], base=sd, params={"t": 0.5})
    with pytest.raises(BasinError, match="needs a base"):
        merge_state_dicts("slerp", [sd], params={"t": 0.5})


# --- nuslerp ----------------------------------------------------------------------------------------

def test_nuslerp_flat_matches_slerp_formula_at_weight_ratio():
    a, b = rand(4, 6, seed=6), rand(4, 6, seed=7)
    out = merge_state_dicts("nuslerp", [{"w": a}, {"w": b}], params={"weight": [1.0, 3.0]})
    close(out["w"], ref_slerp(0.75, a.numpy(), b.numpy()))
    half = merge_state_dicts("nuslerp", [{"w": a}, {"w": b}], params={"weight": [1.0, -1.0]})  # sum ~ 0: t = 0.5
    close(half["w"], ref_slerp(0.5, a.numpy(), b.numpy()))


@pytest.mark.parametrize("row_wise", [False, True])
def test_nuslerp_per_vector(row_wise):
    a, b = rand(3, 5, seed=8), rand(3, 5, seed=9)
    params = {"weight": [0.6, 0.4], "nuslerp_flatten": False, "nuslerp_row_wise": row_wise}
    out = get_method("nuslerp")([a, b], None, params).numpy()
    an, bn = (a.numpy().T, b.numpy().T) if row_wise else (a.numpy(), b.numpy())  # row_wise: vectors along dim 0
    expected = np.stack([ref_slerp(0.4, x, y, threshold=2.0) for x, y in zip(an, bn)])
    close(out, expected.T if row_wise else expected)


def test_nuslerp_with_base_slerps_task_vectors_and_drops_a_listed_base():
    base, a, b = rand(8, seed=10), rand(8, seed=11), rand(8, seed=12)
    expected = base.numpy() + ref_slerp(0.25, (a - base).numpy(), (b - base).numpy())
    params = {"weight": [0.75, 0.25]}
    close(merge_state_dicts("nuslerp", [{"w": a}, {"w": b}], base={"w": base}, params=params)["w"], expected)
    listed = merge_state_dicts("nuslerp", [{"w": base}, {"w": a}, {"w": b}], base={"w": base},
                               params={"weight": [9.0, 0.75, 0.25]})  # the engine lists the base first
    close(listed["w"], expected)
    with pytest.raises(BasinError, match="exactly two"):
        merge_state_dicts("nuslerp", [{"w": base}, {"w": a}, {"w": b}])


def test_nuslerp_of_a_model_with_itself_returns_it():
    x = rand(5, 5, seed=13)
    for flatten in (True, False):
        out = get_method("nuslerp")([x, x.clone()], None, {"nuslerp_flatten": flatten})
        close(out, x.numpy(), atol=1e-5)


# --- multislerp ---------------------------------------------------------------------------------------

def test_multislerp_hand_worked_orthogonal_units():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    close(get_method("multislerp")([a, b]), [1 / SQRT2, 1 / SQRT2])


@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_against_mergekits_steps(normalize):
    xs = [rand(3, 4, seed=20 + i) for i in range(4)]
    w = [0.1, 0.4, 0.3, 0.2] if normalize else [0.2, 0.8, 0.6, 0.4]
    out = merge_state_dicts("multislerp", [{"w": x} for x in xs], params={"weight": w, "normalize_weights": normalize})
    close(out["w"].reshape(-1), ref_multislerp([x.numpy() for x in xs], w, normalize=normalize))


def test_multislerp_with_base_and_listed_base():
    base = rand(10, seed=30)
    xs = [rand(10, seed=31 + i) for i in range(3)]
    expected = ref_multislerp([x.numpy() for x in xs], [1, 2, 3], base=base.numpy())
    out = merge_state_dicts("multislerp", [{"w": x} for x in xs], base={"w": base}, params={"weight": [1, 2, 3]})
    close(out["w"], expected)
    listed = merge_state_dicts("multislerp", [{"w": base}] + [{"w": x} for x in xs], base={"w": base},
                               params={"weight": [5, 1, 2, 3]})
    close(listed["w"], expected)


def test_multislerp_degenerate_inputs():
    x = rand(6, seed=40)
    close(get_method("multislerp")([x, x.clone(), x.clone()]), x.numpy())  # same model thrice: itself
    close(get_method("multislerp")([x, -x]), np.zeros(6))  # antipodal pair: mergekit's linear fallback
    with pytest.raises(BasinError, match="zero"):
        get_method("multislerp")([x, -x, x, -x])


# --- karcher --------------------------------------------------------------------------------------------

def test_karcher_orthogonal_units_is_the_geodesic_midpoint():
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    close(get_method("karcher")([a, b]), [1 / SQRT2, 1 / SQRT2, 0.0])


def test_karcher_minimizes_the_weighted_squared_geodesic_distance():
    """Reference: scipy minimizes sum_i a_i arccos(<m, u_i>)^2 over the sphere (parametrized by m / |m|)."""
    from scipy.optimize import minimize

    xs = [torch.tensor(v) for v in ([1.0, 0.2, 0.1], [0.3, 2.0, -0.2], [0.2, 0.1, 0.5], [0.9, 0.9, 0.9])]
    w = np.array([1.0, 2.0, 0.5, 1.5])
    a = w / w.sum()
    units = np.stack([x.numpy() / np.linalg.norm(x.numpy()) for x in xs]).astype(np.float64)

    def cost(v):
        m = v / np.linalg.norm(v)
        return float((a * np.arccos(np.clip(units @ m, -1, 1)) ** 2).sum())

    best = minimize(cost, units.mean(0), method="Nelder-Mead", options={"xatol": 1e-12, "fatol": 1e-15,
                                                                         "maxiter": 20000}).x
    expected = best / np.linalg.norm(best) * (a * [np.linalg.norm(x.numpy()) for x in xs]).sum()
    out = get_method("karcher")(xs, None, {"weight": list(w), "max_iter": 200, "tol": 1e-7})
    close(out, expected, atol=2e-5)


def test_karcher_high_dim_stationarity_and_zero_tensor_rule():
    xs = [rand(20, 10, seed=50 + i) for i in range(3)]
    out = get_method("karcher")(xs, None, {"max_iter": 100, "tol": 1e-7}).numpy().ravel().astype(np.float64)
    m = out / np.linalg.norm(out)
    grad = np.zeros_like(m)  # sum_i log_m(u_i) vanishes at the Frechet mean
    for x in xs:
        u = x.numpy().ravel() / np.linalg.norm(x.numpy())
        c = np.clip(u @ m, -1, 1)
        grad += np.arccos(c) / np.sqrt(1 - c * c) * (u - c * m)
    assert np.linalg.norm(grad) < 1e-4
    close(np.linalg.norm(out), np.mean([np.linalg.norm(x.numpy()) for x in xs]), rtol=1e-5)
    x = rand(5, seed=60)  # a zero tensor has no direction but counts in the norm average (mergekit)
    close(get_method("karcher")([x, torch.zeros(5)]), x.numpy() / 2)


# --- nearswap -------------------------------------------------------------------------------------------

def test_nearswap_against_formula_and_hand_values():
    base, other = rand(4, 5, seed=70), rand(4, 5, seed=71)
    other[0, 0] = base[0, 0]
    t = 0.3
    out = merge_state_dicts("nearswap", [{"w": other}], base={"w": base}, params={"t": t})["w"].numpy()
    d = np.abs(base.numpy() - other.numpy()).astype(np.float64)
    lam = np.clip(np.divide(t, d, out=np.ones_like(d), where=d > 0), 0, 1)
    close(out, lam * other.numpy() + (1 - lam) * base.numpy())
    near = d < t
    assert np.array_equal(out[near], other.numpy()[near])  # closer than t: the other model's value
    hand = get_method("nearswap")([torch.tensor([1.0, 4.0])], torch.tensor([0.0, 0.0]), {"t": 2.0})
    close(hand, [1.0, 2.0])  # |d| = 4: lambda = 0.5


def test_nearswap_threshold_must_be_positive():
    sd = {"w": torch.ones(3)}
    for params in ({"t": 0.0}, {"t": -1.0}, {}):
        with pytest.raises(BasinError, match="'t'"):
            merge_state_dicts("nearswap", [sd], base=sd, params=params)


# --- arcee_fusion ---------------------------------------------------------------------------------------

def ref_fusion(other, base):
    o, b = np.asarray(other, np.float64), np.asarray(base, np.float64)
    if o.ndim == 0:
        o, b = o.reshape(1), b.reshape(1)

    def softmax(v):
        e = np.exp(v - v.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p, q = softmax(o) + 1e-8, softmax(b) + 1e-8
    importance = np.abs(o - b) * (p * np.log(p / q)).sum(-1, keepdims=True)
    s = np.sort(importance.ravel())
    n = s.size
    q1, med, q3 = (s[int(f * (n - 1))] for f in (0.25, 0.5, 0.75))
    mask = importance >= med + 1.5 * (q3 - q1)
    return np.where(mask, o, b).reshape(np.shape(other)), mask


@pytest.mark.parametrize("shape", [(16, 32), (40,), (3, 4, 9)])
def test_arcee_fusion_against_formula(shape):
    base = rand(*shape, seed=80)
    other = base + 0.05 * rand(*shape, seed=81) + (rand(*shape, seed=82) > 2.0) * rand(*shape, seed=83)
    out = merge_state_dicts("arcee_fusion", [{"w": other}], base={"w": base})["w"]
    expected, mask = ref_fusion(other.numpy(), base.numpy())
    assert np.array_equal(out.numpy(), expected.astype(np.float32))
    assert 0 < mask.sum() < mask.size  # some, not all, changes are fused


def test_order_statistics_both_paths_match_sorting():
    from merging.methods.interpolation import order_statistics

    v = rand(1001, seed=85)
    expected = [float(np.sort(v.numpy())[r]) for r in (0, 250, 500, 1000)]
    for use_numpy in (True, False):  # numpy selection (CPU) and torch.kthvalue (accelerators)
        assert order_statistics(v, [0, 250, 500, 1000], use_numpy=use_numpy) == expected


def test_arcee_fusion_identical_models_and_scalars():
    x = rand(6, 7, seed=84)
    assert torch.equal(get_method("arcee_fusion")([x.clone()], x), x)
    s_base, s_other = torch.tensor(0.5), torch.tensor(1.5)
    out = get_method("arcee_fusion")([s_other], s_base)
    assert out.shape == () and float(out) == float(ref_fusion(1.5, 0.5)[0])


# --- passthrough ----------------------------------------------------------------------------------------

def test_passthrough_returns_the_model_unchanged_or_scaled():
    x = rand(3, 3, seed=90).to(torch.float16)
    assert torch.equal(merge_state_dicts("passthrough", [{"w": x}])["w"], x)
    close(merge_state_dicts("passthrough", [{"w": x}], params={"scale": 0.5})["w"], x.float().numpy() * 0.5,
          atol=1e-3)
    with pytest.raises(BasinError, match="at most 1"):
        merge_state_dicts("passthrough", [{"w": x}, {"w": x}])


# --- engine integration and taxonomy ------------------------------------------------------------------------

def test_elementwise_methods_chunk_large_tensors_exactly():
    n = CHUNK_ELEMENTS + 1000
    base, other, third = rand(n, seed=91), rand(n, seed=92), rand(n, seed=93)
    out = merge_state_dicts("nearswap", [{"w": other}], base={"w": base}, params={"t": 0.5})["w"]
    lam = (0.5 / (base - other).abs()).clamp(0, 1)
    close(out, (lam * other + (1 - lam) * base).numpy())
    close(merge_state_dicts("model_soup", [{"w": base}, {"w": other}, {"w": third}])["w"],
          ((base.double() + other.double() + third.double()) / 3).numpy())
    assert torch.equal(merge_state_dicts("passthrough", [{"w": base}])["w"], base)


def test_taxonomy_entries_follow_mergekit():
    expected = {  # name: (needs_base, min_models, max_models, params, in_mergekit)
        "slerp": (True, 1, 1, {"t"}, True),
        "nuslerp": (False, 2, 3, {"weight", "nuslerp_flatten", "nuslerp_row_wise"}, True),
        "multislerp": (False, 1, None, {"weight", "normalize_weights", "eps"}, True),
        "karcher": (False, 1, None, {"weight", "max_iter", "tol"}, True),
        "nearswap": (True, 1, 1, {"t"}, True),
        "arcee_fusion": (True, 1, 1, set(), True),
        "passthrough": (False, 1, 1, {"scale"}, True),
        "model_soup": (False, 1, None, set(), False),
    }
    for name, (needs_base, lo, hi, params, in_mk) in expected.items():
        info = taxonomy.get(name)
        assert info.family == taxonomy.Family.INTERPOLATION
        assert (info.needs_base, info.min_models, info.max_models, info.in_mergekit) == (needs_base, lo, hi, in_mk)
        assert {p.name for p in info.params} == params, name
    assert taxonomy.get("greedy_soup").kind == taxonomy.Kind.MODELWISE


def test_recipes_through_the_streaming_engine(tmp_path):
    """mergekit-style recipes for each method, merged from safetensors files, against the direct formulas."""
    from safetensors.torch import load_file

    from merging import merge
    from tests.merging.conftest import random_state, write_safetensors

    states = [random_state(s) for s in range(3)]
    paths = [str(write_safetensors(s, tmp_path / f"m{i}")) for i, s in enumerate(states)]
    name = "layers.1.mlp.weight"  # the middle of three layers: a [0, 1] gradient gives t = 0.5 here
    b, x, y = (s[name].numpy() for s in states)

    def run(method, models, params=None, base=True):
        recipe = {"merge_method": method, "models": models, "parameters": params or {}}
        if base:
            recipe["base_model"] = paths[0]
        out = tmp_path / f"out-{method}"
        merge(recipe, out, progress=False)
        return load_file(out / "model.safetensors")[name].numpy()

    both = [{"model": paths[0]}, {"model": paths[1]}]
    close(run("slerp", both, {"t": [0.0, 1.0]}), ref_slerp(0.5, b, x))
    three = [{"model": p, "parameters": {"weight": w}} for p, w in zip(paths, (1.0, 1.0, 3.0))]
    close(run("nuslerp", three), b + ref_slerp(0.75, x - b, y - b))
    close(run("multislerp", three), ref_multislerp([x, y], [1.0, 3.0], base=b).reshape(b.shape))
    close(run("nearswap", both, {"t": 0.5}),
          b + np.clip(0.5 / np.abs(b - x), 0, 1) * (x - b))
    close(run("arcee_fusion", both), ref_fusion(x, b)[0])
    close(run("passthrough", [{"model": paths[1], "parameters": {"scale": 2.0}}], base=False), 2 * x)
    karcher = run("karcher", [{"model": p} for p in paths[1:]], {"max_iter": 50, "tol": 1e-7}, base=False)
    close(karcher, get_method("karcher")([torch.from_numpy(x), torch.from_numpy(y)]).numpy())
    mid = x / np.linalg.norm(x) + y / np.linalg.norm(y)  # two points: the geodesic midpoint, at the mean norm
    close(karcher, mid / np.linalg.norm(mid) * (np.linalg.norm(x) + np.linalg.norm(y)) / 2)
