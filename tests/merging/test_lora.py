"""PEFT LoRA adapters: dense deltas W + s B A, lazy base+adapter checkpoints, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from merging.io.checkpoint import StateDictCheckpoint, open_checkpoint
from merging.io.lora import lora_task_vector, open_lora, read_adapter
from taxonomy import BasinError


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def base_state() -> dict[str, torch.Tensor]:
    return {
        "embed.weight": rand(10, 4, seed=1),
        "layers.0.q.weight": rand(6, 4, seed=2),
        "layers.0.q.bias": rand(6, seed=3),
        "layers.0.v.weight": rand(5, 4, seed=4),
        "head.weight": rand(3, 5, seed=5),
    }


def write_adapter(folder: Path, tensors: dict[str, torch.Tensor], **config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 8, "target_modules": ["q", "v"], **config}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "adapter_model.safetensors")
    return folder


def lora_pair(out: int, inp: int, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return rand(r, inp, seed=seed), rand(out, r, seed=seed + 100)


def test_open_lora_adds_scaled_product_to_targets_only(tmp_path):
    a_q, b_q = lora_pair(6, 4, 2, 10)
    a_v, b_v = lora_pair(5, 4, 2, 11)
    folder = write_adapter(tmp_path / "ad", {
        "base_model.model.layers.0.q.lora_A.weight": a_q, "base_model.model.layers.0.q.lora_B.weight": b_q,
        "base_model.model.layers.0.v.lora_A.weight": a_v, "base_model.model.layers.0.v.lora_B.weight": b_v,
    })
    state = base_state()
    ckpt = open_lora(StateDictCheckpoint(state, label="base"), folder)
    assert ckpt.names() == list(state) and ckpt.label.startswith("base+")
    scale = 8 / 2
    # W + (alpha / r) B A, entry by entry for one element, then whole matrices
    i, j = 4, 3
    by_hand = state["layers.0.q.weight"][i, j] + scale * sum(b_q[i, t] * a_q[t, j] for t in range(2))
    assert math.isclose(float(ckpt.get("layers.0.q.weight")[i, j]), float(by_hand), rel_tol=1e-6)
    torch.testing.assert_close(ckpt.get("layers.0.v.weight"), state["layers.0.v.weight"] + scale * b_v @ a_v)
    for name in ("embed.weight", "layers.0.q.bias", "head.weight"):
        assert torch.equal(ckpt.get(name), state[name])
    assert ckpt.adapted_names() == ["layers.0.q.weight", "layers.0.v.weight"]
    tv = lora_task_vector(folder)
    assert set(tv) == {"layers.0.q.weight", "layers.0.v.weight"}
    torch.testing.assert_close(tv["layers.0.q.weight"], scale * b_q @ a_q)


def test_rslora_alpha_pattern_embedding_and_full_tensors(tmp_path):
    a_q, b_q = lora_pair(6, 4, 4, 20)
    a_v, b_v = lora_pair(5, 4, 2, 21)
    emb_a, emb_b = rand(3, 10, seed=22), rand(4, 3, seed=23)  # PEFT: A (r, num_embeddings), B (dim, r)
    new_head = rand(3, 5, seed=24)
    folder = write_adapter(tmp_path / "ad", {
        "base_model.model.layers.0.q.lora_A.weight": a_q, "base_model.model.layers.0.q.lora_B.weight": b_q,
        "base_model.model.layers.0.v.lora_A.weight": a_v, "base_model.model.layers.0.v.lora_B.weight": b_v,
        "base_model.model.embed.lora_embedding_A": emb_a, "base_model.model.embed.lora_embedding_B": emb_b,
        "base_model.model.head.modules_to_save.default.weight": new_head,
    }, use_rslora=True, lora_alpha=6, alpha_pattern={"v": 3})
    state = base_state()
    ckpt = open_lora(StateDictCheckpoint(state), folder)
    torch.testing.assert_close(ckpt.get("layers.0.q.weight"), state["layers.0.q.weight"] + 6 / math.sqrt(4) * b_q @ a_q)
    torch.testing.assert_close(ckpt.get("layers.0.v.weight"), state["layers.0.v.weight"] + 3 / math.sqrt(2) * b_v @ a_v)
    torch.testing.assert_close(ckpt.get("embed.weight"), state["embed.weight"] + 6 / math.sqrt(3) * (emb_b @ emb_a).T)
    assert torch.equal(ckpt.get("head.weight"), new_head)
    tv = lora_task_vector(folder, StateDictCheckpoint(state))
    torch.testing.assert_close(tv["head.weight"], new_head - state["head.weight"])


def test_adapter_trained_on_a_wrapper_resolves_by_suffix(tmp_path):
    a, b = lora_pair(6, 4, 2, 30)
    folder = write_adapter(tmp_path / "ad", {"base_model.model.bert.layers.0.q.lora_A.weight": a,
                                             "base_model.model.bert.layers.0.q.lora_B.weight": b})
    state = base_state()
    ckpt = open_lora(StateDictCheckpoint(state), folder)
    torch.testing.assert_close(ckpt.get("layers.0.q.weight"), state["layers.0.q.weight"] + 4 * b @ a)


def test_base_plus_adapter_reference_opens_lazily(tmp_path):
    from tests.merging.conftest import write_safetensors

    state = base_state()
    base_dir = write_safetensors(state, tmp_path / "base")
    a, b = lora_pair(5, 4, 2, 40)
    folder = write_adapter(tmp_path / "ad", {"base_model.model.layers.0.v.lora_A.weight": a,
                                             "base_model.model.layers.0.v.lora_B.weight": b})
    ckpt = open_checkpoint(f"{base_dir}+{folder}")
    assert ckpt.folder == base_dir
    torch.testing.assert_close(ckpt.get("layers.0.v.weight"), state["layers.0.v.weight"] + 4 * b @ a)


def test_errors_name_the_problem(tmp_path):
    state = StateDictCheckpoint(base_state())
    a, b = lora_pair(6, 4, 2, 50)
    missing = write_adapter(tmp_path / "missing", {"base_model.model.layers.0.k.lora_A.weight": a,
                                                   "base_model.model.layers.0.k.lora_B.weight": b})
    with pytest.raises(BasinError, match="target module 'layers.0.k'"):
        open_lora(state, missing)
    wrong = write_adapter(tmp_path / "wrong", {"base_model.model.layers.0.v.lora_A.weight": a,
                                               "base_model.model.layers.0.v.lora_B.weight": b})
    with pytest.raises(BasinError, match=r"'layers.0.v'.*\(6, 4\).*\(5, 4\)"):
        open_lora(state, wrong)
    half = write_adapter(tmp_path / "half", {"base_model.model.layers.0.q.lora_A.weight": a})
    with pytest.raises(BasinError, match="not both lora_A and lora_B"):
        read_adapter(half)
    rank = write_adapter(tmp_path / "rank", {"base_model.model.layers.0.q.lora_A.weight": a,
                                             "base_model.model.layers.0.q.lora_B.weight": rand(6, 3)})
    with pytest.raises(BasinError, match="do not form B @ A"):
        read_adapter(rank)
    with pytest.raises(BasinError, match="no such LoRA adapter folder"):
        read_adapter(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BasinError, match="missing adapter_config.json"):
        read_adapter(tmp_path / "empty")
    (tmp_path / "empty" / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    with pytest.raises(BasinError, match="missing adapter_model.safetensors"):
        read_adapter(tmp_path / "empty")
    dora = write_adapter(tmp_path / "dora", {"base_model.model.layers.0.q.lora_A.weight": a,
                                             "base_model.model.layers.0.q.lora_B.weight": b}, use_dora=True)
    with pytest.raises(BasinError, match="DoRA"):
        read_adapter(dora)
    bad_alpha = write_adapter(tmp_path / "alpha", {"base_model.model.layers.0.q.lora_A.weight": a,
                                                   "base_model.model.layers.0.q.lora_B.weight": b}, lora_alpha="x")
    with pytest.raises(BasinError, match="lora_alpha"):
        read_adapter(bad_alpha)
