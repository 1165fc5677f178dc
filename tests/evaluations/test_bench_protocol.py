"""The benchmark protocol: landscape columns per merge, seeds (mean and spread), which data each method read,
AdaMerging and RegMean++ in the bench, the minilm-tasks suite's data."""

from __future__ import annotations

import statistics

import pytest
import torch
from torch.nn import functional as F

from evaluations.bench import MethodEntry, MethodGrid, Suite, run_benchmark
from evaluations.bench.harness import BenchmarkResult, Row
from evaluations.bench.report import aggregate
from tests.evaluations.test_bench import shared_tiny_suite

GRID = MethodGrid((
    MethodEntry("TA", "task_arithmetic", search={"lambda": [0.5, 1.0]}),
    MethodEntry("RegMean++", "regmean_plusplus"),
    MethodEntry("Ada", "adamerging_task", {"steps": 3, "lr": 0.05}),
))


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Suite:
    s = shared_tiny_suite(tmp_path_factory)
    return Suite(s.name, s.models, s.tasks, GRID, s.seed, s.description, path_points=5)


@pytest.fixture(scope="module")
def result(suite):
    return run_benchmark(suite, progress=False, geometry=False)


def test_every_merge_reports_its_path_to_each_fine_tune(suite, result):
    """Loss along merged -> fine-tune t equals the loss of the explicitly interpolated body on task t."""
    from evaluations.bench.grid import run_merge

    pool, tasks = suite.models, suite.tasks
    row = result.row("TA")
    merged = run_merge("task_arithmetic", pool, tasks, dict(row.params), suite.seed)
    assert row.paths["alphas"] == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    for t in tasks.names:
        ref = []
        for alpha in row.paths["alphas"]:
            body = pool.module({k: (1 - alpha) * merged[k] + alpha * pool.models[t][k] for k in pool.base})
            with torch.no_grad():
                ref.append(float(F.cross_entropy(tasks[t].head(body(tasks[t].test[0])), tasks[t].test[1])))
        assert row.paths["loss"][t] == pytest.approx(ref, rel=1e-5)
        chord = max(v - ((1 - a) * ref[0] + a * ref[-1]) for a, v in zip(row.paths["alphas"], ref))
        assert row.paths["barrier"][t] == pytest.approx(chord, abs=1e-6)
        assert row.paths["accuracy"][t][-1] == pytest.approx(result.row("individual fine-tunes").scores[t])
    assert row.barrier == pytest.approx(sum(row.paths["barrier"].values()) / 2)
    assert result.row("pretrained").paths and not result.row("individual fine-tunes").paths
    md = result.to_markdown()
    assert "barrier→FT" in md and "### Merges' landscape" in md and "barrier→rot90" in md


def test_the_table_says_which_data_each_method_read(result):
    assert result.row("TA").data == "none; val picks lambda"
    assert result.row("RegMean++").data == "train inputs"
    assert result.row("Ada").data == "unlabeled test inputs"
    assert result.row("pretrained").data == "none"
    assert "| unlabeled test inputs |" in result.to_markdown()


def test_adamerging_in_the_bench_learns_on_each_tasks_unlabeled_test_inputs(suite, result):
    from evaluations.bench.pools import HeadedBody
    from merging.modelwise.adamerging import adamerging

    pool, tasks = suite.models, suite.tasks
    modules = [HeadedBody(pool.module(pool.models[t]), tasks[t].head) for t in tasks.names]
    direct = adamerging(HeadedBody(pool.module(pool.base), None), modules, [tasks[t].test[0] for t in tasks.names],
                        "task", steps=3, lr=0.05, seed=suite.seed)
    body = pool.module({k[len("body."):]: v for k, v in direct.state.items()})
    assert result.row("Ada").scores == pytest.approx(tasks.evaluate(body))


def test_regmean_plusplus_in_the_bench_sees_only_the_body(suite):
    from evaluations.bench.grid import model_level
    from merging.modelwise.regmean_plusplus import regmean_plusplus_merge

    pool, tasks = suite.models, suite.tasks
    bodies = [pool.module(pool.models[t]) for t in tasks.names]
    reference = regmean_plusplus_merge(bodies, [tasks[t].train for t in tasks.names])  # heads come after the body
    merged = model_level("regmean++", pool, tasks, {})
    for k in pool.base:
        torch.testing.assert_close(merged[k], reference[k])


