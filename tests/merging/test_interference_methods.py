"""Issue 24 (part A): data-free interference methods of 2024-2026. Each against a hand-worked example and an
independent float64 numpy implementation; streamed merges (`merging.merge` on tiny Llama and GPT-2, bf16 and
float32 outputs) bit-identical to the method applied to the whole tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from merging.methods.apply import full_params, merge_tensor
from merging.methods.catalog import get_method
from merging.modelwise.state_dicts import merge_state_dicts
from merging.pipeline import merge
from taxonomy import BasinError
from taxonomy import get as get_info


def run(method: str, tensors, base, seed: int = 0, name: str = "w", **params) -> torch.Tensor:
    """Merge one tensor through merge_state_dicts (the public path: parameter checks, seeding)."""
    base_sd = None if base is None else {name: base}
    return merge_state_dicts(method, [{name: t} for t in tensors], base_sd, params, seed=seed)[name]


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def family(shape, n=3, seed=0):
    """A base and n models whose task vectors are random (float32)."""
    base = rand(*shape, seed=seed)
    return base, [base + rand(*shape, seed=seed + 1 + i) for i in range(n)]


def f64(tensors):
    return [t.numpy().astype(np.float64) for t in tensors]


def np_polar(x):
    p, _, qt = np.linalg.svd(x, full_matrices=False)
    return p @ qt


# ---------------------------------------------------------------- Iso-C, Iso-CTS


def np_iso_c(taus):
    u, s, vt = np.linalg.svd(sum(taus), full_matrices=False)
    return s.mean() * u @ vt


def np_iso_cts(taus, fraction):
    total = sum(taus)
    r, t = min(total.shape), len(taus)
    k = int(r * fraction)
    s_task = min(round((r - k) / t), r // t)
    k = r - t * s_task
    u, s, vt = np.linalg.svd(total, full_matrices=False)
    us, ss, vs = [u[:, :k]], [s[:k]], [vt[:k]]
    for tau in taus:
        if s_task:
            ut, st, vtt = np.linalg.svd(tau - u[:, :k] @ u[:, :k].T @ tau, full_matrices=False)
            us.append(ut[:, :s_task])
            ss.append(st[:s_task])
            vs.append(vtt[:s_task])
    return np.concatenate(ss).mean() * np_polar(np.hstack(us)) @ np_polar(np.vstack(vs))


def test_iso_c_by_hand():
    tau1, tau2 = torch.diag(torch.tensor([3.0, 0.0])), torch.diag(torch.tensor([0.0, 1.0]))
    # sum = diag(3, 1): singular values 3, 1 -> mean 2: the isotropic merge is 2 I
    out = run("iso_c", [tau1, tau2], torch.zeros(2, 2))
    torch.testing.assert_close(out, 2 * torch.eye(2), atol=1e-6, rtol=0)
    bias = run("iso_c", [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0])], torch.zeros(2), **{"lambda": 0.5})
    torch.testing.assert_close(bias, torch.tensor([1.0, 0.5]))  # 1-D: lambda * mean task vector


def test_iso_cts_by_hand():
    e = torch.eye(4)
    tau1 = 4 * torch.outer(e[0], e[0]) + 1 * torch.outer(e[2], e[2])
    tau2 = 3 * torch.outer(e[1], e[1]) + 2 * torch.outer(e[3], e[3])
    # r = 4, fraction 0.5: common k = 2 (e0, e1 with 4, 3); each task adds s = 1 direction outside them
    # (e2 with 1, e3 with 2): all four orthonormal already, isotropic spectrum (4 + 3 + 1 + 2) / 4 = 2.5
    out = run("iso_cts", [tau1, tau2], torch.zeros(4, 4), common_space_fraction=0.5)
    torch.testing.assert_close(out, 2.5 * torch.eye(4), atol=1e-5, rtol=0)
    # fraction 1: no task-specific directions, Iso-CTS is Iso-C
    base, models = family((7, 5))
    torch.testing.assert_close(run("iso_cts", models, base, common_space_fraction=1.0), run("iso_c", models, base),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(9, 6), (5, 12)])
def test_iso_against_numpy(shape):
    base, models = family(shape, n=3, seed=10)
    taus = [t - b for t, b in zip(f64(models), f64([base] * 3))]
    b = f64([base])[0]
    out = run("iso_c", models, base, **{"lambda": 1.3})
    np.testing.assert_allclose(out.numpy(), b + 1.3 * np_iso_c(taus), rtol=1e-4, atol=1e-5)
    for fraction in (0.8, 0.5, 0.0):
        out = run("iso_cts", models, base, common_space_fraction=fraction, **{"lambda": 0.7})
        np.testing.assert_allclose(out.numpy(), b + 0.7 * np_iso_cts(taus, fraction), rtol=1e-4, atol=1e-5)


def test_iso_cts_sizes_fill_the_rank():
    from merging.methods.isotropic import iso_cts_sizes

    assert iso_cts_sizes(768, 8, 0.8) == (616, 19)  # FusionBench's sizes for a ViT-B matrix, 8 tasks
    for rank in range(1, 40):
        for tasks in (1, 2, 3, 8):
            for fraction in (0.0, 0.3, 0.8, 1.0):
                k, s = iso_cts_sizes(rank, tasks, fraction)
                assert k >= 0 and s >= 0 and k + tasks * s == rank


# ---------------------------------------------------------------- PCB, MagMax


def np_pcb(taus, ratio, clamp_ratio):
    rows = np.stack([t.reshape(-1) for t in taus])
    n, d = rows.shape

    def at(x, q):  # per row, the value at ascending position q
        return np.sort(x, axis=1)[:, q][:, None]

    def minmax(x):
        low, high = x.min(1, keepdims=True), x.max(1, keepdims=True)
        return np.where(high > low, (x - low) / np.where(high > low, high - low, 1), 0.0)

    mag = np.abs(rows)
    mag = np.clip(mag, at(mag, int(d * clamp_ratio)), at(mag, max(0, int(d * (1 - clamp_ratio) - 1))))
    score = np.exp(n * minmax(mag) ** 2) * np.tanh(rows * rows.sum(0))
    score = minmax(np.maximum(score, at(score, int(d * (1 - ratio)))))
    merged = (np.sign(rows) * mag * score).sum(0) / np.maximum(score.sum(0), 1e-12)
    return merged.reshape(taus[0].shape)


def test_pcb_by_hand():
    tau = torch.tensor([1.0, -2.0, 3.0, 0.5])
    # one task, no clamp: the score grows with |tau|; ratio 0.5 clamps it from below at its value of ascending
    # rank int(4 * 0.5) = 2 (the score of -2), and min-max makes that 0: only the 3 keeps a weight
    out = run("pcb", [tau], torch.zeros(4), pcb_ratio=0.5, clamp_ratio=0.0)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 3.0, 0.0]))
    # two tasks agreeing in sign: both kept with their scores as weights; a lone opposite sign scores below 0
    t1, t2 = torch.tensor([2.0, 1.0]), torch.tensor([2.0, -1.0])
    out = run("pcb", [t1, t2], torch.zeros(2), pcb_ratio=1.0, clamp_ratio=0.0)
    torch.testing.assert_close(out, torch.tensor([2.0, 0.0]))  # entry 1: weights 0 and 0 (minmax lows)


@pytest.mark.parametrize("shape", [(6, 9), (50,), (3, 4, 5)])
def test_pcb_against_numpy(shape):
    base, models = family(shape, n=3, seed=40)
    taus = [m - b for m, b in zip(f64(models), f64([base] * 3))]
    for ratio, clamp_ratio in ((0.1, 0.0001), (0.5, 0.05), (1.0, 0.0)):
        out = run("pcb", models, base, pcb_ratio=ratio, clamp_ratio=clamp_ratio, **{"lambda": 1.2})
        expected = f64([base])[0] + 1.2 * np_pcb(taus, ratio, clamp_ratio)
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_pcb_ranked_value_is_exact_on_both_paths():
    from merging.methods.competition import ranked_value

    g = torch.Generator().manual_seed(3)
    rows = torch.cat([torch.randn(2, 70_001, generator=g), torch.randint(-5, 5, (1, 70_001), generator=g).float()])
    rows[0, :500] = -0.0  # negative zeros (tanh of a tiny negative product) have the sign bit set
    for index in (0, 7, 35_000, 63_000, 70_000):  # positive and non-positive order statistics, heavy ties
        expected = torch.sort(rows, dim=1).values[:, index:index + 1]
        assert torch.equal(ranked_value(rows, index), expected)


def test_pcb_constant_task_vector_is_finite():
    out = run("pcb", [torch.ones(5), torch.full((5,), 2.0)], torch.zeros(5))
    assert torch.isfinite(out).all()


def test_magmax_by_hand():
    t1, t2 = torch.tensor([1.0, -3.0, 2.0]), torch.tensor([-2.0, 1.0, -2.0])
    # largest magnitudes: -2 (model 2), -3 (model 1), and the tie |2| = |-2| goes to the later model
    out = run("magmax", [t1, t2], torch.zeros(3))
    torch.testing.assert_close(out, 0.5 * torch.tensor([-2.0, -3.0, -2.0]))


def test_magmax_against_numpy_and_chunks():
    base, models = family((700, 800), n=4, seed=50)  # above CHUNK_ELEMENTS: streamed in chunks
    taus = np.stack(f64(models)) - f64([base])[0]
    pick = (np.abs(taus)[::-1]).argmax(0)  # the last model with the largest magnitude
    expected = f64([base])[0] + np.take_along_axis(taus[::-1], pick[None], 0)[0]
    out = run("magmax", models, base, **{"lambda": 1.0})
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=1e-6)
    whole = get_method("magmax").fn(models, base, {"lambda": 1.0}, torch.Generator())
    assert torch.equal(out, whole)


# ---------------------------------------------------------------- CART


def test_cart_by_hand():
    e = torch.eye(3)
    m1 = 4 * torch.outer(e[0], e[0]) + torch.outer(e[1], e[1])
    m2 = -4 * torch.outer(e[0], e[0]) + 3 * torch.outer(e[2], e[2])
    # mean = diag(0, 0.5, 1.5); centred: diag(4, 0.5, -1.5) and diag(-4, -0.5, 1.5); rank 1 keeps the 4s,
    # which cancel: CART is the mean
    out = run("cart", [m1, m2], None, rank_ratio=0.34)
    torch.testing.assert_close(out, torch.diag(torch.tensor([0.0, 0.5, 1.5])), atol=1e-6, rtol=0)
    m3 = torch.outer(e[0], e[0])  # three models: mean diag(1/3, 1/3, 1); the centred parts no longer cancel
    out = run("cart", [m1, m2, m3], None, rank_ratio=0.34, **{"lambda": 1.0})
    mean = (m1 + m2 + m3) / 3
    expected = mean + sum(torch.from_numpy(np_truncated((m - mean).numpy().astype(np.float64), 1)).float()
                          for m in (m1, m2, m3))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def np_truncated(x, k):
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vt[:k]


@pytest.mark.parametrize("shape", [(20, 14), (9, 30)])
def test_cart_against_numpy(shape):
    _, models = family(shape, n=4, seed=60)
    ms = f64(models)
    mean = sum(ms) / 4
    for ratio in (0.08, 0.3, 1.0):
        k = max(1, int(min(shape) * ratio))
        out = run("cart", models, None, rank_ratio=ratio, **{"lambda": 0.7})
        expected = mean + 0.7 * sum(np_truncated(m - mean, k) for m in ms)
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(run("cart", models, None, rank_ratio=1.0).numpy(), mean, atol=1e-5)  # full rank
    bias = run("cart", [torch.tensor([1.0, 3.0]), torch.tensor([3.0, 5.0])], None)
    torch.testing.assert_close(bias, torch.tensor([2.0, 4.0]))


# ---------------------------------------------------------------- consensus (TALL masks)


def np_tall(taus, tall_lambda):
    total = sum(taus)
    return total, [np.abs(t) > tall_lambda * np.abs(total - t) for t in taus]


def test_consensus_by_hand():
    t1, t2, t3 = torch.tensor([1.0, 0.0, 2.0, 0.1]), torch.tensor([1.0, 3.0, -2.0, 0.0]), torch.tensor([0, 0, 0, 0.1])
    # tau_MTL = [2, 3, 0, 0.2]; masks (0.6): m1 = [1,0,1,1], m2 = [1,1,1,0], m3 = [0,0,0,1]: votes [2,1,2,2]
    out = run("consensus_ta", [t1, t2, t3], torch.zeros(4))
    torch.testing.assert_close(out, torch.tensor([2.0, 0.0, 0.0, 0.2]))
    out = run("consensus_ta", [t1, t2, t3], torch.zeros(4), min_agreement=1)  # every entry some task uses
    torch.testing.assert_close(out, torch.tensor([2.0, 3.0, 0.0, 0.2]))


def test_consensus_against_numpy_and_chunks():
    base, models = family((600, 900), n=4, seed=70)  # above CHUNK_ELEMENTS: streamed in chunks
    taus = [m - f64([base])[0] for m in f64(models)]
    for tall_lambda, k in ((0.6, 2), (0.3, 3)):
        total, masks = np_tall(taus, tall_lambda)
        expected = f64([base])[0] + 0.8 * total * (np.sum(masks, 0) >= k)
        out = run("consensus_ta", models, base, tall_lambda=tall_lambda, min_agreement=k, **{"lambda": 0.8})
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- TALL masks and EMR: per-task outputs


def _write(folder, tensor):
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({"w": tensor}, str(folder / "model.safetensors"))
    return str(folder)


def _task_merge(tmp_path, method, base, taus, **params):
    refs = [_write(tmp_path / f"m{i}", base + tau) for i, tau in enumerate(taus)]
    recipe = {"merge_method": method, "base_model": _write(tmp_path / "base", base),
              "models": [{"model": r} for r in refs], "dtype": "float32", "parameters": params}
    merge(recipe, tmp_path / "out", progress=False)
    return tmp_path / "out", refs


def test_tall_masks_by_hand(tmp_path):
    from merging.output.task_files import task_tensors

    taus = [torch.tensor([1.0, 0.0, 2.0, 0.1]), torch.tensor([1.0, 3.0, -2.0, 0.0]), torch.tensor([0, 0, 0, 0.1])]
    base = torch.tensor([1.0, 1.0, 1.0, 1.0])
    out, refs = _task_merge(tmp_path, "tall_masks", base, taus, **{"lambda": 0.5})
    # merged: base + 0.5 tau_MTL = base + 0.5 [2, 3, 0, 0.2]; masks m1 = [1,0,1,1], m2 = [1,1,1,0], m3 = [0,0,0,1]
    torch.testing.assert_close(load_file(out / "model.safetensors")["w"], base + torch.tensor([1.0, 1.5, 0.0, 0.1]))
    for t, mask in enumerate(([1, 0, 1, 1], [1, 1, 1, 0], [0, 0, 0, 1])):
        task = dict(task_tensors(out, t))["w"]
        torch.testing.assert_close(task, base + torch.tensor(mask) * torch.tensor([2.0, 3.0, 0.0, 0.2]))
    torch.testing.assert_close(dict(task_tensors(out, refs[1]))["w"], dict(task_tensors(out, 1))["w"])  # by ref


def test_emr_by_hand(tmp_path):
    from merging.output.task_files import task_tensors

    taus = [torch.tensor([2.0, -1.0, 0.0, 3.0]), torch.tensor([-1.0, -2.0, 0.0, 1.0])]
    base = torch.zeros(4)
    out, _ = _task_merge(tmp_path, "emr", base, taus)
    # sum [1, -3, 0, 4]: signs [+, -, - (a zero sum), +]; masks M1 = [1,1,0,1], M2 = [0,1,0,1];
    # tau_uni = [2, -2, 0, 3]; rescalers (6/4) / (7/4) and (4/4) / (5/4)
    unified = torch.tensor([2.0, -2.0, 0.0, 3.0])
    torch.testing.assert_close(load_file(out / "model.safetensors")["w"], unified)
    torch.testing.assert_close(dict(task_tensors(out, 0))["w"], 6 / 7 * unified * torch.tensor([1.0, 1, 0, 1]))
    torch.testing.assert_close(dict(task_tensors(out, 1))["w"], 4 / 5 * unified * torch.tensor([0.0, 1, 0, 1]))


def np_emr(taus):
    sign = np.where(sum(taus) > 0, 1.0, -1.0)
    masks = [t * sign > 0 for t in taus]
    unified = sign * np.max([np.abs(t) * m for t, m in zip(taus, masks)], axis=0)
    return unified, masks


@pytest.mark.parametrize("method", ["tall_masks", "emr"])
def test_task_models_against_numpy_on_a_llama(tmp_path, family_dirs, method):
    from merging.output.task_files import task_tensors

    folders = family_dirs("llama", 4)
    recipe = {"merge_method": method, "base_model": str(folders[0]), "models": [{"model": str(f)} for f in folders[1:]],
              "dtype": "float32"}
    merge(recipe, tmp_path / "out", progress=False)
    base = {k: v.numpy().astype(np.float64) for k, v in load_file(folders[0] / "model.safetensors").items()}
    models = [{k: v.numpy().astype(np.float64) for k, v in load_file(f / "model.safetensors").items()}
              for f in folders[1:]]
    taus = {name: [m[name] - b for m in models] for name, b in base.items()}
    if method == "emr":
        elected = {name: np_emr(t) for name, t in taus.items()}
        num = [sum(np.abs(taus[n][t]).mean() for n in base) for t in range(3)]
        den = [sum(np.abs(elected[n][0] * elected[n][1][t]).mean() for n in base) for t in range(3)]
        scales, vectors, masks = [a / b for a, b in zip(num, den)], {n: e[0] for n, e in elected.items()}, \
            {n: e[1] for n, e in elected.items()}
    else:
        scales = [1.0] * 3
        vectors, masks = {n: sum(t) for n, t in taus.items()}, {n: np_tall(t, 0.6)[1] for n, t in taus.items()}
    written = load_file(tmp_path / "out" / "model.safetensors")
    for name, b in base.items():
        np.testing.assert_allclose(written[name].numpy(), b + vectors[name], rtol=1e-5, atol=1e-6)
    for t in range(3):
        for name, tensor in task_tensors(tmp_path / "out", t):
            np.testing.assert_allclose(tensor.numpy(), base[name] + scales[t] * masks[name][t] * vectors[name],
                                       rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["tall_masks", "emr"])
def test_one_task_is_rebuilt_exactly(tmp_path, method):
    from merging.output.task_files import task_tensors

    base, models = family((6, 5), n=1, seed=80)
    out, _ = _task_merge(tmp_path, method, base, [models[0] - base])
    assert torch.equal(dict(task_tensors(out, 0))["w"], base + (models[0] - base))


def test_task_outputs_bad_input(tmp_path):
    from merging.output.task_files import task_tensors

    out, _ = _task_merge(tmp_path, "emr", torch.zeros(3), [torch.ones(3), -torch.ones(3)])
    with pytest.raises(BasinError, match="not one of the 2 tasks"):
        next(task_tensors(out, 2))
    with pytest.raises(BasinError, match="not the output of a tall_masks or emr merge"):
        next(task_tensors(tmp_path / "m0", 0))


def test_task_outputs_under_an_outer_observer(tmp_path):
    from merging.engine import observing
    from merging.output.task_files import task_tensors

    seen = []
    with observing(lambda plan, k, tensors, base: seen.append(plan.tensors[k].name)):
        out, _ = _task_merge(tmp_path, "tall_masks", torch.zeros(3), [torch.ones(3), torch.tensor([1.0, -1, 0])])
    assert seen == ["w"]  # the outer observer (`basin merge --measure` statistics) still sees every tensor
    torch.testing.assert_close(dict(task_tensors(out, 1))["w"], torch.tensor([2.0, 0.0, 0.0]))


def test_cli_merge_writes_task_outputs_and_refuses_a_sweep(tmp_path, capsys):
    import yaml

    from evaluations.cli import main

    refs = [_write(tmp_path / f"m{i}", torch.full((4,), float(i))) for i in range(3)]
    recipe = {"merge_method": "emr", "base_model": refs[0], "models": [{"model": r} for r in refs[1:]]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(path), str(tmp_path / "out"), "--no-progress"]) == 0
    assert (tmp_path / "out" / "task_outputs" / "tasks.json").is_file()
    recipe = {"merge_method": "tall_masks", "base_model": refs[0], "models": [{"model": r} for r in refs[1:]],
              "parameters": {"tall_lambda": {"grid": [0.2, 0.4]}}}
    path.write_text(yaml.safe_dump(recipe))
    capsys.readouterr()
    assert main(["merge", str(path), str(tmp_path / "sweep"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot run as a sweep" in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------- WUDI


def np_wudi(taus, iterations, lr, betas=(0.9, 0.999), eps=1e-8):
    """The authors' loop in float64: explicit products (tau - tau_i) tau_i^T, Adam by its formulas."""
    tau = sum(taus)
    m, v = np.zeros_like(tau), np.zeros_like(tau)
    norms = [np.sum(t ** 2) for t in taus]
    for step in range(1, iterations + 1):
        grad = sum(2 * ((tau - t) @ t.T) @ t / n for t, n in zip(taus, norms))
        m = betas[0] * m + (1 - betas[0]) * grad
        v = betas[1] * v + (1 - betas[1]) * grad ** 2
        tau = tau - lr * (m / (1 - betas[0] ** step)) / (np.sqrt(v / (1 - betas[1] ** step)) + eps)
    return tau


