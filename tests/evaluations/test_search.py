"""`basin search`: search spaces, a known optimum found locally and on Ray, resume, in-memory = scratch, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from evaluations.cli import main
from merging.recipe.search_space import SearchSpace
from taxonomy.errors import BasinError

pytest.importorskip("optuna", reason="the search extra is not installed")
WORDS = ["<unk>", "<s>", "</s>", "apple", "banana", "cherry", "date", "elder", "fig", "grape"]
W_STAR = 0.5  # linear, normalised: (w A + B) / (w + 1); the target is (A/2 + B) / 1.5, so the best w is 0.5


def _llama(seed: int):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                   pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Two tiny Llamas (with a word tokenizer), a target between them, a distance objective and a text file."""
    from tests.merging.test_vocab_llama import word_tokenizer

    root = tmp_path_factory.mktemp("search")
    a, b, target = _llama(0), _llama(1), _llama(0)
    sa, sb = a.state_dict(), b.state_dict()
    with torch.no_grad():
        for name, t in target.state_dict().items():
            t.copy_((W_STAR * sa[name] + sb[name]) / (W_STAR + 1))
    for name, m in (("a", a), ("b", b), ("target", target)):
        m.save_pretrained(root / name, safe_serialization=True)
        word_tokenizer(WORDS).save_pretrained(root / name)
    (root / "objective.py").write_text(
        "import torch\nfrom safetensors.torch import load_file\n"
        f"T = load_file({str(root / 'target' / 'model.safetensors')!r})\n"
        "def distance(model):\n"
        "    if isinstance(model, str):\n"
        "        from evaluations.models import load_model\n"
        "        model = load_model(model)\n"
        "    sd = model.state_dict()\n"
        "    return float(sum(((sd[n].double() - T[n].double()) ** 2).sum() for n in T))\n"
        "def norm(model):\n"
        "    return float(sum((t.double() ** 2).sum() for t in model.state_dict().values()))\n")
    (root / "calib.txt").write_text(" ".join(WORDS[3:] * 12) + "\n")
    return {"root": root, "a": root / "a", "b": root / "b", "objective": root / "objective.py",
            "data": root / "calib.txt"}


def _recipe(tmp_path: Path, models, weight: str = "{search: [0.0, 1.0]}", name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(f"merge_method: linear\nmodels:\n  - model: {models['a']}\n    parameters: {{weight: {weight}}}\n"
                    f"  - model: {models['b']}\n    parameters: {{weight: 1.0}}\n")
    return path


def _trials(out: Path) -> list[dict]:
    return json.loads((out / "trials.json").read_text())


# --- the search space (no I/O) --------------------------------------------------------------------------------
def test_space_dimensions_labels_defaults_and_filling():
    raw = {"merge_method": {"search": ["ties", "dare_ties"]}, "base_model": "c",
           "models": [{"model": "a", "parameters": {"weight": [{"search": [0.0, 1.0]}, 0.5],
                                                    "density": {"search": [0.1, 0.9], "step": 0.2}}}, "b"],
           "parameters": {"normalize": {"search": [True, False], "default": False}}}
    space = SearchSpace.from_dict(raw)
    dims = {d.label: d for d in space.dims}
    assert list(dims) == ["merge_method", "models[0].parameters.weight[0]", "models[0].parameters.density",
                          "parameters.normalize"]
    assert dims["models[0].parameters.density"].grid() == [0.1, 0.3, 0.5, 0.7, 0.9]
    assert dims["models[0].parameters.weight[0]"].grid() is None
    assert space.defaults() == {"merge_method": "ties", "models[0].parameters.weight[0]": 1.0,
                                "models[0].parameters.density": 0.9, "parameters.normalize": False}
    recipe = space.recipe({"merge_method": "dare_ties", "models[0].parameters.weight[0]": 0.25})
    assert recipe.merge_method == "dare_ties"
    assert recipe.models[0].parameters == {"weight": [0.25, 0.5], "density": 0.9}
    assert recipe.parameters == {"normalize": False}
    assert raw["models"][0]["parameters"]["weight"][0] == {"search": [0.0, 1.0]}  # the input is left alone


BAD_SPACES = [
    ({"parameters": {"normalize": {"search": [0, 1]}}}, "a range needs a numeric parameter; 'normalize' takes true"),
    ({"wm": {"search": [0.7, 0.7]}}, "models[0].parameters.weight.search: empty range [0.7, 0.7]"),
    ({"wm": {"search": []}}, "expected [low, high] or a non-empty list of choices"),
    ({"merge_method": {"search": ["linear", "tiez"]}}, "merge_method: search value 'tiez': unknown merge method"),
    ({"dtype": {"search": ["float16", "bfloat16"]}}, "dtype: only parameter settings and merge_method"),
    ({"wm": {"search": [0.0, 1.0], "log": True}}, "a log range needs low > 0"),
    ({"wm": {"search": [0.1, 1.0], "default": 3.0}}, "default: 3.0 is not in the search's domain"),
    ({"wm": {"search": [0.1, 1.0], "stride": 2}}, "unknown field 'stride' of a search"),
    ({"wm": [{"filter": {"search": ["mlp", "attn"]}, "value": 1.0}]}, "a search cannot stand for a filter"),
    ({"wm": 1.0}, "no {search: ...} setting to search"),
]


@pytest.mark.parametrize(("change", "message"), BAD_SPACES, ids=[m[:24] for _, m in BAD_SPACES])
def test_bad_search_spaces_are_one_line_errors(change, message):
    raw = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1.0}}, "b"]}
    if "wm" in change:
        raw["models"][0]["parameters"]["weight"] = change.pop("wm")
    raw.update(change)
    with pytest.raises(BasinError) as err:
        SearchSpace.from_dict(raw)
    assert message in str(err.value) and "\n" not in str(err.value)


