"""The demo's measure section (quick settings): real fine-tunes of MiniLM, merged and measured."""

from __future__ import annotations

import json

import pytest

from evaluations.cli import demo
from evaluations.cli.demo_measure import QUICK, measure_section, pair, sentences, write_data
from evaluations.measure import measure_loss
from evaluations.models import load_model
from evaluations.text_data import load_data


@pytest.fixture(scope="module")
def section(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo")
    return work, {r.name.split()[0]: r for r in measure_section(work, QUICK)}


def test_pairs_and_sentences_are_deterministic(tmp_path):
    assert pair("one two three four five") == {"text": "one two", "text_pair": "three four five"}
    assert sentences("Short one. This sentence has exactly seven words here! x") == [
        "This sentence has exactly seven words here!"]
    first = {k: p.read_bytes() for k, p in write_data(tmp_path / "1", QUICK).items()}
    again = {k: p.read_bytes() for k, p in write_data(tmp_path / "2", QUICK).items()}
    assert first == again
    rows = [json.loads(line) for line in first["eval"].decode().splitlines()]
    assert len(rows) == 2 * QUICK.eval_pairs and all(r["text"] and r["text_pair"] for r in rows)


def test_fine_tune_on_a_lowers_the_loss_on_a(section):
    _, rows = section
    assert rows["ft_a"].metrics["loss A"] < rows["base"].metrics["loss A"]
    assert 0.0 <= rows["ft_a"].metrics["acc"] <= 1.0


def test_merge_loss_is_measure_loss_of_the_output(section):
    work, rows = section
    for method in QUICK.methods:
        out = work / f"measure-{method}"
        report = json.loads((out / "measure.json").read_text())
        model = load_model(out)
        data = load_data(model, work / "measure-data" / "eval.jsonl", seq_len=QUICK.seq_len,
                         batch_size=QUICK.batch_size, seed=0)
        want = measure_loss(model, data).loss
        assert report["losses"]["merge"]["loss"] == want == rows[method].metrics["loss"]
        assert len(report["paths"][0]["alphas"]) == QUICK.points
        assert rows[method].metrics["barrier"] >= 0.0
    cos = rows["task_arithmetic"].metrics["tv cos"]
    assert -1.0 <= cos <= 1.0 and "tv cos" not in rows["linear"].metrics  # linear has no base: no task vectors


def test_out_folders_are_refused_without_overwrite(section):
    work, _ = section
    assert {"ft_a", "ft_b", "measure-ties"} <= set(demo.OUT_FOLDERS)
    from taxonomy.errors import BasinError

    with pytest.raises(BasinError, match="already exists; pass --overwrite"):
        demo.check_out(work, overwrite=False)
    demo.check_out(work, overwrite=True)
