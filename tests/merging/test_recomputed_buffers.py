"""Buffers transformers recomputes (`embeddings.position_ids`, `token_type_ids`, `inv_freq`, ...) and
save_pretrained drops: a base that holds them (all-MiniLM-L6-v2, an older file) merges with fine-tunes saved by
save_pretrained; the planner leaves them out, with a note, and the output loads like both inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from evaluations.cli import main
from merging.pipeline import merge
from tests.merging.conftest import tiny_bert

transformers = pytest.importorskip("transformers")
BUFFER = "embeddings.position_ids"


def _with_buffers(model, folder: Path) -> Path:
    """save_pretrained, then the non-persistent buffers added to the file (as older transformers saved them)."""
    model.save_pretrained(folder, safe_serialization=True)
    state = load_file(folder / "model.safetensors")
    state[BUFFER] = model.embeddings.position_ids.clone()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _names(folder: Path) -> set[str]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return set(f.keys())


def _fine_tune(base: Path, out: Path, steps: int = 1) -> Path:
    """A real fine-tune: Adam steps on the contrastive objective, saved with save_pretrained."""
    from evaluations.model_losses import CONTRASTIVE

    model = transformers.BertModel.from_pretrained(base)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, min(model.config.vocab_size, 1000), (4, 8), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pair_input_ids": ids.flip(1),
             "pair_attention_mask": torch.ones_like(ids)}
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        loss, _ = CONTRASTIVE.batch_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().save_pretrained(out, safe_serialization=True)
    return out


@pytest.mark.parametrize("recipe", ["linear", "task_arithmetic", "slices"])
def test_tiny_bert_base_with_buffers_merges_with_save_pretrained_fine_tunes(tmp_path, recipe):
    base = _with_buffers(tiny_bert(0), tmp_path / "base")
    fts = [_fine_tune(base, tmp_path / f"ft{i}") for i in (0, 1)]
    assert BUFFER in _names(base) and BUFFER not in _names(fts[0])
    refs = [str(base), *map(str, fts)]
    if recipe == "slices":
        spec = {"merge_method": "passthrough", "dtype": "float32", "slices": [
            {"sources": [{"model": refs[0], "layer_range": [0, 1]}]},
            {"sources": [{"model": refs[1], "layer_range": [1, 2]}]}]}
    else:
        spec = {"merge_method": recipe, "dtype": "float32",
                "models": [{"model": r, "parameters": {"weight": 1 / 3}} for r in refs]}
        if recipe == "task_arithmetic":
            spec |= {"base_model": refs[0], "models": [{"model": r, "parameters": {"weight": 0.5}} for r in refs[1:]]}
    report = merge(spec, tmp_path / "out", progress=False)
    assert report.notes == [f"left out {BUFFER}: a buffer transformers recomputes (not saved by save_pretrained), "
                            f"absent from {', '.join(refs[1:]) if recipe != 'slices' else refs[1]}"]
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert BUFFER not in out and set(out) == _names(fts[0])
    states = [load_file(Path(r) / "model.safetensors") for r in refs]
    name = "encoder.layer.0.attention.self.query.weight"
    if recipe == "linear":
        want = sum(s[name].double() for s in states) / 3
    elif recipe == "task_arithmetic":
        want = states[0][name].double() + sum(0.5 * (s[name].double() - states[0][name].double()) for s in states[1:])
    else:
        want = states[0][name].double()
    torch.testing.assert_close(out[name].double(), want, atol=1e-6, rtol=0)
    merged = transformers.BertModel.from_pretrained(tmp_path / "out")
    assert torch.equal(merged.embeddings.position_ids, torch.arange(40).expand(1, -1))


def test_every_input_holding_the_buffer_keeps_it_and_no_note(tmp_path):
    a, b = (_with_buffers(tiny_bert(s), tmp_path / f"m{s}") for s in (0, 1))
    report = merge({"merge_method": "linear", "dtype": "float32",
                    "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in (a, b)]},
                   tmp_path / "out", progress=False)
    assert report.notes == [] and "notes" not in report.plan.to_json()
    assert torch.equal(load_file(tmp_path / "out" / "model.safetensors")[BUFFER], torch.arange(40).expand(1, -1))


def test_real_minilm_plus_its_save_pretrained_fine_tune(minilm_dir, tmp_path, capsys):
    """`basin merge` linear of all-MiniLM-L6-v2 (its file holds embeddings.position_ids) and a fine-tune saved with
    save_pretrained (which drops it) failed with "tensor names differ"; it merges, and each weight is the mean."""
    ft = _fine_tune(minilm_dir, tmp_path / "ft")
    assert BUFFER in _names(minilm_dir) and BUFFER not in _names(ft)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: linear\ndtype: float32\nmodels:\n  - model: {minilm_dir}\n    parameters: "
                      f"{{weight: 0.5}}\n  - model: {ft}\n    parameters: {{weight: 0.5}}\n")
    assert main(["merge", str(recipe), str(tmp_path / "out")]) == 0
    assert f"note: left out {BUFFER}: a buffer transformers recomputes" in capsys.readouterr().out
    out = load_file(tmp_path / "out" / "model.safetensors")
    a, b = load_file(minilm_dir / "model.safetensors"), load_file(ft / "model.safetensors")
    assert set(out) == set(b)
    for name in ("embeddings.word_embeddings.weight", "encoder.layer.5.output.dense.weight"):
        torch.testing.assert_close(out[name].double(), (a[name].double() + b[name].double()) / 2, atol=1e-7, rtol=0)
    merged = transformers.BertModel.from_pretrained(tmp_path / "out")
    assert torch.equal(merged.embeddings.position_ids, torch.arange(merged.config.max_position_embeddings)[None])