# --- end to end ----------------------------------------------------------------------------------------------
def _search(tmp_path: Path, models, out: Path, *extra: str, recipe: Path | None = None) -> int:
    recipe = recipe or _recipe(tmp_path, models)
    return main(["search", str(recipe), str(out), "--objective", f"{models['objective']}:distance", *extra])


def test_finds_the_known_optimum_and_repeats_with_the_seed(tmp_path, models, capsys):
    out = tmp_path / "out"
    assert _search(tmp_path, models, out, "--trials", "16") == 0
    best = json.loads((out / "search.json").read_text())["best"][0]
    assert abs(best["params"]["models[0].parameters.weight"] - W_STAR) < 0.05
    rows = _trials(out)
    assert len(rows) == 16 and {r["mode"] for r in rows} == {"memory"}
    assert all(r["merge_seconds"] > 0 and r["wall_seconds"] >= r["merge_seconds"] for r in rows)
    # best.yaml is a plain recipe: `basin merge` runs it, and its output scores the best value
    assert main(["merge", str(out / "best.yaml"), str(tmp_path / "merged")]) == 0
    from evaluations.models import load_model
    from merging.objects import load_object

    distance = load_object(f"{models['objective']}:distance", files=True)
    assert distance(load_model(tmp_path / "merged")) == pytest.approx(best["values"][0], rel=1e-9, abs=1e-12)
    assert (out / "search.png").stat().st_size > 0
    header = (out / "trials.csv").read_text().splitlines()[0]
    assert header.startswith("number,state,models[0].parameters.weight,")
    again = tmp_path / "again"
    assert _search(tmp_path, models, again, "--trials", "6") == 0  # the same seed: the same first trials
    assert [(r["params"], r["values"]) for r in _trials(again)] == [(r["params"], r["values"]) for r in rows[:6]]


