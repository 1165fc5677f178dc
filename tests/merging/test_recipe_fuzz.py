"""Seeded fuzzing of recipes: mutated valid recipes either merge (plan) correctly or fail with a BasinError,
never another exception; a few go through the CLI, which must exit 0 or 2 with one error line, no traceback."""

from __future__ import annotations

import copy
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from merging import merge
from merging.recipe.schema import Recipe
from taxonomy.errors import BasinError
from tests.merging.lowprec_inputs import make_inputs

VALUES: list[Any] = [float("nan"), float("inf"), -float("inf"), -1, 0, 0.5, 1, 2, 1e308, 10**30, True, False, None,
                     "", "x", "ties", "1e-3", [], [0.1, 0.9], [{"filter": "mlp", "value": 0.3}], {}, {"grid": [0.2]},
                     {"model": {"path": "nowhere"}}, "caf\u00e9", [[[]]], {"a": {"b": [1]}}]
KEYS = ["models", "slices", "parameters", "weight", "density", "t", "lambda", "base_model", "dtype", "seed",
        "layer_range", "sources", "chat_template", "compute_dtype", "residual_weight", "tokenizer_source", "filter",
        "value", "name", "normalize", "rescale", "select_topk", "epsilon", "gate_mode", "weigth"]


def seeds(f: dict[str, Path]) -> list[dict[str, Any]]:
    b, a, c = (str(f[k]) for k in ("base", "ft1", "ft2"))
    return [
        {"merge_method": "linear", "models": [{"model": a, "parameters": {"weight": 0.7}},
                                              {"model": c, "parameters": {"weight": 0.3}}]},
        {"merge_method": "ties", "base_model": b, "parameters": {"density": [0.3, 0.8], "weight": 1.0},
         "models": [{"model": a}, {"model": c, "parameters": {"weight": [{"filter": "mlp", "value": 0.5},
                                                                         {"value": 1.0}]}}]},
        {"merge_method": "slerp", "base_model": a, "parameters": {"t": [0.1, 0.9]}, "models": [a, c],
         "dtype": "bfloat16"},
        {"merge_method": "passthrough", "slices": [{"sources": [{"model": a, "layer_range": [0, 1]}]},
                                                   {"sources": [{"model": c, "layer_range": [1, 2]}]}]},
        {"merge_method": "task_arithmetic", "base_model": b, "models": [a, c],
         "parameters": {"lambda": {"grid": [0.5, 1.0]}}},
        {"merge_method": "ram", "base_model": b, "models": [a, c], "chat_template": "chatml",
         "compute_dtype": "float32"},
    ]


def _containers(node: Any) -> list[Any]:
    out = [node]
    if isinstance(node, dict):
        for v in node.values():
            out += _containers(v)
    elif isinstance(node, list):
        for v in node:
            out += _containers(v)
    return out


def mutate(recipe: dict[str, Any], rng: random.Random) -> dict[str, Any] | str:
    """One to three random edits: replace a value, delete or add a key, or (as text) corrupt the YAML."""
    r = copy.deepcopy(recipe)
    for _ in range(rng.randint(1, 3)):
        target = rng.choice([c for c in _containers(r) if isinstance(c, (dict, list)) and c])
        key = rng.choice(list(target)) if isinstance(target, dict) else rng.randrange(len(target))
        action = rng.random()
        if action < 0.6:
            target[key] = copy.deepcopy(rng.choice(VALUES))
        elif action < 0.75 and isinstance(target, dict):
            del target[key]
        elif isinstance(target, dict):
            target[rng.choice(KEYS)] = copy.deepcopy(rng.choice(VALUES))
    if rng.random() < 0.15:
        text = yaml.safe_dump(r)
        cut = rng.randrange(len(text))
        noise = rng.choice(["", ":", "- [", "&a *b", "\t", "{", "'", "\x00", "---\n", "\ufffd"])
        return text[:cut] + noise + text[cut:]
    return r


def _check(case: dict[str, Any] | str, tmp: Path) -> str:
    """'planned' (a dry-run plan of every tensor), 'ok' (valid, names no local model), 'error' (BasinError);
    anything else propagates."""
    try:
        recipe = Recipe.from_yaml(case) if isinstance(case, str) else Recipe.from_dict(case)
    except BasinError:
        return "error"
    if not all(Path(ref.split("+")[0].split("@")[0]).exists() for ref in recipe.model_refs()):
        return "ok"  # would resolve Hub ids: parsing and validation were the point
    try:
        report = merge(recipe, None, dry_run=True, progress=False)
    except BasinError:
        return "error"
    plan = report.sweep[0]["plan"] if report.sweep else report.plan
    assert len(plan.tensors) == 21 or recipe.slices is not None, plan.table()
    return "planned"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("fuzz"))


def test_fuzz_recipes_in_process(inputs, tmp_path):
    import warnings

    rng = random.Random(20240518)
    outcomes = {"ok": 0, "planned": 0, "error": 0}
    base = seeds(inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(400):
            case = mutate(rng.choice(base), rng)
            try:
                outcomes[_check(case, tmp_path)] += 1
            except Exception as err:  # noqa: BLE001  (the point: no other exception type)
                pytest.fail(f"{type(err).__name__}: {err} for recipe {case!r}")
    assert outcomes["error"] > 100 and outcomes["planned"] > 20, outcomes


def test_fuzz_recipes_through_the_cli(inputs, tmp_path):
    rng = random.Random(7)
    base = seeds(inputs)
    root = Path(__file__).parents[2]
    for k in range(3):  # each start imports torch: seconds apiece on a busy machine
        case = mutate(rng.choice(base), rng)
        path = tmp_path / f"r{k}.yaml"
        path.write_text(case if isinstance(case, str) else yaml.safe_dump(case), encoding="utf-8")
        out = subprocess.run([sys.executable, "-m", "evaluations.cli", "merge", str(path), "--dry-run"],
                             capture_output=True, text=True, cwd=root, timeout=120)
        assert out.returncode in (0, 2), out.stderr
        assert "Traceback" not in out.stderr
        if out.returncode == 2:
            errors = [line for line in out.stderr.splitlines() if "error:" in line]
            assert len(errors) == 1 and errors[0].startswith("basin merge: error: "), out.stderr
