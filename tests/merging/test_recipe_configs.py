"""mergekit's documented example configs (tests/configs/, rewritten for tiny local Llamas) run unchanged:
the output loads with transformers and runs, and every output tensor follows its method's formula,
recomputed here in float64 from the inputs (the papers' whole-tensor formulas, mergekit's conventions:
the base model listed among `models` is not a task vector; a gradient [v_0..v_m] gives layer l of L the
value interpolated at t = l / (L - 1), tensors outside the layers t = 0; filters match by substring).

Each config runs as written (tolerance: one rounding to its output dtype) and with `dtype: float32`
(tolerance 1e-6 of the tensor's scale). DARE and DELLA draw seeded masks: for them the deterministic
properties are checked (each entry is one of the sign-elected sums of rescaled task vectors, one L1
rescale factor per task vector, the kept fraction of the smaller / larger half of |tau| near density -+
epsilon / 2) and reruns are bit-identical.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from string import Template

import numpy as np
import pytest
import torch

from merging import merge, open_checkpoint
from merging.methods.catalog import registered_names
from merging.recipe.schema import Recipe

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
LAYERS = 3  # tiny_llama's layers (tests/merging/conftest.py)
F64 = dict[str, torch.Tensor]


def _load(folder: Path, dtype: torch.dtype = torch.float64) -> F64:
    c = open_checkpoint(folder)
    return {n: c.get(n).to(dtype) for n in c.names()}


def _layer(name: str) -> int | None:
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _t(name: str) -> float:
    """mergekit's planner: t = l / (L - 1) in layer l, 0 outside the layers."""
    layer = _layer(name)
    return 0.0 if layer is None else layer / (LAYERS - 1)


def _gradient(values: list[float], t: float) -> float:
    """mergekit's evaluate_setting for a list of numbers: linear interpolation at t * (len - 1)."""
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    return (1 - (scaled - i0)) * values[i0] + (scaled - i0) * values[i1]


def _run(config: Path, family: dict[str, Path], out: Path, float32: bool = False) -> tuple[F64, torch.dtype]:
    text = Template(config.read_text()).substitute({k: str(v) for k, v in family.items()})
    if float32:
        text = re.sub(r"^dtype: \w+$", "dtype: float32", text, flags=re.M)
    recipe = Recipe.from_yaml(text)
    assert recipe.merge_method in registered_names()
    report = merge(recipe, out, progress=False)
    c = open_checkpoint(out)
    assert report.tensors == len(c.names())
    return _load(out), c.get(c.names()[0]).dtype


def _assert_formula(out: F64, expected: F64, dtype: torch.dtype) -> None:
    """|out - expected| <= rtol |expected| + 1e-6 max|expected|, rtol one rounding to `dtype` (1e-6 in float32)."""
    assert sorted(out) == sorted(expected)
    rtol = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
    for name, want in expected.items():
        err = (out[name] - want).abs()
        bound = rtol * want.abs() + 1e-6 * float(want.abs().max())
        assert bool((err <= bound).all()), f"{name}: max error {float(err.max()):.3g}"


def _assert_copy(out: F64, expected: F64) -> None:
    assert sorted(out) == sorted(expected)
    for name, want in expected.items():
        assert torch.equal(out[name], want), name


# --- whole-tensor references, float64 ---------------------------------------------------------------------

def _linear(s: dict[str, F64]) -> F64:
    """Weighted average, normalized: (1 A + 0.5 B) / 1.5."""
    return {n: (s["A"][n] + 0.5 * s["B"][n]) / 1.5 for n in s["A"]}


def _task_arithmetic(s: dict[str, F64]) -> F64:
    """Ilharco et al. 2023: base + lambda sum_i w_i tau_i, lambda 0.8, w = (1, -0.5), no normalization."""
    b = s["BASE"]
    return {n: b[n] + 0.8 * ((s["FT1"][n] - b[n]) - 0.5 * (s["FT2"][n] - b[n])) for n in b}