def test_grid_sampler_scratch_equals_memory(tmp_path, models):
    """A stepped range under the grid sampler hits w* exactly; trials merged on disk score bit-identically."""
    recipe = _recipe(tmp_path, models, "{search: [0.0, 1.0], step: 0.25}")
    memory, scratch = tmp_path / "memory", tmp_path / "scratch"
    assert _search(tmp_path, models, memory, "--sampler", "grid", "--trials", "50", recipe=recipe) == 0
    assert _search(tmp_path, models, scratch, "--sampler", "grid", "--trials", "5", "--in-memory", "never",
                   "--scratch", str(tmp_path), recipe=recipe) == 0
    a, b = _trials(memory), _trials(scratch)
    assert len(a) == 5 and {r["mode"] for r in b} == {"scratch"}
    assert sorted((r["params"]["models[0].parameters.weight"], r["values"]) for r in a) == \
        sorted((r["params"]["models[0].parameters.weight"], r["values"]) for r in b)
    best = json.loads((memory / "search.json").read_text())["best"][0]
    assert best["params"]["models[0].parameters.weight"] == W_STAR and best["values"][0] < 1e-20
    assert not list(tmp_path.glob("basin-trial-*"))  # scratch folders removed


def test_resume_keeps_the_first_trials(tmp_path, models, monkeypatch):
    """Interrupted (Ctrl-C) during trial 3, rerun: trials 0-2 kept, the stale one failed, the study reaches N."""
    import evaluations.search.trials as trials

    out = tmp_path / "out"
    calls = {"n": 0}
    real = trials.TrialRunner.run

    def interrupted(self, values, report=None):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(self, values, report)

    monkeypatch.setattr(trials.TrialRunner, "run", interrupted)
    assert _search(tmp_path, models, out, "--trials", "8") == 130
    first = _trials(out)
    assert [r["state"] for r in first] == ["complete"] * 3 + ["fail"]
    monkeypatch.setattr(trials.TrialRunner, "run", real)
    assert _search(tmp_path, models, out, "--trials", "6") == 0
    rows = _trials(out)
    assert sum(r["state"] == "complete" for r in rows) == 6
    assert rows[:3] == first[:3]
    other = _recipe(tmp_path, models, "{search: [0.0, 2.0]}", "other.yaml")
    assert _search(tmp_path, models, out, "--trials", "7", recipe=other) == 2  # another search: refused


def test_loss_objective_in_memory_equals_scratch_and_measure_loss(models, monkeypatch):
    """TIES at a few densities: the loss of the live model equals the loss of the merged folder, bit for bit (and
    neither opens the inputs again: they were opened when the runner was built), and the chunked loss equals
    `measure_loss` over all the data."""
    import merging.pipeline
    from evaluations.measure import measure_loss
    from evaluations.search.trials import DataSpec, ObjectiveSpec, Pruned, TrialRunner, TrialSetup, chunked_loss

    raw = {"merge_method": "ties", "base_model": str(models["a"]),
           "models": [{"model": str(models["b"]), "parameters": {"weight": 1.0, "density": {"search": [0.2, 1.0]}}}],
           "dtype": "bfloat16"}
    data = DataSpec(str(models["data"]), seq_len=8, batch_size=2)
    setups = [TrialSetup(raw, "recipe", (ObjectiveSpec("loss"),), data, mode) for mode in ("always", "never")]
    memory, scratch = TrialRunner(setups[0]), TrialRunner(setups[1])

    def refuse(*args, **kwargs):
        raise AssertionError("the inputs were opened again for a trial")

    monkeypatch.setattr(merging.pipeline, "open_inputs", refuse)
    for density in (0.2, 0.6):
        values = {"models[0].parameters.density": density}
        m, s = memory.run(values), scratch.run(values)
        assert (m["mode"], s["mode"]) == ("memory", "scratch")
        assert m["values"] == s["values"]
        whole = measure_loss(memory.model, memory.data, memory.objective).loss
        assert m["values"][0] == pytest.approx(whole, rel=1e-12)
    assert len(memory.data) >= 4 and chunked_loss(memory.model, memory.data, memory.objective) == m["values"][0]
    seen = []
    with pytest.raises(Pruned):  # a pruner that stops at once: one chunk measured, its loss reported
        chunked_loss(memory.model, memory.data, memory.objective, lambda step, value: seen.append((step, value)) or 1)
    first = memory.data.batches[:round(len(memory.data) / 4)]  # the first of 4 chunks
    assert seen == [(0, pytest.approx(measure_loss(memory.model, first, memory.objective).loss, rel=1e-12))]


