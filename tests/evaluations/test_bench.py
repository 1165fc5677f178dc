"""basin bench: the harness on a tiny digits suite (2 tasks), checked against independent computations."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from evaluations.bench import MethodEntry, MethodGrid, Suite, run_benchmark
from evaluations.bench import harness as harness_module
from evaluations.bench.suites.digits_tasks import DigitsConfig, build_suite
from evaluations.digits import accuracy

TINY = DigitsConfig(width=16, pretrain_epochs=2, probe_epochs=1, finetune_epochs=2, merge_sample=64,
                    tasks=("rot90", "invert"))
GRID = MethodGrid((
    MethodEntry("avg", "linear"),
    MethodEntry("TA", "task_arithmetic", search={"lambda": [0.5, 1.0]}),
    MethodEntry("TIES", "ties", {"density": 0.5}),
))


def tiny_suite(cache_dir, grid: MethodGrid = GRID) -> Suite:
    return build_suite(cache_dir=cache_dir, config=TINY, grid=grid)


def shared_tiny_suite(tmp_path_factory) -> Suite:
    """The tiny suite, its models trained once per test session (the suite caches them by config)."""
    return tiny_suite(tmp_path_factory.getbasetemp() / "bench-digits-models")


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Suite:
    return shared_tiny_suite(tmp_path_factory)


def strip_seconds(result) -> list[dict]:
    return [{k: v for k, v in r.to_json().items() if k != "seconds"} for r in result.rows]


def test_reference_rows_match_direct_evaluation(suite):
    result = run_benchmark(suite, progress=False, geometry=False)
    pool, tasks = suite.models, suite.tasks
    for name in tasks.names:
        task = tasks[name]
        x, y = task.test
        pretrained = accuracy(nn.Sequential(pool.module(pool.base), task.head), x, y)
        individual = accuracy(nn.Sequential(pool.module(pool.models[name]), task.head), x, y)
        assert result.row("pretrained").scores[name] == pytest.approx(pretrained, abs=1e-12)
        assert result.row("individual fine-tunes").scores[name] == pytest.approx(individual, abs=1e-12)
        with torch.no_grad():
            probs = sum(torch.softmax(task.head(pool.module(s)(x)), -1) for s in pool.models.values())
        ensemble = float((probs.argmax(-1) == y).float().mean())
        assert result.row("output ensemble").scores[name] == pytest.approx(ensemble, abs=1e-12)
    avg = result.row("avg")
    assert avg.average == pytest.approx(sum(avg.scores.values()) / 2)
    ind = result.row("individual fine-tunes").scores
    assert avg.normalized == pytest.approx({t: avg.scores[t] / ind[t] for t in ind})
    # the simple average's body, computed here by hand
    states = list(pool.models.values())
    mean = {k: (states[0][k] + states[1][k]) / 2 for k in pool.base}
    dist = math.sqrt(sum(float(((mean[k] - pool.base[k]) ** 2).sum()) for k in mean))
    assert avg.distance_from_base == pytest.approx(dist, rel=1e-6)
    assert set(result.to_markdown().splitlines()[2].split(" | ")) >= {"avg", "norm. avg", "rot90", "invert"}
    assert result.to_csv().count("\n") == len(result.rows) + 1
    json.dumps(result.to_json())


def identity_merge(pool, tasks, params, seed):
    """A "merge" that returns one fine-tune unchanged."""
    return {k: v.clone() for k, v in pool.models[params["task"]].items()}


def test_normalized_score_is_one_for_the_fine_tune_itself(suite):
    grid = MethodGrid((MethodEntry("itself", identity_merge, {"task": "rot90"}),))
    s = Suite(suite.name, suite.models, suite.tasks, grid, suite.seed)
    row = run_benchmark(s, progress=False, geometry=False).row("itself")
    assert row.normalized["rot90"] == 1.0


def test_hyperparameter_selected_on_validation(suite):
    from merging.modelwise.state_dicts import merge_state_dicts

    pool, tasks = suite.models, suite.tasks
    val = {}
    for lam in (0.5, 1.0):
        merged = merge_state_dicts("task_arithmetic", list(pool.models.values()), base=pool.base,
                                   params={"lambda": lam})
        body = pool.module(merged)
        val[lam] = sum(accuracy(nn.Sequential(body, tasks[t].head), *tasks[t].val) for t in tasks.names) / 2
    best = max(val, key=lambda k: (val[k], -k))  # first best in grid order on ties
    row = run_benchmark(suite, methods=["TA"], progress=False, geometry=False).row("TA")
    assert row.params == {"lambda": best}
    assert [s["val"] for s in row.selection] == pytest.approx([val[0.5], val[1.0]])


def test_data_aware_merges_see_only_the_body(suite):
    """Fisher through the hidden head equals fisher_merge on plain Sequential(body, head) models, body part."""
    from evaluations.bench.grid import model_level
    from merging.modelwise.data_aware import fisher_merge

    pool, tasks = suite.models, suite.tasks
    full = [nn.Sequential(pool.module(pool.models[t]), tasks[t].head) for t in tasks.names]
    reference = fisher_merge(full, [tasks[t].train for t in tasks.names])
    merged = model_level("fisher", pool, tasks, {})
    for k in pool.base:
        torch.testing.assert_close(merged[k], reference["0." + k])


def test_geometry_against_explicit_path(suite):
    from torch.nn import functional as F

    from evaluations.bench.geometry import pair_path, pool_geometry

    pool, tasks = suite.models, suite.tasks
    a, b = tasks.names
    result = pair_path(pool, tasks, a, b)
    for alpha, loss in zip(result.alphas, result.loss):
        body = pool.module({k: (1 - alpha) * pool.models[a][k] + alpha * pool.models[b][k] for k in pool.base})
        with torch.no_grad():
            ref = sum(float(F.cross_entropy(tasks[t].head(body(tasks[t].test[0])), tasks[t].test[1])) for t in (a, b))
        assert loss == pytest.approx(ref / 2, rel=1e-5)
    geo = pool_geometry(pool, tasks)
    chord = [result.loss[i] - ((1 - t) * result.loss[0] + t * result.loss[-1]) for i, t in enumerate(result.alphas)]
    assert geo["barrier"][0][1] == pytest.approx(max(chord), abs=1e-9)
    ta = torch.cat([(pool.models[a][k].double() - pool.base[k].double()).reshape(-1) for k in pool.base])
    tb = torch.cat([(pool.models[b][k].double() - pool.base[k].double()).reshape(-1) for k in pool.base])
    assert geo["cosine"][0][1] == pytest.approx(float(ta @ tb / ta.norm() / tb.norm()), rel=1e-9)
    assert geo["distance_from_base"][1] == pytest.approx(float(tb.norm()), rel=1e-9)


CALLS: list[str] = []


def flaky_merge(pool, tasks, params, seed):
    CALLS.append(params["name"])
    if params.get("fail"):
        raise RuntimeError("interrupted")
    return identity_merge(pool, tasks, {"task": "invert"}, seed)


def test_cache_and_resume(suite, tmp_path, monkeypatch):
    computed: list[str] = []
    original = harness_module._compute

    def counting(s, cell):
        computed.append(cell.entry.label if cell.entry else cell.kind)
        return original(s, cell)

    monkeypatch.setattr(harness_module, "_compute", counting)
    first = MethodEntry("first", flaky_merge, {"name": "first"})
    broken = MethodGrid((first, MethodEntry("second", flaky_merge, {"name": "second", "fail": True})))
    with pytest.raises(RuntimeError, match="interrupted"):
        run_benchmark(Suite(suite.name, suite.models, suite.tasks, broken), cache_dir=tmp_path, progress=False)
    assert computed == ["pretrained", "individual", "ensemble", "first", "second"]
    assert len(list(tmp_path.glob("*.json"))) == 4  # the failed cell is not cached
    computed.clear()
    fixed = MethodGrid((first, MethodEntry("second", flaky_merge, {"name": "second"})))
    resumed = run_benchmark(Suite(suite.name, suite.models, suite.tasks, fixed), cache_dir=tmp_path, progress=False)
    assert computed == ["second", "geometry"]
    assert resumed.cached_cells == 4
    computed.clear()
    again = run_benchmark(Suite(suite.name, suite.models, suite.tasks, fixed), cache_dir=tmp_path, progress=False)
    assert computed == [] and again.cached_cells == 6
    fresh = run_benchmark(Suite(suite.name, suite.models, suite.tasks, fixed), progress=False)
    assert strip_seconds(again) == strip_seconds(fresh)
    assert again.geometry == fresh.geometry


def test_weight_matching_undoes_a_permuted_fine_tune(suite):
    """Permute one fine-tune's hidden units: averaging breaks, weight matching then averaging recovers it."""
    from evaluations.bench.grid import weight_matching
    from evaluations.bench.pools import ModelPool
    from merging.alignment import apply_permutation, infer_spec, random_permutation

    pool = suite.models
    a, b = suite.tasks.names
    spec = infer_spec(pool.build())
    permuted = apply_permutation(pool.models[b], spec, random_permutation(spec, seed=3))
    shuffled = ModelPool(pool.base, {a: pool.models[a], b: permuted}, pool.build)
    merged = weight_matching(shuffled, suite.tasks, {}, 0)
    for k in pool.base:
        torch.testing.assert_close(merged[k], (pool.models[a][k] + pool.models[b][k]) / 2)
    assert any(not torch.equal(permuted[k], pool.models[b][k]) for k in pool.base)


