"""Issue 18, item 4: sharded models in the Hub cache, laid out exactly as huggingface_hub lays them out
(blobs named by sha256 / git sha1, `snapshots/<commit>/` files as relative symlinks into `../../blobs`,
`refs/main` holding the commit), merge offline by snapshot path, by `org/name` and by `org/name@<commit>`."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from merging import merge
from merging.io.checkpoint import open_checkpoint
from taxonomy.errors import BasinError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _blob_name(data: bytes, lfs: bool) -> str:
    """The Hub's etag: sha256 for LFS files (weights), git's blob sha1 for the others."""
    if lfs:
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lay_out_exact_cache(cache: Path, repo_id: str, source: Path, commit: str) -> Path:
    """`source`'s files in a huggingface_hub cache: blobs by etag, relative symlinks, refs/main; the snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in sorted(p for p in source.iterdir() if p.is_file()):
        data = f.read_bytes()
        blob = repo / "blobs" / _blob_name(data, f.suffix == ".safetensors")
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.join("..", "..", "blobs", blob.name))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def sharded_cache(tmp_path, monkeypatch, llama_pair):
    cache = tmp_path / "hub"
    snapshots = [lay_out_exact_cache(cache, f"org/llama-{k}", src, COMMIT) for k, src in enumerate(llama_pair)]
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache), raising=False)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True, raising=False)
    return snapshots


def test_layout_is_the_hubs(sharded_cache):
    snapshot = sharded_cache[0]
    index = json.loads((snapshot / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    for name in shards:
        link = snapshot / name
        assert link.is_symlink() and os.readlink(link).startswith("../../blobs/")
        assert link.resolve().name == hashlib.sha256(link.read_bytes()).hexdigest()


@pytest.mark.parametrize("how", ["snapshot", "id", "id@commit"])
def test_sharded_hub_model_merges_from_the_cache(tmp_path, sharded_cache, llama_pair, how):
    refs = {"snapshot": [str(s) for s in sharded_cache],
            "id": ["org/llama-0", "org/llama-1"],
            "id@commit": [f"org/llama-0@{COMMIT}", f"org/llama-1@{COMMIT}"]}[how]
    recipe = {"merge_method": "linear", "models": refs, "parameters": {"weight": [0.25, 0.75]}}
    local = {"merge_method": "linear", "models": [str(p) for p in llama_pair], "parameters": {"weight": [0.25, 0.75]}}
    got = merge(recipe, tmp_path / "hub-out", progress=False)
    want = merge(local, tmp_path / "local-out", progress=False)
    assert got.content_hash == want.content_hash and got.tensors == want.tensors > 20
    if how != "snapshot":
        assert [i.revision for i in got.inputs] == [COMMIT, COMMIT]


def test_escapes_out_of_the_cache_entry_still_refused(tmp_path, sharded_cache, llama_pair):
    snapshot = sharded_cache[0]
    other_repo_blob = next((sharded_cache[1].parent.parent / "blobs").glob("*"))
    shard = sorted(p for p in snapshot.iterdir() if p.name.startswith("model-"))[0]
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(shard.read_bytes())
    for target in (other_repo_blob, outside, Path("../../../../outside.safetensors")):
        shard.unlink()
        shard.symlink_to(target)
        with pytest.raises(BasinError, match="escapes the checkpoint folder"):
            open_checkpoint(snapshot)
    shard.unlink()
    shard.symlink_to(os.path.join("..", "..", "blobs", hashlib.sha256(outside.read_bytes()).hexdigest()))
    assert len(open_checkpoint(snapshot).names()) > 20  # back inside: fine