def test_wudi_by_hand():
    e, f = torch.eye(4), torch.eye(3)
    tau1, tau2 = 3 * torch.outer(e[0], f[0]), 2 * torch.outer(e[1], f[1])
    # disjoint rows and columns: (tau - tau_1) tau_1^T = tau_2 tau_1^T = 0, no interference, the sum stays
    out = run("wudi", [tau1, tau2], torch.zeros(4, 3), iterations=10)
    torch.testing.assert_close(out, tau1 + tau2, atol=0, rtol=0)
    base, models = family((5, 4), n=1, seed=90)  # one task: the loss is 0 at its own task vector
    assert torch.equal(run("wudi", models, base, iterations=5), base + (models[0] - base))
    bias = run("wudi", [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0])], torch.zeros(2))
    torch.testing.assert_close(bias, torch.tensor([2.0, 1.0]))  # 1-D: the mean task vector


@pytest.mark.parametrize("shape", [(12, 7), (6, 15)])
def test_wudi_against_numpy_and_autograd(shape):
    base, models = family(shape, n=3, seed=91)
    taus = [m - b for m, b in zip(f64(models), f64([base] * 3))]
    out = run("wudi", models, base, iterations=25, lr=2e-2)
    expected = f64([base])[0] + np_wudi(taus, 25, 2e-2)
    assert np.abs(expected - (f64([base])[0] + sum(taus))).max() > 0.1  # the optimisation moved it
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=2e-4)
    # FusionBench's loop: autograd through the explicit products, torch.optim.Adam
    tvs = torch.stack([m - base for m in models])
    merged = torch.nn.Parameter(tvs.sum(0))
    opt = torch.optim.Adam([merged], lr=2e-2)
    norms = tvs.reshape(3, -1).norm(dim=1).square()
    for _ in range(25):
        loss = torch.sum(torch.matmul(merged.unsqueeze(0) - tvs, tvs.transpose(1, 2)).square() / norms[:, None, None])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.testing.assert_close(out, base + merged.detach(), atol=2e-4, rtol=0)