def _result(seed: int, scores: dict[str, float], barrier: float) -> BenchmarkResult:
    ind = Row("individual fine-tunes", "reference", {"a": 0.8, "b": 0.5})
    row = Row("m", "merge", scores, {"lambda": 0.3 + 0.1 * seed}, distance_from_base=1.0 + seed,
              paths={"alphas": [0, 1], "loss": {"a": [1, 2], "b": [3, 4]}, "accuracy": {"a": [0, 1], "b": [0, 1]},
                     "barrier": {"a": barrier, "b": barrier}, "error_barrier": {"a": 0, "b": 0}})
    row.normalized = {t: scores[t] / ind.scores[t] for t in scores}
    return BenchmarkResult("s", ["a", "b"], [ind, row], {}, seed, "local", 1.0, 0, {}, [seed])


def test_seeds_aggregate_to_mean_and_sample_std_by_hand():
    runs = [_result(0, {"a": 0.6, "b": 0.4}, 0.1), _result(1, {"a": 0.7, "b": 0.2}, 0.3),
            _result(2, {"a": 0.8, "b": 0.3}, 0.2)]
    agg = aggregate(runs)
    row = agg.row("m")
    assert agg.seeds == [0, 1, 2]
    assert row.scores == pytest.approx({"a": 0.7, "b": 0.3})
    assert row.spread["average"] == pytest.approx(statistics.stdev([0.5, 0.45, 0.55]))
    norms = [(0.6 / 0.8 + 0.4 / 0.5) / 2, (0.7 / 0.8 + 0.2 / 0.5) / 2, (0.8 / 0.8 + 0.3 / 0.5) / 2]
    assert row.normalized_average == pytest.approx(sum(norms) / 3)
    assert row.spread["normalized_average"] == pytest.approx(statistics.stdev(norms))
    assert row.barrier == pytest.approx(0.2) and row.spread["barrier"] == pytest.approx(0.1)
    assert row.distance_from_base == pytest.approx(2.0)
    assert [p["params"]["lambda"] for p in row.per_seed] == pytest.approx([0.3, 0.4, 0.5])
    md = agg.to_markdown()
    assert "| 50.0 ± 5.0 |" in md and "seeds [0, 1, 2]" in md and "(per seed)" in md