def test_two_objectives_give_a_pareto_front_and_write_best(tmp_path, models, capsys):
    out, merged = tmp_path / "out", tmp_path / "merged"
    recipe = _recipe(tmp_path, models, "{search: [0.0, 1.0], step: 0.5}")
    code = main(["search", str(recipe), str(out), "--objective", f"{models['objective']}:distance",
                 "--objective", f"{models['objective']}:norm", "--direction", "minimize", "--direction", "maximize",
                 "--sampler", "grid", "--write-best", str(merged)])
    assert code == 0, capsys.readouterr().err
    info = json.loads((out / "search.json").read_text())
    assert info["directions"] == ["minimize", "maximize"] and info["trials"]["complete"] == 3
    front = [b["params"]["models[0].parameters.weight"] for b in info["best"]]
    assert front[0] == W_STAR  # the front sorted by the first objective
    assert "weight: 0.5" in (out / "best.yaml").read_text() and (merged / "config.json").is_file()


BAD_CLI = [
    (["--executor", "ray", "--address", "127.0.0.1:9"], "--address 127.0.0.1:9: cannot reach a Ray cluster"),
    (["--storage", "sqlite:////nonexistent/dir/x.db"], "--storage sqlite:////nonexistent/dir/x.db: cannot open"),
    (["--storage", "search.db"], "expected a database URL"),
    (["--sampler", "grid"], "--sampler grid: models[0].parameters.weight is a continuous range"),
    (["--sampler", "annealing"], "unknown sampler 'annealing'"),
    (["--trials", "0"], "--trials: expected a positive integer"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_CLI, ids=[m[:20] for _, m in BAD_CLI])
def test_bad_options_one_line_exit_2_nothing_written(tmp_path, models, capsys, extra, message):
    out = tmp_path / "out"
    assert _search(tmp_path, models, out, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not out.exists()


def test_bad_recipe_and_data_one_line_exit_2_nothing_written(tmp_path, models, capsys):
    out = tmp_path / "out"
    bad = _recipe(tmp_path, models, "{search: [1.0, 0.0]}")
    assert _search(tmp_path, models, out, recipe=bad) == 2
    assert "empty range [1.0, 0.0]" in capsys.readouterr().err
    recipe = _recipe(tmp_path, models)
    assert main(["search", str(recipe), str(out), "--data", str(tmp_path / "nope.txt")]) == 2
    assert "nope.txt: no such file" in capsys.readouterr().err
    assert not out.exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("x")
    assert _search(tmp_path, models, tmp_path / "taken") == 2
    assert "is not a basin search folder" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "taken").iterdir()) == ["keep.txt"]


