"""Malformed YAML suites (`basin bench FILE.yaml`): every bad field is a one-line error naming it (issue 18)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from evaluations.bench import load_suite
from evaluations.bench.suites.digits_tasks import make_body
from evaluations.cli import main
from taxonomy.errors import BasinError

BODY = "tests.evaluations.test_suite_yaml_errors:body16"
GOOD = {
    "name": "tiny", "seed": 0, "body": BODY, "base": "base.safetensors",
    "models": {"a": "a.safetensors", "b": "b.safetensors"},
    "tasks": {"a": {"data": "a_data.safetensors", "head": "head.safetensors"}, "b": {"data": "b_data.safetensors"}},
    "methods": [{"label": "avg", "method": "linear"},
                {"label": "TA", "method": "task_arithmetic", "search": {"lambda": [0.5, 1.0]}}],
}


def body16() -> nn.Module:
    return make_body(16)


def _state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.contiguous() for k, v in body16().state_dict().items()}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    d = tmp_path_factory.mktemp("suite")
    for name, seed in (("base", 0), ("a", 1), ("b", 2)):
        save_file(_state(seed), str(d / f"{name}.safetensors"))
    g = torch.Generator().manual_seed(0)
    data = {"x_test": torch.randn(8, 64, generator=g), "y_test": torch.randint(0, 10, (8,), generator=g)}
    for task in ("a", "b"):
        save_file(data, str(d / f"{task}_data.safetensors"))
    save_file({**data, "x_val": data["x_test"].clone()}, str(d / "unpaired.safetensors"))
    save_file({"x_test": torch.randn(8, 32), "y_test": data["y_test"]}, str(d / "narrow.safetensors"))
    save_file({"x_test": data["x_test"], "y_test": data["y_test"] + 10}, str(d / "labels.safetensors"))
    save_file({"x_test": data["x_test"], "y_test": data["y_test"][:5]}, str(d / "ragged.safetensors"))
    save_file({k: v.contiguous() for k, v in nn.Linear(16, 10).state_dict().items()}, str(d / "head.safetensors"))
    save_file({"weight": torch.zeros(10, 7)}, str(d / "head7.safetensors"))
    save_file({"weight": torch.zeros(10, 16), "bias": torch.zeros(3)}, str(d / "headbias.safetensors"))
    torch.save(_state(0), d / "base.pt")
    save_file({k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in _state(1).items()}, str(d / "wide.safetensors"))
    (d / "garbage.safetensors").write_bytes(b"\xff" * 64)
    return d


def write(root, doc, name="suite.yaml"):
    path = root / name
    path.write_text(yaml.safe_dump(doc) if not isinstance(doc, str) else doc)
    return path


def edit(**changes):
    """GOOD with `changes` applied: keys are dotted paths ('tasks.a.data', 'methods.0.label'); None deletes."""
    doc = copy.deepcopy(GOOD)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        key = int(last) if isinstance(node, list) else last
        if value is None:
            del node[key]
        else:
            node[key] = value
    return doc


def test_good_suite_loads(root):
    suite = load_suite(str(write(root, GOOD)))
    assert suite.name == "tiny" and suite.tasks.names == ["a", "b"]
    assert [e.label for e in suite.methods.entries] == ["avg", "TA"]
    assert torch.equal(suite.models.base["0.weight"], _state(0)["0.weight"])


BAD = [
    ("[1, 2]", "YAML mapping"),
    ("name: [unclosed", "not valid YAML"),
    (edit(body=None), "missing field 'body'"),
    (edit(modles={"a": "a.safetensors"}), "unknown field 'modles'; did you mean 'models'"),
    (edit(name=5), "name"),
    (edit(seed=-1), "seed"),
    (edit(seed="x"), "seed"),
    (edit(seed=True), "seed"),
    (edit(seed=1.5), "seed"),
    (edit(body=5), "body"),
    (edit(body="no_such_module:fn"), "body"),
    (edit(body="tests.evaluations.test_suite_yaml_errors:nope"), "body"),
    (edit(body="tests.evaluations.test_suite_yaml_errors:GOOD"), "body"),
    (edit(body="tests.evaluations.test_suite_yaml_errors:write"), "body"),
    (edit(base="missing.safetensors"), "base"),
    (edit(base=3), "base"),
    (edit(base="base.pt"), ".safetensors"),
    (edit(base="garbage.safetensors"), "garbage.safetensors"),
    (edit(base="head.safetensors"), "body"),
    (edit(models=[]), "models"),
    (edit(models={}), "models"),
    (edit(models={"a": "missing.safetensors", "b": "b.safetensors"}), "models.a"),
    (edit(models={"a": "a.safetensors", "c": "b.safetensors"}), "must match one to one"),
    (edit(models={"a": "wide.safetensors", "b": "b.safetensors"}), "models.a: tensor '0.bias' has shape (17,)"),
    (edit(tasks=[]), "tasks"),
    (edit(tasks__a="data.safetensors"), "tasks.a"),
    (edit(tasks__a__data=None), "tasks.a"),
    (edit(tasks__a__datta="a_data.safetensors"), "unknown field 'datta'"),
    (edit(tasks__a__data=7), "tasks.a.data"),
    (edit(tasks__a__data="missing.safetensors"), "tasks.a.data"),
    (edit(tasks__a__data="unpaired.safetensors"), "y_val"),
    (edit(tasks__a__data="ragged.safetensors"), "rows"),
    (edit(tasks__a__data="narrow.safetensors"), "tasks.a"),
    (edit(tasks__a__data="labels.safetensors"), "tasks.a"),
    (edit(tasks__a__data="head.safetensors"), "unexpected tensor"),
    (edit(tasks__a__head="missing.safetensors"), "tasks.a.head"),
    (edit(tasks__a__head="head7.safetensors"), "tasks.a"),
    (edit(tasks__a__head="headbias.safetensors"), "bias"),
    (edit(methods={}), "methods"),
    (edit(methods=[]), "methods"),
    (edit(methods__0="linear"), "methods[0]"),
    (edit(methods__0__method="lienar"), "methods[0].method"),
    (edit(methods__0__method=3), "methods[0].method"),
    (edit(methods__0__method="no_such_module:merge"), "methods[0].method"),
    (edit(methods__0__labl="x"), "unknown field 'labl'; did you mean 'label'"),
    (edit(methods__0__label=["x"]), "methods[0].label"),
    (edit(methods__1__label="avg"), "used twice"),
    (edit(methods__0__params=[1]), "methods[0].params"),
    (edit(methods__0__params={"weight": float("nan")}), "methods[0].params.weight"),
    (edit(methods__1__search={"lambda": []}), "methods[1].search.lambda"),
    (edit(methods__1__search={"lambda": 0.5}), "methods[1].search.lambda"),
    (edit(methods__1__search={"lambda": [0.5, float("inf")]}), "methods[1].search.lambda[1]"),
    (edit(methods__1__search=[0.5]), "methods[1].search"),
]


@pytest.mark.parametrize("doc,fragment", BAD, ids=[str(i) for i in range(len(BAD))])
def test_malformed_field_is_one_line_naming_it(root, doc, fragment):
    path = write(root, doc, "bad.yaml")
    with pytest.raises(BasinError) as info:
        load_suite(str(path))
    message = str(info.value)
    assert fragment in message and "\n" not in message, message


CLI_CASES = {"list": "[1, 2]", "unknown": edit(modles={}), "narrow": edit(tasks__a__data="narrow.safetensors"),
             "nan": edit(methods__0__params={"weight": float("nan")})}


@pytest.mark.parametrize("doc", list(CLI_CASES.values()), ids=list(CLI_CASES))
def test_bench_cli_exits_2_with_one_line(root, tmp_path, capsys, doc):
    path = write(root, doc, "cli.yaml")
    assert main(["bench", str(path), "--out", str(tmp_path / "out"), "--no-plots"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("basin bench: error: ") and "cli.yaml" in err[0], err
    assert not (tmp_path / "out").exists()


def test_bench_outputs_not_clobbered(root, tmp_path, capsys):
    path = write(root, GOOD, "ok.yaml")
    out = tmp_path / "out"
    assert main(["bench", str(path), "--methods", "avg", "--out", str(out), "--no-plots"]) == 0
    first = (out / "bench.json").read_text()
    (out / "bench.md").write_text("mine")
    assert main(["bench", str(path), "--methods", "avg", "--out", str(out), "--no-plots"]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "bench.md").read_text() == "mine"
    assert main(["bench", str(path), "--methods", "avg", "--out", str(out), "--no-plots", "--overwrite"]) == 0
    assert (out / "bench.json").read_text() != "" and "| avg |" in (out / "bench.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["bench.csv", "bench.json", "bench.md", "cells"]
    assert [r["label"] for r in json.loads(first)["rows"]][-1] == "avg"