# ---------------------------------------------------------------- the streamed merge is the whole-tensor one

NEW_METHODS = {"iso_c": {"lambda": 0.9}, "iso_cts": {"common_space_fraction": 0.6}, "pcb": {"pcb_ratio": 0.2},
               "magmax": {}, "cart": {"rank_ratio": 0.3}, "consensus_ta": {"tall_lambda": 0.4},
               "tall_masks": {}, "emr": {}, "wudi": {"iterations": 3}}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("method", sorted(NEW_METHODS))
def test_streamed_merge_is_the_whole_tensor_method(tmp_path, family_dirs, arch, dtype, method):
    folders = family_dirs(arch, 4)
    info = get_info(method)
    models = folders[1:] if info.needs_base else folders
    recipe = {"merge_method": method, "models": [{"model": str(f)} for f in models], "dtype": dtype, "seed": 5,
              "parameters": NEW_METHODS[method]}
    if info.needs_base:
        recipe["base_model"] = str(folders[0])
    merge(recipe, tmp_path / "out", progress=False)
    written = load_file(tmp_path / "out" / "model.safetensors")
    inputs = [load_file(f / "model.safetensors") for f in models]
    base = load_file(folders[0] / "model.safetensors") if info.needs_base else None
    m = get_method(method)
    params = full_params(m, NEW_METHODS[method], len(models))
    for name, out in written.items():
        expected = merge_tensor(m, name, [sd[name] for sd in inputs], None if base is None else base[name], params,
                                5, getattr(torch, dtype))
        assert out.dtype == getattr(torch, dtype)
        assert torch.equal(out, expected), name


