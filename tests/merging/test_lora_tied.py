"""PEFT adapters that save a full lm_head (mergekit-extract-lora on a tied model, `modules_to_save`) applied to tied
Qwen2-like and Gemma2-like bases through `basin merge`: the adapter's head becomes the output's lm_head, the tie is
broken in config.json, and the output equals W + s B @ A by hand and loads with transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from evaluations.cli import main

Q = "model.layers.0.self_attn.q_proj.weight"
EMBED = "model.embed_tokens.weight"


def tiny_model(kind: str):
    from transformers import Gemma2Config, Gemma2ForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1)
    torch.manual_seed(0)
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True))
    return Gemma2ForCausalLM(Gemma2Config(**common, head_dim=8))  # tied by default; config.json omits the key


def save_base(kind: str, folder: Path) -> dict[str, torch.Tensor]:
    model = tiny_model(kind)
    model.save_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    assert "lm_head.weight" not in state  # tied: transformers saves the embedding only
    return state


def write_adapter(folder: Path, tensors: dict[str, torch.Tensor], **config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], **config}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "adapter_model.safetensors")
    return folder


def merge_cli(tmp_path: Path, model: str) -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "passthrough", "models": [{"model": model}], "dtype": "float32"}))
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--no-progress"]) == 0
    return tmp_path / "out"


HEAD_KEYS = ["base_model.model.lm_head.weight",  # mergekit-extract-lora, PEFT's saved embedding layers
             "base_model.model.lm_head.modules_to_save.default.weight",  # modules_to_save as trained
             "base_model.model.lm_head.modules_to_save.weight"]  # modules_to_save as saved


@pytest.mark.parametrize("kind", ["qwen2", "gemma2"])
@pytest.mark.parametrize("head_key", HEAD_KEYS)
def test_full_lm_head_on_a_tied_base(tmp_path, kind, head_key):
    from transformers import AutoModelForCausalLM

    base = save_base(kind, tmp_path / "base")
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 16, generator=g), torch.randn(base[Q].shape[0], 2, generator=g)
    head = torch.randn(64, 16, generator=g)
    norm = torch.randn(16, generator=g)  # a modules_to_save copy of another module replaces the base's
    adapter = write_adapter(tmp_path / "ad", {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": a,
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": b,
        head_key: head, "base_model.model.model.norm.modules_to_save.default.weight": norm})
    out = merge_cli(tmp_path, f"{tmp_path / 'base'}+{adapter}")
    merged = load_file(out / "model.safetensors")
    assert torch.equal(merged["lm_head.weight"], head)
    assert torch.equal(merged[EMBED], base[EMBED])  # the input embedding is the base's
    assert torch.equal(merged["model.norm.weight"], norm)
    torch.testing.assert_close(merged[Q], base[Q] + 2.0 * b @ a, rtol=0, atol=1e-6)  # s = alpha / r = 2
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.lm_head.weight.detach(), head)
    assert torch.equal(model.get_input_embeddings().weight.detach(), base[EMBED])


def test_lora_factors_on_lm_head_of_a_tied_base(tmp_path):
    """LoRA on lm_head of a tied model: the new lm_head is the embedding plus s B @ A; the embedding is unchanged."""
    base = save_base("qwen2", tmp_path / "base")
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 16, generator=g), torch.randn(64, 2, generator=g)
    adapter = write_adapter(tmp_path / "ad", {"base_model.model.lm_head.lora_A.weight": a,
                                              "base_model.model.lm_head.lora_B.weight": b})
    merged = load_file(merge_cli(tmp_path, f"{tmp_path / 'base'}+{adapter}") / "model.safetensors")
    torch.testing.assert_close(merged["lm_head.weight"], base[EMBED] + 2.0 * b @ a, rtol=0, atol=1e-6)
    assert torch.equal(merged[EMBED], base[EMBED])
    from merging.io.checkpoint import open_checkpoint
    from merging.io.lora import lora_task_vector

    delta = lora_task_vector(adapter, open_checkpoint(str(tmp_path / "base")))
    assert set(delta) == {"lm_head.weight"}
    torch.testing.assert_close(delta["lm_head.weight"], 2.0 * b @ a, rtol=0, atol=1e-6)


def test_lm_head_is_still_refused_on_an_untied_base_without_one(tmp_path, capsys):
    base = save_base("qwen2", tmp_path / "base")
    config = json.loads((tmp_path / "base/config.json").read_text())
    (tmp_path / "base/config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    adapter = write_adapter(tmp_path / "ad", {"base_model.model.lm_head.weight": torch.zeros(64, 16)})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "passthrough",
                                      "models": [{"model": f"{tmp_path / 'base'}+{adapter}"}]}))
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "lm_head" in err and "Traceback" not in err and not (tmp_path / "out").exists()
    assert base


def test_a_real_peft_adapter_with_modules_to_save(tmp_path):
    """PEFT itself writes the adapter (LoRA on q_proj/v_proj, lm_head in modules_to_save) on a tied Qwen2; basin's
    base+adapter gives PEFT's own logits."""
    peft = pytest.importorskip("peft")
    save_base("qwen2", tmp_path / "base")
    from transformers import AutoModelForCausalLM

    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    model.save_pretrained(tmp_path / "ad")
    ids = torch.arange(10).reshape(1, 10)
    with torch.no_grad():
        expected = model(ids).logits
    out = merge_cli(tmp_path, f"{tmp_path / 'base'}+{tmp_path / 'ad'}")
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out)(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
