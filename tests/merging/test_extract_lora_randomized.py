"""extract-lora's randomised SVD path (fixed rank, matrices well above the rank): near the Eckart-Young optimum
(float64 exact truncation as the reference), bit-identical reruns, the per-module report, a round trip through
`basin merge base+OUT` and `peft.PeftModel`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from merging.extraction import extract_lora
from merging.extraction.factorize import LOWRANK_RATIO, OVERSAMPLE, factorize
from merging.pipeline import merge


def _decaying(m: int, n: int, decay: float, seed: int) -> torch.Tensor:
    """U diag(decay^i) V^T with random orthogonal U, V (float64)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64))
    s = decay ** torch.arange(min(m, n), dtype=torch.float64)
    return (u * s) @ v.T


@pytest.mark.parametrize("decay", [0.9, 0.97])
def test_randomised_error_is_close_to_the_eckart_young_optimum(decay):
    d = _decaying(400, 300, decay, seed=0)
    s = np.linalg.svd(d.numpy(), compute_uv=False)  # independent float64 reference
    for r in (8, 32):
        f = factorize(d.float(), r, seed_name="w")
        optimum = float(np.sqrt((s[r:] ** 2).sum() / (s ** 2).sum()))
        assert f.method == "svd_lowrank" and f.rank == r
        assert optimum * (1 - 1e-7) <= f.relative_error <= 1.01 * optimum + 1e-6  # float32 rounding below
        measured = float((d - f.b.double() @ f.a.double()).norm() / d.norm())  # the report's error is measured
        assert f.relative_error == pytest.approx(measured, rel=1e-5)


def test_randomised_path_is_bit_identical_run_to_run_and_seeded_by_name():
    d = torch.randn(512, 384, generator=torch.Generator().manual_seed(1))
    one, two = factorize(d, 16, seed_name="a.weight"), factorize(d, 16, seed_name="a.weight")
    assert one.method == "svd_lowrank"
    assert torch.equal(one.a, two.a) and torch.equal(one.b, two.b) and one.relative_error == two.relative_error
    other = factorize(d, 16, seed_name="b.weight")
    assert not torch.equal(one.a, other.a)  # another sketch ...
    assert other.relative_error == pytest.approx(one.relative_error, rel=1e-2)  # ... as good


def test_exact_svd_for_small_matrices_ranks_near_full_and_auto():
    g = torch.Generator().manual_seed(2)
    assert factorize(torch.randn(200, 200, generator=g), 8).method == "svd"  # 40,000 entries: small
    wide = torch.randn(512, 384, generator=g)
    near = 384 // LOWRANK_RATIO - OVERSAMPLE + 1  # the sketch would be over a quarter of the short side
    assert factorize(wide, near - 1).method == "svd_lowrank" and factorize(wide, near).method == "svd"
    assert factorize(wide, "auto", energy=0.5).method == "svd"


def _llama_pair(root: Path) -> tuple[Path, Path]:
    """A Llama whose matrices take the randomised path at rank 4 (every side >= 4 (4 + 10) = 56, > 65,536 entries),
    and a fine-tune with a decaying-spectrum update on every weight matrix."""
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    transformers.logging.set_verbosity_error()
    cfg = LlamaConfig(vocab_size=64, hidden_size=288, intermediate_size=576, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(root / "base")
    with torch.no_grad():
        for k, (name, p) in enumerate(model.named_parameters()):
            if p.ndim == 2 and "embed" not in name and "lm_head" not in name:
                p.add_(0.05 * _decaying(*p.shape, 0.7, seed=k).float())
    model.save_pretrained(root / "ft")
    return root / "base", root / "ft"


def test_randomised_adapter_round_trips_through_merge_and_peft(tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base, ft = _llama_pair(tmp_path)
    report = extract_lora(ft, base, tmp_path / "one", rank=4, progress=False)
    extract_lora(ft, base, tmp_path / "two", rank=4, progress=False)
    assert {m["svd"] for m in report.modules} == {"svd_lowrank"} and len(report.modules) == 7
    one = (tmp_path / "one" / "adapter_model.safetensors").read_bytes()
    assert one == (tmp_path / "two" / "adapter_model.safetensors").read_bytes()
    written = json.loads((tmp_path / "one" / "extraction.json").read_text())
    assert [m["svd"] for m in written["modules"]] == ["svd_lowrank"] * 7

    merge({"merge_method": "passthrough", "models": [{"model": f"{base}+{tmp_path / 'one'}"}]}, tmp_path / "merged",
          progress=False)
    merged, tuned, original = (load_file(p / "model.safetensors") for p in (tmp_path / "merged", ft, base))
    for m in report.modules:
        delta = tuned[m["tensor"]].double() - original[m["tensor"]].double()
        off = float((merged[m["tensor"]].double() - tuned[m["tensor"]].double()).norm())
        assert off == pytest.approx(m["frobenius_error"], rel=1e-3, abs=1e-6)
        s = torch.linalg.svdvals(delta)
        optimum = float((s[4:] ** 2).sum().sqrt() / delta.norm())
        assert optimum <= m["relative_error"] * (1 + 1e-4) and m["relative_error"] <= 1.01 * optimum + 1e-6

    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), tmp_path / "one").eval()
    merged_model = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, merged_model(ids).logits, atol=1e-4, rtol=0)
