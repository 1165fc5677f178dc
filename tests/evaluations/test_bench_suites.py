"""User suites (YAML, Python) and the `basin bench` command line."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import save_file

from evaluations.bench import load_suite, run_benchmark
from evaluations.bench.suites.digits_tasks import make_body
from evaluations.cli import main
from taxonomy.errors import BasinError
from tests.evaluations.test_bench import shared_tiny_suite, strip_seconds

YAML = """
name: tiny-yaml
seed: 0
body: tests.evaluations.test_bench_suites:make_body16
base: base.safetensors
models: {rot90: rot90.safetensors, invert: invert.safetensors}
tasks:
  rot90: {data: rot90_data.safetensors, head: rot90_head.safetensors}
  invert: {data: invert_data.safetensors, head: invert_head.safetensors}
methods:
  - {label: avg, method: linear}
  - {label: TA, method: task_arithmetic, search: {lambda: [0.5, 1.0]}}
"""


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The tiny suite written out as a YAML suite; returns (python suite, yaml path)."""
    root = tmp_path_factory.mktemp("yaml")
    suite = shared_tiny_suite(tmp_path_factory)
    save_file(suite.models.base, str(root / "base.safetensors"))
    for task in suite.tasks.tasks:
        save_file(suite.models.models[task.name], str(root / f"{task.name}.safetensors"))
        save_file({k: v.contiguous() for k, v in task.head.state_dict().items()},
                  str(root / f"{task.name}_head.safetensors"))
        data = {f"{a}_{split}": t.contiguous() for split in ("test", "val", "train")
                for a, t in zip("xy", task.data(split))}
        save_file(data, str(root / f"{task.name}_data.safetensors"))
    (root / "suite.yaml").write_text(YAML)
    return suite, root / "suite.yaml"


def make_body16():
    return make_body(16)


def test_yaml_suite_matches_python_suite(written):
    suite, path = written
    from_yaml = load_suite(str(path))
    assert from_yaml.name == "tiny-yaml" and from_yaml.tasks.names == ["rot90", "invert"]
    a = run_benchmark(from_yaml, methods=["avg", "TA"], progress=False, geometry=False)
    b = run_benchmark(suite, methods=["avg", "TA"], progress=False, geometry=False)
    assert strip_seconds(a) == strip_seconds(b)


def test_python_suite_file(written, tmp_path):
    _, path = written
    py = tmp_path / "my_suite.py"
    py.write_text(f"from evaluations.bench import load_suite\n\ndef suite():\n    return load_suite({str(path)!r})\n")
    assert load_suite(str(py)).name == "tiny-yaml"


def test_bad_suites_name_the_problem(tmp_path, written):
    with pytest.raises(BasinError, match="not a built-in suite"):
        load_suite("no-such-suite")
    bad = tmp_path / "bad.yaml"
    bad.write_text(written[1].read_text().replace("body:", "bodyx:"))
    with pytest.raises(BasinError, match="missing field 'body'"):
        load_suite(str(bad))
    with pytest.raises(BasinError, match="unknown"):
        run_benchmark(load_suite(str(written[1])), methods=["nope"], progress=False)


def test_cli_writes_table_json_csv(written, tmp_path, capsys):
    _, path = written
    out = tmp_path / "out"
    assert main(["bench", str(path), "--methods", "avg", "--out", str(out), "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert "| avg |" in printed and "| individual fine-tunes |" in printed
    data = json.loads((out / "bench.json").read_text())
    assert [r["label"] for r in data["rows"]] == ["pretrained", "individual fine-tunes", "output ensemble", "avg"]
    assert (out / "bench.csv").read_text().startswith("label,kind,rot90,invert,average")
    assert len(list((out / "cells").glob("*.json"))) == 5
    assert main(["bench", str(tmp_path / "missing.yaml"), "--out", str(out)]) == 2