@pytest.mark.slow
def test_ray_matches_local_trial_by_trial(tmp_path, models):
    """Two Ray workers on a local instance: the grid's trials score exactly as locally, and w* is found."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    recipe = _recipe(tmp_path, models, "{search: [0.0, 1.0], step: 0.25}")
    local, remote = tmp_path / "local", tmp_path / "ray"
    assert _search(tmp_path, models, local, "--sampler", "grid", recipe=recipe) == 0
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert _search(tmp_path, models, remote, "--sampler", "grid", "--executor", "ray", "--workers", "2",
                       recipe=recipe) == 0
    finally:
        ray.shutdown()
    a, b = _trials(local), _trials(remote)
    assert len(b) == 5 and {r["worker"] for r in b} <= {0, 1}
    key = "models[0].parameters.weight"
    assert sorted((r["params"][key], r["values"]) for r in a) == sorted((r["params"][key], r["values"]) for r in b)
    assert json.loads((remote / "search.json").read_text())["best"][0]["params"][key] == W_STAR


def test_cmaes_sampler_searches_two_weights(tmp_path, models):
    """mergekit-evolve's sampler: CMA-ES over both weights (two dimensions, so Optuna does not fall back to its
    independent sampler); the best ratio w_a / w_b approaches the known optimum W_STAR."""
    pytest.importorskip("cmaes", reason="the search extra's cmaes is not installed")
    path = tmp_path / "two.yaml"
    path.write_text(f"merge_method: linear\nmodels:\n  - model: {models['a']}\n"
                    "    parameters: {weight: {search: [0.05, 1.0]}}\n"
                    f"  - model: {models['b']}\n    parameters: {{weight: {{search: [0.05, 1.0]}}}}\n")
    out = tmp_path / "cma"
    assert main(["search", str(path), str(out), "--objective", f"{models['objective']}:distance",
                 "--sampler", "cmaes", "--trials", "24", "--seed", "0"]) == 0
    rows = [r for r in _trials(out) if r["state"] == "complete"]
    assert len(rows) == 24
    best = json.loads((out / "search.json").read_text())["best"][0]["params"]
    ratio = best["models[0].parameters.weight"] / best["models[1].parameters.weight"]
    assert abs(ratio - W_STAR) < 0.15
    first = min(r["values"][0] for r in rows[:6])
    assert min(r["values"][0] for r in rows) <= first


@pytest.mark.slow
def test_ray_loss_objective_matches_local_and_prunes_on_ray(tmp_path, models):
    """The loss objective on two Ray workers, against the local runner for the same trial parameters: without
    pruning the losses are equal; with a pruner that stops every trial, each is pruned after its first chunk with the
    local first partial loss; with one that never does, every partial loss reaches the trial (its intermediate
    values) and the final losses are equal."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    import optuna

    from evaluations.search.executors import RayTrials
    from evaluations.search.study import enqueue_grid, suggest
    from evaluations.search.trials import DataSpec, ObjectiveSpec, TrialRunner, TrialSetup

    space = SearchSpace.from_yaml(_recipe(tmp_path, models, "{search: [0.0, 1.0], step: 0.25}"))
    setup = TrialSetup(space.raw, space.where, (ObjectiveSpec("loss"),), DataSpec(str(models["data"]), 8, None, 2))
    runner = TrialRunner(setup)

    def partials(values):
        seen: list = []
        result = runner.run(values, lambda step, value: seen.append((step, value)) or False)
        return dict(seen), result["values"][0]

    class Always(optuna.pruners.BasePruner):
        def prune(self, study, trial) -> bool:
            return True

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    executor = RayTrials(setup, workers=2)
    try:
        executor.start()
        runs = ((optuna.pruners.NopPruner(), False, "COMPLETE"), (Always(), True, "PRUNED"),
                (optuna.pruners.NopPruner(), True, "COMPLETE"))
        for pruner, prune, state in runs:
            study = optuna.create_study(sampler=optuna.samplers.RandomSampler(0), pruner=pruner)
            enqueue_grid(study, space.dims)
            executor.run(study, space.dims, 5, lambda trial, result: None, prune=prune)
            assert [t.state.name for t in study.trials] == [state] * 5
            assert sorted(t.params["models[0].parameters.weight"] for t in study.trials) == [0, 0.25, 0.5, 0.75, 1]
            for t in study.trials:
                chunks, loss = partials(suggest(t, space.dims))
                if state == "PRUNED":
                    assert t.intermediate_values == {0: chunks[0]}
                else:
                    assert t.values == [loss] and t.intermediate_values == (chunks if prune else {})
                    assert len(chunks) == 3
    finally:
        executor.stop()
        ray.shutdown()


def test_sqlite_storage_is_in_wal_mode_with_normal_sync(tmp_path):
    """open_storage's SQLite settings (the per-trial overhead fix): the file's journal is a write-ahead log, and the
    storage's connections sync at NORMAL (1), not FULL (2)."""
    import sqlite3

    from evaluations.search.study import open_storage

    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    with storage.engine.connect() as con:
        assert con.exec_driver_sql("PRAGMA synchronous").scalar() == 1
    storage.engine.dispose()
    raw = sqlite3.connect(tmp_path / "study.db")
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    raw.close()
