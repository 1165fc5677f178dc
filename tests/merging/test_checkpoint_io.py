"""Opening checkpoints: files, folders, sharded folders, Hub ids, state dicts; bad inputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merging.io.checkpoint import StateDictCheckpoint, open_checkpoint
from taxonomy.errors import BasinError
from tests.conftest import MINILM_COMMIT, MINILM_REPO
from tests.merging.conftest import random_state, write_safetensors


def test_file_and_folder_match_safetensors_reference(tmp_path):
    state = random_state(0, torch.bfloat16)
    folder = write_safetensors(state, tmp_path / "m")
    for ref in (folder, folder / "model.safetensors", str(folder)):
        ckpt = open_checkpoint(ref)
        assert sorted(ckpt.names()) == sorted(state)
        reference = load_file(folder / "model.safetensors")
        for name in state:
            assert ckpt.meta(name).shape == tuple(state[name].shape)
            assert ckpt.meta(name).dtype == torch.bfloat16
            assert torch.equal(ckpt.get(name), reference[name])
    assert ckpt.folder == folder


def test_headers_only_until_get(tmp_path, monkeypatch):
    folder = write_safetensors(random_state(1), tmp_path / "m")
    import merging.io.safetensors_format as io

    reads = []
    real = io.mmap.mmap
    monkeypatch.setattr(io.mmap, "mmap", lambda *a, **k: reads.append(k.get("offset")) or real(*a, **k))
    ckpt = open_checkpoint(folder)
    _ = [ckpt.meta(n) for n in ckpt.names()]
    assert reads == []
    ckpt.get("norm.weight")
    assert len(reads) == 1


def test_sharded_folder_and_index(llama_pair):
    folder = llama_pair[0]
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    ckpt = open_checkpoint(folder)
    assert sorted(ckpt.names()) == sorted(index)
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(ckpt.get(name), load_file(folder / index[name])[name])


def test_state_dict_and_module():
    module = torch.nn.Linear(3, 2)
    for ref in (module, module.state_dict()):
        ckpt = open_checkpoint(ref)
        assert isinstance(ckpt, StateDictCheckpoint)
        assert torch.equal(ckpt.get("weight"), module.weight.detach())


def test_missing_path(tmp_path):
    with pytest.raises(BasinError, match="no such file or folder"):
        open_checkpoint(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BasinError, match="no model.safetensors"):
        open_checkpoint(tmp_path / "empty")


def test_corrupted_and_truncated(tmp_path):
    folder = write_safetensors(random_state(2), tmp_path / "m")
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(BasinError, match="truncated"):
        open_checkpoint(folder)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + data[100:])
    with pytest.raises(BasinError, match="not valid JSON"):
        open_checkpoint(path)
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(BasinError, match="corrupted or truncated"):
        open_checkpoint(path)


def test_mapped_tensors_are_private_copies_and_a_file_truncated_later_is_a_clear_error(tmp_path):
    state = random_state(4)
    folder = write_safetensors(state, tmp_path / "m")
    path = folder / "model.safetensors"
    before = path.read_bytes()
    ckpt = open_checkpoint(folder)
    name = max(state, key=lambda n: state[n].numel())
    tensor = ckpt.get(name)
    tensor.add_(1.0)  # copy-on-write: the file is untouched
    assert path.read_bytes() == before
    assert torch.equal(ckpt.get(name), state[name])
    with open(path, "r+b") as f:  # truncated after the headers were checked
        f.truncate(len(before) // 2)
    last = max(state, key=lambda n: ckpt._offset[n])
    with pytest.raises(BasinError, match=f"truncated while reading tensor '{last}'"):
        ckpt.get(last)


def test_file_systems_without_memory_maps_are_read_instead(tmp_path, monkeypatch):
    import merging.io.safetensors_format as io

    state = random_state(5, torch.bfloat16)
    ckpt = open_checkpoint(write_safetensors(state, tmp_path / "m"))

    def no_mmap(*args, **kwargs):
        raise OSError(19, "No such device")

    monkeypatch.setattr(io.mmap, "mmap", no_mmap)
    for name in state:
        assert torch.equal(ckpt.get(name), state[name])


def test_index_shard_escaping_folder(tmp_path):
    outside = write_safetensors(random_state(3), tmp_path / "outside")
    folder = tmp_path / "m"
    folder.mkdir()
    weight_map = {n: "../outside/model.safetensors" for n in random_state(3)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(BasinError, match="escapes the checkpoint folder"):
        open_checkpoint(folder)
    weight_map = {n: str(outside / "model.safetensors") for n in random_state(3)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(BasinError, match="escapes the checkpoint folder"):
        open_checkpoint(folder)


def test_pickle_refused_unless_allowed(tmp_path):
    state = random_state(4)
    folder = tmp_path / "p"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(BasinError, match="allow-pickle"):
        open_checkpoint(folder)
    ckpt = open_checkpoint(folder, allow_pickle=True)
    assert all(torch.equal(ckpt.get(n), state[n]) for n in state)


def test_hub_id_through_cache(hub_cache, minilm_dir):
    ckpt = open_checkpoint(MINILM_REPO)
    assert ckpt.revision == MINILM_COMMIT and ckpt.repo_id == MINILM_REPO
    reference = load_file(minilm_dir / "model.safetensors")
    name = "encoder.layer.3.attention.self.query.weight"
    assert torch.equal(ckpt.get(name), reference[name])
    assert open_checkpoint(f"{MINILM_REPO}@{MINILM_COMMIT}").revision == MINILM_COMMIT


def test_hub_id_missing_offline(hub_cache):
    with pytest.raises(BasinError, match="not-an-org/no-such-model.*HF_HUB_OFFLINE"):
        open_checkpoint("not-an-org/no-such-model")


def test_lora_reference_without_lora_module(tmp_path, monkeypatch):
    base = write_safetensors(random_state(5), tmp_path / "base")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    monkeypatch.setitem(sys.modules, "merging.io.lora", None)  # import fails as if the module were absent
    with pytest.raises(BasinError, match="LoRA adapters are not available"):
        open_checkpoint(f"{base}+{adapter}")


def test_base_plus_lora_adapter_in_a_recipe(tmp_path):
    from safetensors.torch import save_file

    from merging import merge

    state = random_state(6)
    base = write_safetensors(state, tmp_path / "base")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 6, generator=g), torch.randn(7, 2, generator=g)
    save_file({"base_model.model.layers.0.mlp.lora_A.weight": a, "base_model.model.layers.0.mlp.lora_B.weight": b},
              adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                             "target_modules": ["mlp"]}))
    merge({"merge_method": "linear", "models": [f"{base}+{adapter}"]}, tmp_path / "out", progress=False)
    out = load_file(tmp_path / "out/model.safetensors")
    torch.testing.assert_close(out["layers.0.mlp.weight"], state["layers.0.mlp.weight"] + 2.0 * b @ a)
    assert torch.equal(out["layers.1.mlp.weight"], state["layers.1.mlp.weight"])


def test_hub_headers_checked_before_weights_download(tmp_path, monkeypatch):
    """Online with weights not cached: names and shapes come from the Hub's headers, and a mismatch
    fails before any weights download (the Hub is simulated: no network in tests)."""
    import huggingface_hub.constants as constants
    from huggingface_hub import HfApi
    from huggingface_hub.utils import SafetensorsFileMetadata, SafetensorsRepoMetadata, TensorInfo

    import merging.io.hub as hub
    from merging import merge
    from merging.io.hub import Resolved

    local = write_safetensors(random_state(7), tmp_path / "local")
    config_only = tmp_path / "snapshot-config"
    config_only.mkdir()
    (config_only / "config.json").write_text("{}")
    full = write_safetensors(random_state(8), tmp_path / "snapshot-full")
    downloads = []

    def fake_resolve(ref, *, allow_pickle=False, weights=True):
        if not ref.startswith("org/"):
            return Resolved(ref, Path(ref))
        downloads.append(weights)
        return Resolved(ref, full if weights else config_only, "org/model", "0" * 40)

    def headers(state):
        tensors = {n: TensorInfo("F32", list(t.shape), (0, 0)) for n, t in state.items()}
        files = {"model.safetensors": SafetensorsFileMetadata({}, tensors)}
        return SafetensorsRepoMetadata(None, False, {n: "model.safetensors" for n in state}, files)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "resolve", fake_resolve)
    wrong = random_state(8) | {"lm_head.weight": torch.zeros(12, 6)}
    monkeypatch.setattr(HfApi, "get_safetensors_metadata", lambda self, repo, revision=None: headers(wrong))
    recipe = {"merge_method": "linear", "models": [str(local), "org/model"]}
    with pytest.raises(BasinError, match="lm_head.weight"):
        merge(recipe, tmp_path / "out", progress=False)
    assert downloads == [False]  # config files only; the weights were never fetched
    monkeypatch.setattr(HfApi, "get_safetensors_metadata", lambda self, repo, revision=None: headers(random_state(8)))
    merge(recipe, tmp_path / "out", progress=False)
    assert downloads[1:] == [False, True]