def test_bench_seeds_of_a_suite_file_are_refused(tmp_path, capsys):
    from evaluations.cli import main

    suite = tmp_path / "s.yaml"
    suite.write_text("name: x\n")
    assert main(["bench", str(suite), "--seeds", "0", "1", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--seeds" in err


def test_minilm_tasks_data_is_offline_balanced_deterministic_and_labeled_by_its_rules():
    from evaluations.bench.suites import minilm_tasks as m

    config = m.MiniLMConfig()
    for task in m.EXAMPLES:
        splits = m.task_splits(task, config)
        assert splits == m.task_splits(task, config)
        texts = [t for rows in splits.values() for t, _ in rows]
        assert len(texts) == len(set(texts))  # no example in two splits
        labels = [y for _, y in splits["test"] + splits["val"] + splits["train"]]
        assert len(set(labels)) == (4 if task in ("topic", "pydoc_topic", "module") else 2)
        assert len(splits["test"]) == config.test and len(splits["val"]) == config.val
    topics = list(m.TOPIC_WORDS)
    for text, label in m.topic_examples():
        main = text.split("mainly about the ")[1].split()[0].rstrip(".")
        other = text.split("briefly about the ")[1].split()[0].rstrip(".")
        assert main in m.TOPIC_WORDS[topics[label]] and other not in m.TOPIC_WORDS[topics[label]]
        assert any(other in words for words in m.TOPIC_WORDS.values())
    for text, label in m.order_examples():
        words = text.rstrip(".").split()
        assert label == int(words[1] in m.PETS) and {words[1], words[-1]} & set(m.WILD)
    for text, label in m.negation_examples():
        good = any(f" {a}." in text for a in m.GOOD)
        negations = text.count(" not ") + text.startswith("I doubt")
        assert label == int(good != bool(negations % 2))
    counted = set()
    for text, label in m.counting_examples():
        owned = dict(part.split(" has ") for part in text.rstrip(".").split("; "))
        n = {who: owned[who].count("a ") for who in ("Anna", "Ben")}
        assert label == int(n["Anna"] > n["Ben"]) and n["Anna"] != n["Ben"]
        counted.add((n["Anna"], n["Ben"], text.startswith("Ben")))
    assert len(counted) == 12  # every unequal pair of 1-3 items, either owner first
    for text, label in m.list_length_examples():
        assert label == int(text.count(" a ") >= 4)


def test_plot_has_the_spread_and_the_paths(tmp_path):
    from evaluations.bench.plots import save_plots

    agg = aggregate([_result(0, {"a": 0.6, "b": 0.4}, 0.1), _result(1, {"a": 0.7, "b": 0.2}, 0.3)])
    (png,) = save_plots(agg, tmp_path, "b")
    assert png.name == "b.png" and png.stat().st_size > 1000


def test_minilm_body_is_the_packaged_model_with_frozen_word_embeddings_and_padding_only_costs():
    """The suite's body (word embeddings frozen, outside its state; ids padded to the longest sentence) gives the
    features of the packaged checkpoint loaded by transformers itself, mean-pooled, on ids padded to 24 tokens."""
    import transformers

    from evaluations.bench.suites import minilm_tasks as m

    body = m.make_body()
    body.load_state_dict(m.base_state())
    state = body.state_dict()
    assert not any("word_embeddings" in k for k in state)
    assert not any("word_embeddings" in n for n, _ in body.named_parameters())
    ref = transformers.BertModel.from_pretrained(str(m.minilm_folder()), add_pooling_layer=False).eval()
    assert sum(v.numel() for v in state.values()) + ref.embeddings.word_embeddings.weight.numel() == \
        sum(p.numel() for p in ref.parameters())
    texts = ["The dog chased the wolf.", "It is not true that the meal was not awful.", "We found a cup."]
    short = m.encode(texts, 24)
    assert short.shape[1] < 24 and short[:, -1].tolist().count(0) == 2  # padded to the longest only
    tok = transformers.AutoTokenizer.from_pretrained(str(m.minilm_folder()))
    enc = tok(texts, padding="max_length", max_length=24, return_tensors="pt")
    with torch.no_grad():
        hidden = ref(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        expected = (hidden * mask).sum(1) / mask.sum(1)
        assert torch.allclose(body.eval()(short), expected, atol=1e-5)


def test_an_interrupted_training_resumes_after_the_last_saved_fine_tune(tmp_path):
    """`prepare_cached` retrains only the tasks whose body file is missing from `KEY.tmp` (head written first)."""
    from dataclasses import dataclass

    from torch import nn

    from evaluations.bench.suites.cache import prepare_cached, save_fine_tune, trained

    @dataclass(frozen=True)
    class Config:
        def key(self) -> str:
            return "k"

    calls = []

    def train(config, folder):
        for task in ("a", "b"):
            if trained(folder, task):
                continue
            calls.append(task)
            if task == "b" and len(calls) == 2:
                raise KeyboardInterrupt  # the first run dies while training b
            save_fine_tune(folder, task, nn.Linear(2, 2), nn.Linear(2, 1))

    with pytest.raises(KeyboardInterrupt):
        prepare_cached(Config(), tmp_path, tmp_path, train)
    assert trained(tmp_path / "k.tmp", "a") and not trained(tmp_path / "k.tmp", "b")
    assert not list((tmp_path / "k.tmp").rglob("*.partial"))
    out = prepare_cached(Config(), tmp_path, tmp_path, train)
    assert calls == ["a", "b", "b"] and trained(out, "a") and trained(out, "b") and (out / "config.json").is_file()


def test_minilm_suite_smoke_runs_and_reruns_from_its_cache(tmp_path, monkeypatch):
    """A tiny minilm-tasks (2 tasks, 2 fine-tuning steps): every row scored, both lambdas of task arithmetic
    validated, the paths' end points the models' own values, and a rebuilt suite trains nothing (cached)."""
    import math

    from evaluations.bench import MethodEntry, MethodGrid, run_benchmark
    from evaluations.bench.geometry import finetune_values, point_values
    from evaluations.bench.suites import minilm_tasks as m

    config = m.MiniLMConfig(test=16, val=16, train=32, probe_steps=5, steps=2, batch_size=4, merge_sample=4,
                            tasks=("topic", "counting"))
    grid = MethodGrid((MethodEntry("TA", "task_arithmetic", search={"lambda": [0.5, 1.0]}),))
    suite = m.build_suite(tmp_path, config, grid=grid)
    result = run_benchmark(suite, progress=False, geometry=False)
    assert [r.label for r in result.rows] == ["pretrained", "individual fine-tunes", "output ensemble", "TA"]
    assert all(math.isfinite(v) for r in result.rows for v in r.scores.values())
    assert [s["params"]["lambda"] for s in result.row("TA").selection] == [0.5, 1.0]
    paths = result.row("pretrained").paths
    pool, tasks = suite.models, suite.tasks
    for t in config.tasks:
        assert paths["loss"][t][0] == point_values(pool.module(pool.base), tasks[t])[0]
        assert paths["loss"][t][-1] == finetune_values(pool, tasks, t, t)[0]
    monkeypatch.setattr(m, "_train", lambda *a: (_ for _ in ()).throw(AssertionError("retrained")))
    again = m.build_suite(tmp_path, config, grid=grid)
    assert again.fingerprint() == suite.fingerprint()