def test_new_methods_are_listed_with_their_needs(capsys):
    from evaluations.cli import main

    assert main(["methods"]) == 0
    table = capsys.readouterr().out
    for method in NEW_METHODS:
        line = next(row for row in table.splitlines() if row.startswith(method + " "))
        assert ("base" in line) == get_info(method).needs_base
        assert ("task-id" in line) == get_info(method).needs_task_identity


def test_bad_parameters_are_one_line_errors():
    base, models = family((4, 3))
    with pytest.raises(BasinError, match="common_space_fraction"):
        run("iso_cts", models, base, common_space_fraction=1.5)


# ---------------------------------------------------------------- svd: lowrank (CART, TSV)


def test_leading_triplets_lowrank_against_the_exact_truncation():
    """torch.svd_lowrank's rank-k cut against Eckart-Young (a float64 numpy SVD): on a decaying spectrum the same
    matrix to 1e-6; on a flat one (noise) within 5% of the best rank-k error; seeded: the same bits twice."""
    from merging.methods.subspace import leading_triplets

    g = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(300, 120, generator=g))
    v, _ = torch.linalg.qr(torch.randn(200, 120, generator=g))
    decaying = (u * 0.7 ** torch.arange(120.0)) @ v.T
    flat = torch.randn(300, 200, generator=g)
    for matrix, k in ((decaying, 12), (flat, 16)):
        exact = np_truncated(matrix.double().numpy(), k)
        a = leading_triplets(matrix, k, "lowrank", seed=5)
        b = leading_triplets(matrix, k, "lowrank", seed=5)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        approx = ((a[0] * a[1]) @ a[2]).double().numpy()
        best = np.linalg.norm(matrix.double().numpy() - exact)
        got = np.linalg.norm(matrix.double().numpy() - approx)
        if matrix is decaying:
            np.testing.assert_allclose(approx, exact, atol=1e-6)
        else:
            assert best <= got <= 1.05 * best, (got, best)
    ue, se, vhe = leading_triplets(flat, 16, "exact")
    np.testing.assert_allclose((ue * se).numpy() @ vhe.numpy(), np_truncated(flat.double().numpy(), 16), atol=1e-4)