def test_lambda_sweeps_share_their_parts_and_keep_the_bits(suite, monkeypatch):
    """TSV-M, Iso-C, Iso-CTS, CART: a cell's candidates that differ only in lambda compute the SVD parts once
    (one `merge_tensor_parts` call per tensor, not one per lambda) and give `run_merge`'s bits at every lambda;
    other methods run candidate by candidate."""
    from evaluations.bench.grid import run_merge, run_merges
    from merging.modelwise import state_dicts

    pool, tasks = suite.models, suite.tasks
    calls = []
    real = state_dicts.merge_tensor_parts
    monkeypatch.setattr(state_dicts, "merge_tensor_parts", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    for method, fixed in (("tsv", {}), ("iso_c", {}), ("iso_cts", {}), ("cart", {"rank_ratio": 0.5}),
                          ("task_arithmetic", {})):
        calls.clear()
        candidates = [{**fixed, "lambda": lam} for lam in (0.3, 0.7, 1.5)]
        swept = list(run_merges(method, pool, tasks, candidates, seed=1))
        assert len(calls) == (0 if method == "task_arithmetic" else len(pool.base))
        for params, merged in zip(candidates, swept):
            direct = run_merge(method, pool, tasks, dict(params), seed=1)
            assert all(torch.equal(merged[k].view(torch.int32), direct[k].view(torch.int32)) for k in pool.base)
