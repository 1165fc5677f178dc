"""ShardWriter: sharded safetensors + index, temp folder renamed into place, removed on error."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from merging.io.writer import HASH_APART, ShardWriter, parse_size
from taxonomy.errors import BasinError
from tests.merging.conftest import random_state


def _layout(state):
    return [(n, tuple(t.shape), t.dtype) for n, t in state.items()]


def test_sharded_output_round_trips(tmp_path):
    state = random_state(0) | {"ids": torch.arange(5), "half": torch.randn(4, 3).to(torch.bfloat16)}
    out = tmp_path / "out"
    writer = ShardWriter(out, _layout(state), shard_size=200)
    for name in reversed(list(state)):  # any order
        writer.add(name, state[name])
    writer.close()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    loaded = {}
    for s in shards:
        loaded.update(load_file(out / s))
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[n], state[n]) for n in state)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in state.values())
    assert not list(tmp_path.glob(".*tmp*"))


def test_single_shard_is_model_safetensors_and_hash(tmp_path):
    # small tensors are hashed inline, one above HASH_APART on the hashing thread while its bytes are written
    state = random_state(1) | {"big": torch.randn(HASH_APART // 4 + 3, generator=torch.Generator().manual_seed(1))}
    assert state["big"].nbytes >= HASH_APART > max(t.nbytes for n, t in state.items() if n != "big")
    writer = ShardWriter(tmp_path / "out", _layout(state))
    for n, t in state.items():
        writer.add(n, t)
    digest = writer.content_hash()
    writer.close()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors"]
    loaded = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(loaded[n], state[n]) for n in state)
    # independent: sha256 over name, dtype code, shape, and sha256 of the raw little-endian bytes
    h = hashlib.sha256()
    for n in sorted(state):
        raw = state[n].numpy().tobytes()
        h.update(f"{n}\0F32\0{list(state[n].shape)}\0{hashlib.sha256(raw).hexdigest()}\n".encode())
    assert digest == h.hexdigest()


def test_existing_output_refused_and_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    state = {"w": torch.ones(2)}
    with pytest.raises(BasinError, match="output folder exists"):
        ShardWriter(out, _layout(state))
    writer = ShardWriter(out, _layout(state), overwrite=True)
    writer.add("w", state["w"])
    writer.close()
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]


def test_error_removes_temp_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    state = {"w": torch.ones(2), "v": torch.zeros(3)}
    with pytest.raises(BasinError, match="expected"):
        with ShardWriter(out, _layout(state)) as writer:
            writer.add("w", state["w"])
            writer.add("v", torch.zeros(4))
    assert list(tmp_path.iterdir()) == []
    writer = ShardWriter(out, _layout(state))
    writer.add("w", state["w"])
    with pytest.raises(BasinError, match="never written"):
        writer.close()
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 5 * 10**8
    assert parse_size("2GiB") == 2 * 1024**3
    assert parse_size("1234") == 1234
    with pytest.raises(BasinError, match="shard size"):
        parse_size("lots")