def _top_k(tau: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: keep the int(density n) largest |tau| (density >= 1 keeps all)."""
    if density >= 1:
        return tau
    flat = tau.flatten()
    keep = torch.zeros_like(flat)
    idx = np.argsort(-np.abs(flat.numpy()), kind="stable")[: int(density * flat.numel())]
    keep[torch.from_numpy(idx)] = 1
    return (flat * keep).reshape(tau.shape)


def _band(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: drop the int(gamma n) largest |tau|, then the smallest so that int(density n) remain."""
    flat = tau.flatten()
    n = flat.numel()
    keep_n, top = int(density * n), int(gamma * n)
    bottom = n - keep_n - top
    order = np.argsort(np.abs(flat.numpy()), kind="stable")
    keep = torch.zeros_like(flat)
    keep[torch.from_numpy(order[bottom:n - top])] = 1
    return (flat * keep).reshape(tau.shape)


def _elect(weighted: list[torch.Tensor], weights: list[float], normalize: bool) -> torch.Tensor:
    """TIES elect (sign of sum_i w_i tau_i, 0 counts as +) and disjoint sum, divided by the agreeing weights
    if `normalize` (mergekit's variant: election over the weighted task vectors; zero entries never agree)."""
    stacked = torch.stack(weighted)
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0).to(stacked.dtype)
    agree = (torch.sign(stacked) == sign).to(stacked.dtype)
    mixed = (stacked * agree).sum(0)
    if not normalize:
        return mixed
    divisor = (torch.tensor(weights, dtype=stacked.dtype).view(-1, *[1] * sign.dim()) * agree).sum(0)
    return mixed / torch.where(divisor == 0, 1.0, divisor)


def _ties(s: dict[str, F64]) -> F64:
    """Yadav et al. 2023 (TIES): FT1 density [1, 0.7, 0.1] over depth, FT2 density 0.5 and weight
    [0, 0.3, 0.7, 1] over depth; trim, elect, disjoint mean (normalize)."""
    b, out = s["BASE"], {}
    for n in b:
        t = _t(n)
        weights = [1.0, _gradient([0, 0.3, 0.7, 1], t)]
        taus = [_top_k(s["FT1"][n] - b[n], _gradient([1, 0.7, 0.1], t)), _top_k(s["FT2"][n] - b[n], 0.5)]
        out[n] = b[n] + _elect([w * tau for w, tau in zip(weights, taus)], weights, normalize=True)
    return out


def _breadcrumbs_ties(s: dict[str, F64]) -> F64:
    """Davari and Belilovsky 2024: band masks (density 0.8, gamma 0.05), weights 0.5, election, sum."""
    b = s["BASE"]
    return {n: b[n] + _elect([0.5 * _band(s[k][n] - b[n], 0.8, 0.05) for k in ("FT1", "FT2")], [0.5, 0.5], False)
            for n in b}


def _model_stock(s: dict[str, F64]) -> F64:
    """Jang et al. 2024 (eq. 2), whole tensors: t = 2 cos / (1 + cos), t mean_i theta_i + (1 - t) base."""
    b, out = s["BASE"], {}
    for n in b:
        t1, t2 = (s[k][n] - b[n] for k in ("FT1", "FT2"))
        cos = float((t1 * t2).sum() / max(float(t1.norm() * t2.norm()), 1e-6))
        ratio = 2 * cos / (1 + cos)
        out[n] = ratio * (s["FT1"][n] + s["FT2"][n]) / 2 + (1 - ratio) * b[n]
    return out


