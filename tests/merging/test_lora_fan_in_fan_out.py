"""`fan_in_fan_out` per module, as PEFT applies it: PEFT sets it from each wrapped module's type (True for
transformers' Conv1D, False for nn.Linear) whatever adapter_config.json says. basin's `base+adapter` must give
PeftModel's merged weights for GPT-2 (Conv1D, square and not, with an untied nn.Linear head in the same adapter) and
Llama (square q_proj), under either config value; and the Conv1D table must agree with transformers."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch

from merging import open_checkpoint
from merging.architectures import CONV1D_MODULES, is_conv1d

TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc", "lm_head"], "llama": ["q_proj", "k_proj", "down_proj", "lm_head"]}


def _base(family: str):
    import transformers

    torch.manual_seed(0)
    if family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=16,
                                      tie_word_embeddings=False)
        return transformers.GPT2LMHeadModel(cfg).eval()
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """family -> (base folder, adapter folder): random A and B (init_lora_weights=False) on every target."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("fifo")
    out = {}
    for family, targets in TARGETS.items():
        _base(family).save_pretrained(root / f"{family}-base", safe_serialization=True)
        torch.manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = get_peft_model(_base(family), LoraConfig(r=3, lora_alpha=6, target_modules=targets,
                                                                  init_lora_weights=False))
            peft_model.save_pretrained(root / f"{family}-lora")  # the head also saved whole (base_layer.weight)
        out[family] = (root / f"{family}-base", root / f"{family}-lora")
    return out


def _peft_merged(base: Path, adapter: Path, family: str) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(type(_base(family)).from_pretrained(base), adapter).merge_and_unload()
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("flag", [True, False])
def test_base_plus_adapter_equals_peft_merge_whatever_the_config_says(tmp_path, adapters, family, flag):
    base, adapter = adapters[family]
    copy = tmp_path / "lora"
    copy.mkdir()
    for f in adapter.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    config = json.loads((copy / "adapter_config.json").read_text())
    config["fan_in_fan_out"] = flag
    (copy / "adapter_config.json").write_text(json.dumps(config))
    want = _peft_merged(base, copy, family)
    ckpt = open_checkpoint(f"{base}+{copy}")
    changed = 0
    before = open_checkpoint(base)
    for name in ckpt.names():
        got = ckpt.get(name)
        torch.testing.assert_close(got, want[name], rtol=0, atol=1e-6, msg=name)
        changed += not torch.equal(got, before.get(name))
    assert changed == {"gpt2": 9, "llama": 7}[family]  # 2 layers x (c_attn, 2 c_proj, c_fc | q, k, down) + head


def test_square_module_without_a_model_type_follows_the_config(tmp_path, adapters):
    """A bare base (no config.json): non-square updates fit one way only; a square one follows fan_in_fan_out."""
    from merging.io.lora import LoraModule, _transposed

    a, b = torch.ones(2, 16), torch.ones(16, 2)
    lm = LoraModule("m", a, b, 1.0, transpose=True)
    assert _transposed(lm, "h.0.attn.c_proj", (16, 16), None) is True
    assert _transposed(LoraModule("m", a, b, 1.0), "h.0.attn.c_proj", (16, 16), None) is False
    tall = LoraModule("m", torch.ones(2, 16), torch.ones(48, 2), 1.0)
    assert _transposed(tall, "x", (16, 48), None) is True and _transposed(tall, "x", (48, 16), None) is False
    assert _transposed(lm, "model.layers.0.self_attn.q_proj", (16, 16), {"model_type": "llama"}) is False
    assert _transposed(LoraModule("m", a, b, 1.0), "transformer.h.3.mlp.c_proj", (16, 16),
                       {"model_type": "gpt2"}) is True


@pytest.mark.parametrize("model_type", [*CONV1D_MODULES, "llama", "gpt_neox", "bert", "qwen2"])
def test_conv1d_table_agrees_with_transformers(model_type):
    import transformers
    from transformers.pytorch_utils import Conv1D

    cfg = transformers.AutoConfig.for_model(model_type)
    for key in ("n_layer", "num_hidden_layers"):
        if isinstance(getattr(cfg, key, None), int):
            setattr(cfg, key, 1)
    if model_type == "gpt2":
        cfg.add_cross_attention = True
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModel.from_config(cfg)
    names = [n for n, _ in model.named_modules() if n]
    conv = {n for n, m in model.named_modules() if isinstance(m, Conv1D)}
    assert {n for n in names if is_conv1d(n, {"model_type": model_type})} == conv
    assert (model_type in CONV1D_MODULES) == bool(conv)
    if model_type == "gpt2":
        assert any(re.search(r"crossattention\.q_attn$", n) for n in conv)


def test_extracted_gpt2_adapter_keeps_linear_and_conv1d_modules_as_lora(tmp_path):
    """extract-lora on a GPT-2 with an untied head and embed_lora: the head (nn.Linear) is LoRA beside the Conv1D
    modules (PEFT orients each), and PeftModel's merge at full rank gives the fine-tune back."""
    from merging.extraction import extract_lora

    base, tuned = _base("gpt2"), _base("gpt2")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    base.save_pretrained(tmp_path / "base", safe_serialization=True)
    tuned.save_pretrained(tmp_path / "ft", safe_serialization=True)
    report = extract_lora(tmp_path / "ft", tmp_path / "base", tmp_path / "lora", rank=16, embed_lora=True,
                          progress=False)
    kinds = {m["module"]: m["kind"] for m in report.modules}
    assert kinds["lm_head"] == "linear" and kinds["transformer.h.0.attn.c_attn"] == "conv1d"
    merged, want = _peft_merged(tmp_path / "base", tmp_path / "lora", "gpt2"), tuned.state_dict()
    for name in ("lm_head.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.weight"):
        torch.testing.assert_close(merged[name], want[name], rtol=0, atol=1e-5, msg=name)
    ckpt = open_checkpoint(f"{tmp_path / 'base'}+{tmp_path / 'lora'}")
    torch.testing.assert_close(ckpt.get("lm_head.weight"), want["lm_head.weight"], rtol=0, atol=1e-5)
