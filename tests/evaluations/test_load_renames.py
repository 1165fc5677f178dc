"""Checkpoint names transformers renames on load (its conversion mapping) are read by the evaluator too:
GPT-NeoX's `embed_out` head (every Pythia checkpoint), older checkpoints' `LayerNorm.gamma`/`.beta`; tensors it
would fuse (Mixtral's per-expert weights) are a one-line error naming one of them."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from evaluations.cli import main
from evaluations.models import load_model
from taxonomy.errors import CheckpointError
from tests.merging.conftest import tiny_family


def _saved(name: str, folder, seed: int = 0):
    model = tiny_family(name, seed)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def test_gpt_neox_embed_out_is_read_as_lm_head(tmp_path):
    import transformers

    model = _saved("gpt_neox", tmp_path / "neox")
    names = set(load_file(tmp_path / "neox" / "model.safetensors"))
    assert "embed_out.weight" in names and "lm_head.weight" not in names  # as transformers writes it
    ours = load_model(tmp_path / "neox")
    theirs = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path / "neox").eval()
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)
        assert torch.equal(ours.lm_head.weight, model.lm_head.weight)


def test_legacy_layernorm_gamma_beta_names(tmp_path):
    import transformers

    model = _saved("bert", tmp_path / "bert")
    state = load_file(tmp_path / "bert" / "model.safetensors")
    legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
              for k, v in state.items()}
    assert legacy.keys() != state.keys()
    save_file(legacy, tmp_path / "bert" / "model.safetensors", metadata={"format": "pt"})
    ours = load_model(tmp_path / "bert")
    theirs = transformers.BertModel.from_pretrained(tmp_path / "bert").eval()
    ids = torch.tensor([[2, 4, 6, 8]])
    with torch.no_grad():
        assert torch.equal(ours(ids).last_hidden_state, theirs(ids).last_hidden_state)
        assert torch.equal(ours(ids).last_hidden_state, model(ids).last_hidden_state)


def test_fused_experts_are_assembled_as_transformers_loads_them(tmp_path):
    """Mixtral's per-expert w1/w3/w2 (as `save_pretrained` and `basin moe` write them) become the model's stacked
    `gate_up_proj` / `down_proj`: logits equal `from_pretrained`'s; a path point equals a model loaded by
    transformers from the hand-interpolated stored tensors (float64, cast to float32 as both load it)."""
    import transformers

    from evaluations.landscape import evaluate_path, linear_path
    from evaluations.measure import measure_loss
    from evaluations.text_data import load_data
    from tests.merging.test_vocab_llama import word_tokenizer

    words = [f"w{i}" for i in range(40)]
    for s in (0, 1):
        _saved("mixtral", tmp_path / f"mx{s}", seed=s)
        word_tokenizer(words).save_pretrained(tmp_path / f"mx{s}")
    stored = load_file(tmp_path / "mx0" / "model.safetensors")
    assert any(".experts.0.w1.weight" in k for k in stored)  # per-expert parts on disk
    ours = load_model(tmp_path / "mx0")
    theirs = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "mx0", dtype=torch.float32).eval()
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for name, t in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], t), name
    (tmp_path / "calib.txt").write_text(" ".join(words[i % 40] for i in range(0, 400, 7)) + "\n")
    data = load_data(ours, tmp_path / "calib.txt", seq_len=8, batch_size=2)
    at_a = measure_loss(ours, data).loss
    result = evaluate_path(ours, linear_path(tmp_path / "mx0", tmp_path / "mx1"), data, alphas=[0.3])
    a, b = (load_file(tmp_path / f"mx{s}" / "model.safetensors") for s in (0, 1))
    mid = {k: (0.7 * a[k].double() + 0.3 * b[k].double()) for k in a}
    (tmp_path / "mid").mkdir()
    save_file(mid, tmp_path / "mid" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "mid" / "config.json").write_text((tmp_path / "mx0" / "config.json").read_text())
    ref = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "mid", dtype=torch.float32).eval()
    # float32 (Mixtral's grouped expert matmul has no float64): the point's fused float64 sum may round an entry
    # to the neighbouring float32 of the reference's, so the losses agree to float32 precision
    assert result.loss[0] == pytest.approx(measure_loss(ref, data).loss, rel=1e-6)
    assert result.loss[0] != pytest.approx(at_a, rel=1e-3)  # the point is not the end point


def test_unreadable_fusion_is_a_one_line_error(tmp_path, capsys):
    """An expert index missing from the stored parts: the fused tensor is missing, named with one part."""
    _saved("mixtral", tmp_path / "mx")
    state = load_file(tmp_path / "mx" / "model.safetensors")
    del state["model.layers.0.block_sparse_moe.experts.1.w3.weight"]
    save_file(state, tmp_path / "mx" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="transformers fuses on load .*experts.0.w1.weight") as err:
        load_model(tmp_path / "mx")
    assert "\n" not in str(err.value)
    (tmp_path / "calib.txt").write_text("a b c d e f g h " * 20)
    config = json.loads((tmp_path / "mx" / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    capsys.readouterr()  # transformers' own progress bars from the save
    assert main(["hessian", str(tmp_path / "mx"), "--data", str(tmp_path / "calib.txt"), "--seq-len", "8"]) == 2
    err = capsys.readouterr().err
    assert "fuses on load" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