def _slerp_pair(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Shoemake 1985 on the flattened tensors; |cos| > 0.9995 falls back to lerp (mergekit)."""
    na, nb = float(a.norm()), float(b.norm())
    cos = float((a * b).sum()) / ((na if na > 1e-8 else 1.0) * (nb if nb > 1e-8 else 1.0))
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    omega = math.acos(max(-1.0, min(1.0, cos)))
    return (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)


def _slerp_t(name: str) -> float:
    """The config's t: self_attn [0, 0.5, 0.3, 0.7, 1], mlp [1, 0.5, 0.7, 0.3, 0], else 0.5."""
    if "self_attn" in name:
        return _gradient([0, 0.5, 0.3, 0.7, 1], _t(name))
    if "mlp" in name:
        return _gradient([1, 0.5, 0.7, 0.3, 0], _t(name))
    return 0.5


def _slerp(s: dict[str, F64]) -> F64:
    return {n: _slerp_pair(_slerp_t(n), s["A"][n], s["B"][n]) for n in s["A"]}


def _passthrough(s: dict[str, F64]) -> F64:
    """Layers 0-1 of A, then layers 1-2 of B renumbered 2-3; embeddings from the first slice's model (A),
    final norm and head from the last slice's (B), as mergekit's planner."""
    out = {}
    for n in s["A"]:
        layer = _layer(n)
        if layer is None:
            out[n] = (s["A"] if "embed" in n else s["B"])[n]
        elif layer < 2:
            out[n] = s["A"][n]
            out[n.replace(f".layers.{layer}.", f".layers.{layer + 2}.")] = s["B"][n.replace(
                f".layers.{layer}.", f".layers.{layer + 1}.")]
    return out


FORMULAS = {"linear": _linear, "task_arithmetic": _task_arithmetic, "ties": _ties,
            "breadcrumbs_ties": _breadcrumbs_ties, "model_stock": _model_stock, "slerp_gradient": _slerp,
            "passthrough_frankenmerge": _passthrough}
# weights, density, epsilon, normalize
RANDOM = {"dare_ties": ([0.4, 0.6], 0.53, 0.0, False), "della": ([1.0, 1.0], 0.7, 0.15, True)}


# --- seeded masks: what is deterministic ----------------------------------------------------------------

def _scale(d: torch.Tensor, c: torch.Tensor, other: torch.Tensor, tol: torch.Tensor) -> float:
    """The rescale factor s of one task vector, from the entries where only it can show: tau's disagree in
    sign and d has c's sign (d = s c there, one factor per tensor: checked)."""
    show = (torch.sign(c) != torch.sign(other)) & (torch.sign(d) == torch.sign(c)) & (d.abs() > tol) \
        & (c.abs() >= c.abs().median())
    ratios = d[show] / c[show]
    s = float(ratios.median())
    assert bool(((ratios - s).abs() <= 1e-4 * s).all()), "more than one rescale factor in a task vector"
    return s


def _decode(d: torch.Tensor, cs: list[torch.Tensor], weights: list[float], normalize: bool, tol: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Match every entry of d = out - base to one of the sign-elected disjoint sums of {c_1, c_2} (c_i =
    w_i s_i tau_i, kept or dropped); returns (matched everywhere, kept masks where the signs agree)."""
    matched = torch.zeros_like(d, dtype=torch.bool)
    kept = torch.zeros((2, *d.shape), dtype=torch.bool)
    agree = torch.sign(cs[0]) == torch.sign(cs[1])
    for k1 in (0, 1):
        for k2 in (0, 1):
            total = k1 * cs[0] + k2 * cs[1]
            wsum = k1 * weights[0] + k2 * weights[1]
            if k1 and k2:
                cand = torch.where(agree, total, torch.where(total >= 0, cs[0].clamp(min=0) + cs[1].clamp(min=0),
                                                             cs[0].clamp(max=0) + cs[1].clamp(max=0)))
                wsum_t = torch.where(agree, wsum, torch.where((cand == cs[0]), weights[0], weights[1]))
            else:
                cand, wsum_t = total, torch.full_like(d, wsum if wsum else 1.0)
            cand = cand / wsum_t if normalize else cand
            hit = (d - cand).abs() <= tol
            matched |= hit
            kept[0] |= hit & agree & bool(k1)
            kept[1] |= hit & agree & bool(k2)
    return matched, kept


def _upper_half(tau: torch.Tensor) -> torch.Tensor:
    """Entries whose |tau| ranks in the upper half of their row (DELLA's rows: the last axis; 1-D one row)."""
    rows = tau.abs().reshape(1, -1) if tau.dim() < 2 else tau.abs().reshape(tau.shape[0], -1)
    ranks = rows.argsort(dim=1).argsort(dim=1)
    return (ranks >= rows.shape[1] / 2).reshape(tau.shape)


def _tensor_kept(out: torch.Tensor, base: torch.Tensor, taus: list[torch.Tensor], weights: list[float],
                 density: float, normalize: bool) -> np.ndarray:
    """Check one tensor; returns [model, lower/upper half of |tau|, kept/seen] counts over sign-agreeing entries."""
    d = out - base
    counts = np.zeros((2, 2, 2))
    if not any(bool(tau.any()) for tau in taus):  # the norms: ones in every input (tiny_llama's noise is 0)
        assert not bool(d.any())
        return counts
    tol = 1e-6 * float(base.abs().max()) + 1e-6 * d.abs()
    raw = [w * tau for w, tau in zip(weights, taus)]
    scaled = [d * (w if normalize else 1.0) for w in weights]  # normalized: d = c_i / w_i where one shows
    factors = [_scale(scaled[i], raw[i], raw[1 - i], tol) for i in range(2)]
    assert all(1 < f < 2 / density for f in factors), f"L1 rescale factors {factors}"
    matched, kept = _decode(d, [f * c for f, c in zip(factors, raw)], weights, normalize, tol)
    assert bool(matched.all()), f"{int((~matched).sum())} entries are no elected sum of kept deltas"
    agree = torch.sign(raw[0]) == torch.sign(raw[1])
    for i in range(2):
        upper = _upper_half(taus[i])
        for half, where in enumerate((~upper, upper)):
            counts[i, half] = int((kept[i] & where).sum()), int((agree & where).sum())
    return counts


def _check_random(out: F64, s: dict[str, F64], weights: list[float], density: float, epsilon: float,
                  normalize: bool) -> None:
    """Every tensor: entries are elected sums of kept, rescaled deltas; over all tensors, the kept fraction of
    the smaller and larger half of |tau| is density -+ epsilon / 2 (DELLA's rank-linear keep probability)."""
    b = s["BASE"]
    counts = sum(_tensor_kept(out[n], b[n], [s[k][n] - b[n] for k in ("FT1", "FT2")], weights, density, normalize)
                 for n in b)
    fractions = counts[..., 0] / counts[..., 1]
    expected = np.array([density - epsilon / 2, density + epsilon / 2])
    assert np.all(np.abs(fractions - expected) < 0.03), fractions


# --- tests -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_documented_config_runs(config, tmp_path, llama_family):
    from transformers import AutoModelForCausalLM

    out, dtype = _run(config, llama_family, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").float().eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()
    sources = {k: _load(v) for k, v in llama_family.items()}
    if config.stem == "passthrough_frankenmerge":  # a copy, bit for bit (one rounding to the output dtype)
        _assert_copy(out, {n: t.to(dtype).double() for n, t in _passthrough(sources).items()})
    elif config.stem in FORMULAS:
        _assert_formula(out, FORMULAS[config.stem](sources), dtype)


@pytest.mark.parametrize("config", [c for c in CONFIGS if c.stem in FORMULAS], ids=lambda c: c.stem)
def test_documented_config_formula_float32(config, tmp_path, llama_family):
    out, dtype = _run(config, llama_family, tmp_path / "out", float32=True)
    assert dtype == torch.float32
    expected = FORMULAS[config.stem]({k: _load(v) for k, v in llama_family.items()})
    if config.stem == "passthrough_frankenmerge":
        _assert_copy(out, expected)
    _assert_formula(out, expected, dtype)


def test_slerp_gradient_config_on_distant_models(tmp_path, llama_pair):
    """Two independent initializations: the tensors are far from colinear, so the spherical branch runs
    (the fine-tunes of llama_family are within the lerp threshold)."""
    family = {"A": llama_pair[0], "B": llama_pair[1]}
    config = next(c for c in CONFIGS if c.stem == "slerp_gradient")
    out, dtype = _run(config, family, tmp_path / "out", float32=True)
    sources = {k: _load(v) for k, v in family.items()}
    spherical = [n for n in sources["A"] if abs(float(torch.nn.functional.cosine_similarity(
        sources["A"][n].flatten(), sources["B"][n].flatten(), dim=0))) < 0.9995]
    assert len(spherical) > len(sources["A"]) // 2
    _assert_formula(out, _slerp(sources), dtype)


@pytest.mark.parametrize("stem", sorted(RANDOM))
def test_documented_config_seeded_masks(stem, tmp_path, llama_family):
    config = next(c for c in CONFIGS if c.stem == stem)
    out, _ = _run(config, llama_family, tmp_path / "a", float32=True)
    again, _ = _run(config, llama_family, tmp_path / "b", float32=True)
    assert all(torch.equal(out[n], again[n]) for n in out)
    _check_random(out, {k: _load(v) for k, v in llama_family.items()}, *RANDOM[stem])
    low, _ = _run(config, llama_family, tmp_path / "c")
    low_again, _ = _run(config, llama_family, tmp_path / "d")
    assert all(torch.equal(low[n], low_again[n]) for n in low)
