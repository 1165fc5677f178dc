"""`basin extract-lora`: SVD factors against a float64 reference, round trips through `basin merge` (base+adapter)
and `peft.PeftModel`, on Llama, GPT-2 (Conv1D, tied head), Qwen2 (biases) and bfloat16; the summary; bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from merging.extraction import extract_lora
from merging.extraction.factorize import factorize
from merging.pipeline import merge
from taxonomy.errors import BasinError
from tests.merging.conftest import tiny_family


def _save(model, folder: Path, dtype: torch.dtype) -> Path:
    import transformers

    transformers.logging.set_verbosity_error()
    model.to(dtype).save_pretrained(folder, safe_serialization=True)
    return folder


def _pair(root: Path, family: str, dtype: torch.dtype = torch.float32, keep: tuple[str, ...] = ()):
    """A tiny base and a fine-tune of it (every parameter moved, except those whose name contains one of `keep`)."""
    base, tuned = tiny_family(family, 0), tiny_family(family, 0)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            noise = 0.05 * torch.randn(p.shape, generator=g)
            if not any(k in name for k in keep):
                p.add_(noise)
    return _save(base, root / "base", dtype), _save(tuned, root / "ft", dtype)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _merge_adapter(base: Path, adapter: Path, out: Path) -> dict[str, torch.Tensor]:
    merge({"merge_method": "passthrough", "models": [{"model": f"{base}+{adapter}"}]}, out, progress=False)
    return _tensors(out)


# --- numerics: against numpy's float64 SVD ------------------------------------------------------------------------

def test_factors_match_float64_truncated_svd_at_every_rank():
    d = torch.randn(12, 9, generator=torch.Generator().manual_seed(0))
    u, s, vh = np.linalg.svd(d.double().numpy(), full_matrices=False)
    total = float((s ** 2).sum())
    for r in range(1, 10):
        f = factorize(d, r)
        reference = (u[:, :r] * s[:r]) @ vh[:r]
        np.testing.assert_allclose((f.b @ f.a).double().numpy(), reference, atol=2e-5)
        assert f.rank == r and f.a.shape == (r, 9) and f.b.shape == (12, r)
        assert f.frobenius_error == pytest.approx(float(np.sqrt((s[r:] ** 2).sum())), rel=1e-4, abs=1e-5)
        assert f.kept_energy == pytest.approx(float((s[:r] ** 2).sum()) / total, rel=1e-6)
    assert factorize(d, 9).relative_error < 1e-6  # full rank: float32 rounding


@pytest.mark.parametrize("energy", [0.3, 0.5, 0.9, 0.99])
def test_auto_rank_is_the_smallest_reaching_the_energy(energy):
    d = torch.randn(20, 14, generator=torch.Generator().manual_seed(1)) * torch.linspace(3, 0.1, 14)
    s = np.linalg.svd(d.double().numpy(), compute_uv=False)
    brute = next(r for r in range(1, 15) if (s[:r] ** 2).sum() / (s ** 2).sum() >= energy)
    f = factorize(d, "auto", energy=energy)
    assert f.rank == brute and f.kept_energy >= energy


def test_sv_epsilon_drops_small_singular_values_and_zero_delta_keeps_nothing():
    d = torch.randn(10, 8, generator=torch.Generator().manual_seed(2))
    s = torch.linalg.svdvals(d)
    eps = float(s[3] + s[4]) / 2  # between the 4th and 5th singular value
    assert factorize(d, 8, sv_epsilon=eps).rank == 4
    assert factorize(d, 8, sv_epsilon=float(s[0]) + 1).rank == 0
    assert factorize(torch.zeros(5, 4), 2).rank == 0


def test_randomised_path_is_exact_on_low_rank_input_and_seeded():
    g = torch.Generator().manual_seed(3)
    d = torch.randn(300, 5, generator=g) @ torch.randn(5, 200, generator=g)
    f = factorize(d, 5, exact_limit=0, seed_name="x.weight")
    again = factorize(d, 5, exact_limit=0, seed_name="x.weight")
    assert f.method == "svd_lowrank" and f.relative_error < 1e-5
    assert torch.equal(f.a, again.a) and torch.equal(f.b, again.b)
    auto = factorize(d, "auto", energy=0.999, exact_limit=0, seed_name="x.weight")
    assert auto.rank == 5 and auto.method == "svd_lowrank"


# --- round trips ----------------------------------------------------------------------------------------------------

CASES = [("llama", torch.float32), ("gpt2", torch.float32), ("qwen2", torch.float32), ("llama", torch.bfloat16)]


@pytest.mark.parametrize("family,dtype", CASES, ids=[f"{f}-{str(d)[6:]}" for f, d in CASES])
def test_full_rank_round_trip_through_merge_and_peft(tmp_path, family, dtype):
    from peft import PeftModel

    base, ft = _pair(tmp_path, family, dtype)
    report = extract_lora(ft, base, tmp_path / "lora", rank="auto", energy=1.0, progress=False)
    assert report.modules and all(m["rank"] == min(m["shape"]) for m in report.modules)
    merged = _merge_adapter(base, tmp_path / "lora", tmp_path / "merged")
    tuned = _tensors(ft)
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    for name, w in tuned.items():
        torch.testing.assert_close(merged[name].float(), w.float(), atol=tol * max(1.0, float(w.abs().max())),
                                   rtol=0)
    if family == "gpt2":  # tied head: the adapter's head is the fine-tune's embedding, the output untied
        assert torch.equal(merged["lm_head.weight"], tuned["transformer.wte.weight"])
        assert report.full[-1]["key"] == "lm_head.weight"
    cls = type(tiny_family(family, 0))
    peft_model = PeftModel.from_pretrained(cls.from_pretrained(base), tmp_path / "lora").eval()
    merged_model = cls.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = peft_model(ids).logits.float(), merged_model(ids).logits.float()
    torch.testing.assert_close(a, b, atol=1e-4 if dtype == torch.float32 else 0.1, rtol=0)


def test_low_rank_merge_is_off_by_exactly_the_reported_error(tmp_path):
    base, ft = _pair(tmp_path, "llama")
    report = extract_lora(ft, base, tmp_path / "lora", rank=4, progress=False)
    merged, tuned = _merge_adapter(base, tmp_path / "lora", tmp_path / "merged"), _tensors(ft)
    for m in report.modules:
        off = float((merged[m["tensor"]].double() - tuned[m["tensor"]].double()).norm())
        assert m["rank"] == 4 and off == pytest.approx(m["frobenius_error"], rel=1e-4)
        assert 0 < m["relative_error"] < 1 and 0 < m["kept_energy"] < 1
    for f in report.full:  # saved whole: exact
        assert torch.equal(merged[f["tensor"]], tuned[f["tensor"]])
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 4 and config["rank_pattern"] == {}
    assert set(config["target_modules"]) == {m["module"] for m in report.modules}
    assert "model.norm" in config["modules_to_save"] and "lm_head" in config["modules_to_save"]


def test_auto_ranks_differ_per_module_and_peft_reads_them(tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base, ft = _pair(tmp_path, "llama")
    report = extract_lora(ft, base, tmp_path / "lora", rank="auto", energy=0.8, progress=False)
    ranks = {m["module"]: m["rank"] for m in report.modules}
    assert len(set(ranks.values())) > 1 and all(m["kept_energy"] >= 0.8 for m in report.modules)
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), tmp_path / "lora")
    modules = dict(model.base_model.model.named_modules())
    for name, r in ranks.items():
        assert modules[name].lora_A["default"].weight.shape[0] == r
        assert modules[name].scaling["default"] == 1.0


# --- the summary: nothing dropped silently --------------------------------------------------------------------------

def test_every_tensor_is_listed_once_and_the_report_is_written(tmp_path):
    base, ft = _pair(tmp_path, "qwen2", keep=("model.norm", "layers.0.input_layernorm"))
    report = extract_lora(ft, base, tmp_path / "lora", rank=4, exclude=["mlp"], progress=False)
    names = ([m["tensor"] for m in report.modules] + [f["tensor"] for f in report.full] + report.unchanged
             + [d["tensor"] for d in report.dropped] + report.excluded)
    assert sorted(names) == sorted(_tensors(ft))
    assert set(report.unchanged) == {"model.norm.weight", "model.layers.0.input_layernorm.weight"}
    assert len(report.excluded) == 12 and all(".mlp." in n for n in report.excluded)
    biases = {f["key"] for f in report.full if f["reason"] == "parameter of a LoRA module"}
    assert "model.layers.0.self_attn.q_proj.base_layer.bias" in biases
    written = json.loads((tmp_path / "lora" / "extraction.json").read_text())
    assert written["modules"] == json.loads(json.dumps(report.to_json()))["modules"]
    keys = set(load_file(tmp_path / "lora" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert not any(".mlp." in k for k in keys) and "base_model.model.model.norm.weight" not in keys


def test_embed_lora_factorises_embeddings_and_heads(tmp_path):
    base, ft = _pair(tmp_path, "llama")
    report = extract_lora(ft, base, tmp_path / "lora", rank=8, embed_lora=True, progress=False)
    kinds = {m["module"]: m["kind"] for m in report.modules}
    assert kinds["model.embed_tokens"] == "embedding" and kinds["lm_head"] == "linear"
    keys = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert keys["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (8, 64)
    assert keys["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (16, 8)
    merged, tuned = _merge_adapter(base, tmp_path / "lora", tmp_path / "merged"), _tensors(ft)
    off = float((merged["model.embed_tokens.weight"] - tuned["model.embed_tokens.weight"]).double().norm())
    assert off == pytest.approx(next(m for m in report.modules if m["kind"] == "embedding")["frobenius_error"],
                                rel=1e-4)


def test_deterministic_and_dry_run_writes_nothing(tmp_path):
    base, ft = _pair(tmp_path, "gpt2")
    extract_lora(ft, base, tmp_path / "one", rank=3, progress=False)
    extract_lora(ft, base, tmp_path / "two", rank=3, progress=False)
    one = (tmp_path / "one" / "adapter_model.safetensors").read_bytes()
    assert one == (tmp_path / "two" / "adapter_model.safetensors").read_bytes()
    report = extract_lora(ft, base, tmp_path / "three", rank=3, dry_run=True)
    assert report.dry_run and report.modules and not (tmp_path / "three").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft", "one", "two"]


def test_model_card_lists_inputs_settings_and_every_module(tmp_path):
    """README.md: base, fine-tune, rank, one row per LoRA module with the report's rank and error; the same bytes
    for a rerun into another folder."""
    base, ft = _pair(tmp_path, "gpt2")
    report = extract_lora(ft, base, tmp_path / "one", rank=3, progress=False)
    extract_lora(ft, base, tmp_path / "two", rank=3, progress=False)
    card = (tmp_path / "one" / "README.md").read_text()
    assert card == (tmp_path / "two" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\ntags:\n- lora\n")
    assert f"| `{ft}` | local | - |" in card and f"| `{base}` | local | - |" in card
    assert "- rank: 3 (every module)" in card and f"`{report.content_hash}`" in card
    for m in report.modules:
        shape = "x".join(map(str, m["shape"]))
        assert f"| `{m['module']}` | {m['kind']} | {shape} | 3 | {m['relative_error']:.4g} |" in card
    errors = sorted(m["relative_error"] for m in report.modules)
    assert f"max {errors[-1]:.4g}" in card and "saved whole: `transformer.wte.weight`" in card
    assert str(tmp_path / "one") not in card


# --- bad input: one line, exit 2, nothing written -------------------------------------------------------------------

def test_bad_input_errors(tmp_path):
    base, ft = _pair(tmp_path, "llama")
    with pytest.raises(BasinError, match=r"'model.layers.0.self_attn.k_proj.weight' is 8 x 16: rank 9 is larger"):
        extract_lora(ft, base, tmp_path / "o", rank=9)
    with pytest.raises(BasinError, match=r"--include 'nothing_here' matches no module"):
        extract_lora(ft, base, tmp_path / "o", include=["nothing_here"])
    with pytest.raises(BasinError, match=r"--exclude '\(' : not a regular expression|--exclude '\(': not a regular"):
        extract_lora(ft, base, tmp_path / "o", exclude=["("])
    with pytest.raises(BasinError, match="--energy is the target of --rank auto"):
        extract_lora(ft, base, tmp_path / "o", rank=4, energy=0.5)
    other = tmp_path / "other"
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=4, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=False)
    _save(LlamaForCausalLM(cfg), other, torch.float32)
    with pytest.raises(BasinError, match=r"tensor 'model.layers.0.mlp.down_proj.weight': shape \[16, 32\] in the "
                                         r"fine-tune .* \[16, 24\] in the base"):
        extract_lora(ft, other, tmp_path / "o", rank=4)
    assert not (tmp_path / "o").exists()
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "keep.txt").write_text("mine")
    with pytest.raises(BasinError, match="output folder exists"):
        extract_lora(ft, base, tmp_path / "exists", rank=4)
    assert [p.name for p in (tmp_path / "exists").iterdir()] == ["keep.txt"]
    extract_lora(ft, base, tmp_path / "exists", rank=4, overwrite=True, progress=False)
    assert (tmp_path / "exists" / "adapter_config.json").is_file()


def test_cli_one_line_errors_and_success(tmp_path, capsys):
    from evaluations.cli import main

    base, ft = _pair(tmp_path, "llama")
    capsys.readouterr()  # save_pretrained's progress bars
    assert main(["extract-lora", str(ft), str(base), str(tmp_path / "o"), "--rank", "40"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rank 40 is larger than the matrix" in err
    assert main(["extract-lora", str(ft), str(base), str(tmp_path / "o"), "--rank", "zero"]) == 2
    assert "positive integer or 'auto'" in capsys.readouterr().err
    assert main(["extract-lora", str(ft), str(base), str(tmp_path / "o"), "--rank", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in out and "saved whole: model.norm.weight" in out
    assert main(["extract-lora", str(ft), str(base), str(tmp_path / "o"), "--rank", "2"]) == 2
    assert "output folder exists" in capsys.readouterr().err
