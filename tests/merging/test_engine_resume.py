"""Resuming an interrupted merge: journalled tensors that still hash right are kept, the rest merged."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from merging import merge
from merging.io.writer import JOURNAL, ShardWriter, temp_folder
from tests.merging.conftest import random_state, write_safetensors


def _interrupt_after(monkeypatch, k: int) -> list[str]:
    written: list[str] = []
    real_add = ShardWriter.add

    def add(self, name, tensor):
        if len(written) == k:
            raise KeyboardInterrupt
        real_add(self, name, tensor)
        written.append(name)

    monkeypatch.setattr(ShardWriter, "add", add)
    return written


def test_interrupted_merge_resumes_and_matches_fresh(tmp_path, monkeypatch):
    folders = [write_safetensors(random_state(s), tmp_path / f"m{s}") for s in range(2)]
    recipe = {"merge_method": "linear", "models": [str(f) for f in folders], "parameters": {"weight": [0.3, 0.7]}}
    fresh = merge(recipe, tmp_path / "fresh", progress=False, shard_size=250)
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        first = _interrupt_after(m, 4)
        with pytest.raises(KeyboardInterrupt):
            merge(recipe, out, progress=False, shard_size=250)
    assert not out.exists() and (temp_folder(out) / JOURNAL).is_file()
    # damage one finished tensor on disk: it must be recomputed, the other three kept
    writer_files = sorted(temp_folder(out).glob("model-*.safetensors"))
    data = bytearray(writer_files[0].read_bytes())
    data[-1] ^= 0xFF
    writer_files[0].write_bytes(bytes(data))
    with monkeypatch.context() as m:
        second = _interrupt_after(m, 10**6)
        report = merge(recipe, out, progress=False, shard_size=250)
    assert report.resumed_tensors == 3
    assert len(second) == len(random_state(0)) - 3 and set(first) - set(second) != set()
    assert report.content_hash == fresh.content_hash
    for f in (tmp_path / "fresh").glob("*.safetensors"):
        assert (out / f.name).read_bytes() == f.read_bytes()
    assert not temp_folder(out).exists() and not (out / JOURNAL).exists()


def test_changed_recipe_starts_afresh(tmp_path, monkeypatch):
    folders = [write_safetensors(random_state(s), tmp_path / f"m{s}") for s in range(2)]
    recipe = {"merge_method": "linear", "models": [str(f) for f in folders]}
    with monkeypatch.context() as m:
        _interrupt_after(m, 3)
        with pytest.raises(KeyboardInterrupt):
            merge(recipe, tmp_path / "out", progress=False)
    recipe["models"] = [{"model": str(folders[0])}, {"model": str(folders[1]), "parameters": {"weight": 2.0}}]
    report = merge(recipe, tmp_path / "out", progress=False)
    assert report.resumed_tensors == 0
    out = load_file(tmp_path / "out/model.safetensors")
    a, b = random_state(0), random_state(1)
    torch.testing.assert_close(out["norm.weight"], (a["norm.weight"] + 2 * b["norm.weight"]) / 3)