@pytest.mark.parametrize("method, params", [("cart", {"rank_ratio": 0.1}), ("tsv", {"sv_reduction": 0.1})])
def test_lowrank_merges_are_seeded_and_close_to_exact(method, params):
    """`svd: lowrank` through the public path: per-tensor seeded (the same merge twice, bit for bit; another seed
    other bits), close to `svd: exact` on task vectors of decaying spectra, and refused with a one-line error for a
    value it does not know."""
    g = torch.Generator().manual_seed(11)
    base = torch.randn(240, 160, generator=g)
    models = []
    for _ in range(3):
        u, _ = torch.linalg.qr(torch.randn(240, 60, generator=g))
        v, _ = torch.linalg.qr(torch.randn(160, 60, generator=g))
        models.append(base + 0.1 * (u * 0.8 ** torch.arange(60.0)) @ v.T)
    b = None if method == "cart" else base
    exact = run(method, models, b, **params)
    low = run(method, models, b, svd="lowrank", **params)
    assert torch.equal(low, run(method, models, b, svd="lowrank", **params))
    assert not torch.equal(low, run(method, models, b, seed=1, svd="lowrank", **params))
    assert not torch.equal(low, exact)
    assert float((low - exact).norm() / (exact - base).norm()) < 1e-3
    with pytest.raises(BasinError, match="svd") as err:
        run(method, models, b, svd="fast", **params)
    assert "\n" not in str(err.value)
