"""`basin search --suite`: a benchmark suite's average normalized accuracy as the objective, checked against
`basin bench` for the same merges (validation and test splits), in memory and on disk, and its bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluations.cli import main
from tests.evaluations.test_bench_hf_suite import _config, _fine_tune, _save, fruit_rows, sentiment_rows

pytest.importorskip("optuna", reason="the search extra is not installed")
LAMBDA = "parameters.lambda"
SUITE = """name: tiny-search
base: ./base
tasks:
  - name: sent
    model: ./ft-sent
    data: {{validation: sent_val.jsonl, test: {sent_test}}}
  - name: fruit
    model: ./ft-fruit
    data: {{validation: fruit_val.jsonl, test: {fruit_test}}}
methods: {methods}
"""


def _suite_file(root: Path, name: str, methods: str = "[task_arithmetic]", test: str = "test") -> Path:
    path = root / name
    path.write_text(SUITE.format(sent_test=f"sent_{test}.jsonl", fruit_test=f"fruit_{test}.jsonl", methods=methods))
    return path


@pytest.fixture(scope="module")
def pool(tmp_path_factory, minilm_dir) -> Path:
    """A base and two fine-tunes of its body (sequence classifiers: the same tensor names, as basin merge needs),
    validation and test files, suite.yaml and a search recipe naming the suite's models."""
    import torch
    import transformers

    root = tmp_path_factory.mktemp("search_suite")
    torch.manual_seed(0)
    base = transformers.BertModel(_config()).eval()
    headed = transformers.BertForSequenceClassification(_config()).eval()
    headed.bert.load_state_dict(base.state_dict())
    _save(headed, root / "base", minilm_dir)
    _save(base, root / "headless", minilm_dir)
    _save(_fine_tune(base, sentiment_rows(), minilm_dir, 1), root / "ft-sent", minilm_dir)
    _save(_fine_tune(base, fruit_rows(), minilm_dir, 2), root / "ft-fruit", minilm_dir)
    for task, rows in (("sent", sentiment_rows()), ("fruit", fruit_rows())):
        for split, part in (("val", rows[::2]), ("test", rows[1::2])):
            (root / f"{task}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    _suite_file(root, "suite.yaml")
    (root / "search.yaml").write_text(
        "merge_method: task_arithmetic\nbase_model: suite:base\nmodels:\n  - model: suite:sent\n"
        "  - model: suite:fruit\nparameters:\n  lambda: {search: [0.2, 1.0], step: 0.4}\n")
    return root


def _bench(root: Path, lam: float, split: str) -> float:
    """`basin bench`'s normalized average for task arithmetic at `lam`, on the suite's `split` (val: the suite file
    rewritten with the validation files as its test split)."""
    from evaluations.bench import load_suite, run_benchmark

    methods = f"[{{label: TA, method: task_arithmetic, params: {{lambda: {lam}}}}}]"
    path = _suite_file(root, f"bench_{split}.yaml", methods, "val" if split == "val" else "test")
    result = run_benchmark(load_suite(str(path)), geometry=False, progress=False)
    return result.row("TA").normalized_average


def test_suite_objective_equals_bench_on_validation_and_test(pool, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["search", str(pool / "search.yaml"), str(out), "--suite", str(pool / "suite.yaml"),
                 "--sampler", "grid"])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    info = json.loads((out / "search.json").read_text())
    assert info["objectives"] == ["suite"] and info["directions"] == ["maximize"]
    rows = json.loads((out / "trials.json").read_text())
    assert len(rows) == 3 and {r["mode"] for r in rows} == {"memory"}
    for r in rows:  # every trial's objective is the bench's normalized accuracy on the validation split
        assert r["values"][0] == pytest.approx(_bench(pool, r["params"][LAMBDA], "val"), abs=1e-12)
    best = max(rows, key=lambda r: r["values"][0])
    suite = info["suite"]
    assert suite["trial"] == best["number"]
    assert suite["val"]["normalized_average"] == pytest.approx(best["values"][0], abs=1e-12)
    assert suite["test"]["normalized_average"] == pytest.approx(_bench(pool, best["params"][LAMBDA], "test"),
                                                                abs=1e-12)
    assert f"{suite['test']['normalized_average']:.4f}" in printed
    text = (out / "best.yaml").read_text()
    assert "suite:" not in text and str(pool / "ft-sent") in text  # a plain recipe: `basin merge` runs it
    assert main(["merge", str(out / "best.yaml"), str(tmp_path / "merged")]) == 0


def test_suite_trials_on_disk_equal_in_memory_and_reuse_the_inputs(pool, monkeypatch):
    """The same trial merged into the live body and merged into a scratch folder scores the same; neither opens
    the inputs again (they are opened once, when the worker is built)."""
    import merging.pipeline
    from evaluations.search.driver import SearchOptions, _space
    from evaluations.search.trials import ObjectiveSpec, TrialRunner, TrialSetup

    opts = SearchOptions(pool / "search.yaml", pool / "unused", suite=str(pool / "suite.yaml"),
                         objectives=(ObjectiveSpec("suite", "maximize"),))
    space = _space(opts)
    runners = [TrialRunner(TrialSetup(space.raw, space.where, opts.objectives, in_memory=mode, suite=opts.suite))
               for mode in ("always", "never")]

    def refuse(*args, **kwargs):
        raise AssertionError("the inputs were opened again for a trial")

    monkeypatch.setattr(merging.pipeline, "open_inputs", refuse)
    for lam in (0.3, 0.9):
        memory, disk = (r.run({LAMBDA: lam}) for r in runners)
        assert (memory["mode"], disk["mode"]) == ("memory", "scratch")
        assert memory["values"] == disk["values"]


BAD = [
    (["--objective", "suite"], "--objective suite needs --suite FILE"),
    (["--suite", "SUITE", "--objective", "loss"], "--suite FILE: list 'suite' among the objectives"),
    (["--suite", "nope.yaml"], "nope.yaml: no such suite file"),
    (["--suite", "suite.py"], "expected a YAML suite file"),
]


@pytest.mark.parametrize(("extra", "message"), BAD, ids=[m[:24] for _, m in BAD])
def test_bad_suite_options_one_line_exit_2_nothing_written(pool, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    extra = [str(pool / "suite.yaml") if e == "SUITE" else e for e in extra]
    assert main(["search", str(pool / "search.yaml"), str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not out.exists()


def test_headless_base_is_a_one_line_error_with_the_fix(pool, tmp_path, capsys):
    """A suite whose base is a BertModel (the bench accepts it) cannot be merged by basin merge with its classifier
    fine-tunes: refused before anything is written, saying what to do."""
    suite = pool / "headless.yaml"
    suite.write_text((pool / "suite.yaml").read_text().replace("base: ./base", "base: ./headless"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text((pool / "search.yaml").read_text() + "allow_mixed_architectures: true\n")
    assert main(["search", str(recipe), str(tmp_path / "out"), "--suite", str(suite)]) == 2
    err = capsys.readouterr().err.strip()
    assert "tensor names differ" in err and "save the base with the fine-tunes' class" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_unknown_suite_model_is_a_one_line_error(pool, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text((pool / "search.yaml").read_text().replace("suite:fruit", "suite:fruits"))
    assert main(["search", str(recipe), str(tmp_path / "out"), "--suite", str(pool / "suite.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert "'suite:fruits': the suite has no model 'fruits'" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_safetensors_suite_objective_equals_bench(tmp_path, capsys):
    """A suite of safetensors bodies (no Hugging Face checkpoints): each task's labels are its fine-tune's own
    predictions (the fine-tune scores 1), and every grid trial of a linear merge scores the bench's normalized
    accuracy on the validation split; the best on test likewise."""
    import torch
    import yaml
    from safetensors.torch import save_file

    from evaluations.bench import load_suite, run_benchmark
    from tests.evaluations.test_suite_yaml_errors import BODY, body16

    torch.manual_seed(0)
    base = body16().state_dict()
    data: dict[str, dict[str, torch.Tensor]] = {}
    for task, seed in (("a", 1), ("b", 2)):
        g = torch.Generator().manual_seed(seed)
        state = {k: (v + 0.5 * torch.randn(v.shape, generator=g)).contiguous() for k, v in base.items()}
        save_file(state, str(tmp_path / f"{task}.safetensors"))
        body = body16()
        body.load_state_dict(state)
        x = torch.randn(96, 64, generator=g)
        with torch.no_grad():
            y = body(x).argmax(-1)
        data[task] = {"x_val": x[:48], "y_val": y[:48], "x_test": x[48:], "y_test": y[48:]}
        save_file(data[task], str(tmp_path / f"{task}_data.safetensors"))
        save_file({"x_val": x[:48], "y_val": y[:48], "x_test": x[:48].clone(), "y_test": y[:48].clone()},
                  str(tmp_path / f"{task}_val.safetensors"))
    save_file({k: v.contiguous() for k, v in base.items()}, str(tmp_path / "base.safetensors"))

    def suite(name: str, split: str, methods: list) -> Path:
        doc = {"name": "st", "body": BODY, "base": "base.safetensors",
               "models": {"a": "a.safetensors", "b": "b.safetensors"},
               "tasks": {t: {"data": f"{t}_{split}.safetensors"} for t in ("a", "b")}, "methods": methods}
        (tmp_path / name).write_text(yaml.safe_dump(doc))
        return tmp_path / name

    path = suite("suite.yaml", "data", [{"method": "linear"}])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("merge_method: linear\nmodels:\n  - model: suite:a\n"
                      "    parameters: {weight: {search: [0.0, 1.0], step: 0.5}}\n"
                      "  - model: suite:b\n    parameters: {weight: 1.0}\n")
    out = tmp_path / "out"
    assert main(["search", str(recipe), str(out), "--suite", str(path), "--sampler", "grid"]) == 0, \
        capsys.readouterr().err

    def bench(w: float, split: str) -> float:
        methods = [{"label": "L", "method": "linear", "params": {"weight": [w, 1.0]}}]
        return run_benchmark(load_suite(str(suite(f"b_{split}.yaml", split, methods))), geometry=False,
                             progress=False).row("L").normalized_average

    rows = json.loads((out / "trials.json").read_text())
    values = {r["params"]["models[0].parameters.weight"]: r["values"][0] for r in rows}
    assert sorted(values) == [0.0, 0.5, 1.0] and len(set(values.values())) > 1
    for w, v in values.items():
        assert v == pytest.approx(bench(w, "val"), abs=1e-12)
    info = json.loads((out / "search.json").read_text())["suite"]
    best = max(values, key=values.get)
    assert info["test"]["normalized_average"] == pytest.approx(bench(best, "data"), abs=1e-12)
