"""`basin merge`: every bad input exits 2 with a message naming the culprit and writes nothing;
start-up imports no transformers and adds under a second to the torch import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from evaluations.cli import main
from tests.merging.conftest import random_state, write_safetensors


def _recipe(tmp_path: Path, models: list[str], **extra) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "linear", "models": models, **extra}))
    return str(path)


def _fails(capsys, tmp_path, argv: list[str], message: str) -> None:
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["merge", *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temp folder left


@pytest.fixture
def two(tmp_path):
    return [str(write_safetensors(random_state(s), tmp_path / f"m{s}")) for s in range(2)]


def test_merge_ok_and_json(tmp_path, two, capsys):
    assert main(["merge", _recipe(tmp_path, two), str(tmp_path / "out"), "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tensors"] == len(random_state(0)) and (tmp_path / "out/model.safetensors").exists()


def test_missing_model(tmp_path, two, capsys):
    _fails(capsys, tmp_path, [_recipe(tmp_path, [two[0], str(tmp_path / "nope")]), str(tmp_path / "out")],
           "nope: no such file or folder")


def test_hub_id_not_in_cache_offline(tmp_path, two, capsys, hub_cache):
    recipe = _recipe(tmp_path, [two[0], "someone/missing-model"])
    _fails(capsys, tmp_path, [recipe, str(tmp_path / "out")], "someone/missing-model")


def test_tensor_names_differ(tmp_path, two, capsys):
    other = random_state(2)
    other["extra.weight"] = other.pop("layers.1.mlp.weight")
    odd = write_safetensors(other, tmp_path / "odd")
    _fails(capsys, tmp_path, [_recipe(tmp_path, [two[0], str(odd)]), str(tmp_path / "out")],
           "lacks ['layers.1.mlp.weight'], has extra ['extra.weight']")


def test_tensor_shapes_differ(tmp_path, two, capsys):
    odd = write_safetensors(random_state(2) | {"layers.0.mlp.weight": torch.zeros(8, 6)}, tmp_path / "odd")
    _fails(capsys, tmp_path, [_recipe(tmp_path, [two[0], str(odd)]), str(tmp_path / "out")],
           "layers.0.mlp.weight")


def test_corrupted_and_truncated_file(tmp_path, two, capsys):
    bad = write_safetensors(random_state(3), tmp_path / "bad")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    _fails(capsys, tmp_path, [_recipe(tmp_path, [two[0], str(bad)]), str(tmp_path / "out")], "truncated")
    (bad / "model.safetensors").write_bytes(b"garbage!" * 4)
    _fails(capsys, tmp_path, [_recipe(tmp_path, [two[0], str(bad)]), str(tmp_path / "out")], "model.safetensors")


def test_index_escaping(tmp_path, two, capsys):
    folder = tmp_path / "esc"
    folder.mkdir()
    weight_map = {n: "../m0/model.safetensors" for n in random_state(0)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _fails(capsys, tmp_path, [_recipe(tmp_path, [two[0], str(folder)]), str(tmp_path / "out")],
           "escapes the checkpoint folder")


def test_unknown_method_and_parameter(tmp_path, two, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "lienar", "models": two}))
    _fails(capsys, tmp_path, [str(path), str(tmp_path / "out")], "lienar")
    path.write_text(yaml.safe_dump({"merge_method": "linear", "models": two, "parameters": {"weigth": 1}}))
    _fails(capsys, tmp_path, [str(path), str(tmp_path / "out")], "no parameter 'weigth'")
    path.write_text(yaml.safe_dump({"merge_method": "linear", "models": two, "parameters": {"weight": []}}))
    _fails(capsys, tmp_path, [str(path), str(tmp_path / "out")], "weight: expected a scalar, a non-empty list")


def test_output_exists(tmp_path, two, capsys):
    (tmp_path / "out").mkdir()
    _fails(capsys, tmp_path, [_recipe(tmp_path, two), str(tmp_path / "out")], "output folder exists")
    assert main(["merge", _recipe(tmp_path, two), str(tmp_path / "out"), "--overwrite", "--no-progress"]) == 0


def test_dry_run_prints_plan(tmp_path, two, capsys):
    recipe = _recipe(tmp_path, two, parameters={"weight": [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.5}]})
    assert main(["merge", recipe, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "layers.1.mlp.weight  [7x6 float32]  t=0.500  inputs=[0, 1]  weight=[0.5,0.5]" in out
    assert "layers.2.mlp.weight  [7x6 float32]  t=1.000  inputs=[0, 1]  weight=[1,1]" in out
    assert not (tmp_path / "out").exists()


def test_startup_imports_no_transformers(tmp_path, two):
    """CPU seconds (robust to a busy shared machine) from after `import torch` to the end of a dry run."""
    recipe = _recipe(tmp_path, two)
    code = (
        "import sys, time\n"
        "import torch\n"
        "t0 = time.process_time()\n"
        "from evaluations.cli import main\n"
        f"rc = main(['merge', {recipe!r}, '--dry-run'])\n"
        "print(rc, time.process_time() - t0, 'transformers' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).parents[2])
    rc, seconds, has_transformers = result.stdout.strip().splitlines()[-1].split()
    assert rc == "0" and has_transformers == "False"
    assert float(seconds) < 1.0


def test_bad_device_and_shard_size(tmp_path, two, capsys):
    recipe = _recipe(tmp_path, two)
    _fails(capsys, tmp_path, [recipe, str(tmp_path / "out"), "--device", "warp9"], "not a torch device")
    if not torch.cuda.is_available():
        _fails(capsys, tmp_path, [recipe, str(tmp_path / "out"), "--device", "cuda"], "CUDA is not available")
    _fails(capsys, tmp_path, [recipe, str(tmp_path / "out"), "--shard-size", "huge"], "shard size 'huge'")


@pytest.mark.parametrize("pair", ["llama_pair", "bert_pair"])
def test_output_identical_in_shape_to_its_config_source_skips_importing_transformers(tmp_path, pair, request):
    """A merge whose config and tensor shapes are the config source's cannot fail the loadability check (only new
    problems are reported), so the check (and transformers' import: seconds) is skipped; the output still loads."""
    a, b = request.getfixturevalue(pair)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n"
                      f"  - model: {b}\n    parameters: {{weight: 0.5}}\n")
    out = tmp_path / "out"
    code = ("import sys\nfrom evaluations.cli import main\n"
            f"rc = main(['merge', {str(recipe)!r}, {str(out)!r}])\n"
            "print(rc, 'transformers' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).parents[2])
    assert result.stdout.strip().splitlines()[-1].split() == ["0", "False"], result.stderr[-2000:]
    import transformers

    model = transformers.AutoModel.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) > 0
