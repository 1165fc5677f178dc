"""Issue 21: `basin hessian MODEL --operator ... --params` and `basin ntk MODEL` on a tiny Llama checkpoint.

References: eigvalsh of the dense operator built from the same checkpoint and text; the NTK from an explicit
Jacobian (torch.func.jacrev) of the next-token logits (float64)."""

from __future__ import annotations

import json

import pytest
import torch
from torch.func import functional_call, jacrev

from evaluations.cli import main
from evaluations.model_losses import CAUSAL_LM
from evaluations.models import load_model
from evaluations.probes import GGNOperator
from evaluations.probes.attention import math_attention
from evaluations.probes.objective_ntk import objective_ntk
from evaluations.text_data import load_data
from taxonomy.errors import ProbeError
from tests.merging.test_vocab_llama import word_tokenizer

WORDS = ["<unk>", "<s>", "</s>", "apple", "banana", "cherry", "date", "elder", "fig", "grape"]
TEXT = "apple banana cherry date elder fig grape apple fig date\nbanana cherry grape elder apple\n"
NORM = r"model\.layers\.1\.post_attention_layernorm"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("curv")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=32)).eval()
    model.save_pretrained(root / "llama", safe_serialization=True)
    word_tokenizer(WORDS).save_pretrained(root / "llama")
    (root / "calib.txt").write_text(TEXT)
    return root / "llama", root / "calib.txt"


def test_basin_hessian_ggn_on_a_checkpoint_matches_the_dense_operator(llama, tmp_path, capsys):
    ckpt, calib = llama
    out = tmp_path / "g.json"
    argv = ["hessian", str(ckpt), "--data", str(calib), "--operator", "ggn", "--params", NORM, "--top-k", "2",
            "--tol", "1e-6", "--seq-len", "8", "--batch-size", "1", "--dtype", "float64", "--json", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "model LlamaForCausalLM (float64, cpu); objective: causal LM next-token cross-entropy" in text
    assert "2 examples of 8 tokens, 13 predicted tokens" in text and "ggn: 16 parameters" in text
    result = json.loads(out.read_text())
    model = load_model(ckpt, dtype="float64")
    batches = load_data(model, calib, seq_len=8, batch_size=1)
    dense = GGNOperator(model, CAUSAL_LM, batches, params=NORM).dense()
    top = torch.linalg.eigvalsh(dense).flip(0)[:2]
    assert result["eigen"]["converged"] and result["rows"] == 13 and result["operator"] == "ggn"
    torch.testing.assert_close(torch.tensor(result["eigen"]["values"], dtype=torch.float64), top, rtol=1e-6, atol=0)


@pytest.mark.parametrize("operator", ["hessian", "fisher", "mc_fisher"])
def test_basin_hessian_every_operator_runs_on_a_checkpoint(llama, tmp_path, capsys, operator):
    ckpt, calib = llama
    out = tmp_path / "o.json"
    assert main(["hessian", str(ckpt), "--data", str(calib), "--operator", operator, "--params", NORM, "-k", "1",
                 "--seq-len", "8", "--block-diagonal", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["block_diagonal"] and result["params"] == 16 and result["eigen"]["converged"]
    assert result["eigen"]["values"][0] > 0
    assert "1 diagonal blocks" in capsys.readouterr().out


def test_basin_hessian_bad_input_is_one_line(llama, capsys):
    ckpt, calib = llama
    assert main(["hessian", str(ckpt), "--data", str(calib), "--params", r"encoder\.x", "--seq-len", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "'encoder\\\\.x' selects no trainable parameter" in err and len(err.splitlines()) == 1
    assert main(["hessian", str(ckpt), "--seq-len", "8"]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["hessian", "--operator", "kfc"]) == 2
    assert "invalid choice: 'kfc'" in capsys.readouterr().err


def test_objective_ntk_matches_the_explicit_jacobian(llama):
    ckpt, calib = llama
    model = load_model(ckpt, dtype="float64")
    batches = load_data(model, calib, seq_len=8, batch_size=2)
    sel = r"model\.layers\.0\.self_attn\.o_proj"
    state = {**{n: p.detach() for n, p in model.named_parameters()}, **dict(model.named_buffers())}
    params = {n: state[n] for n in ("model.layers.0.self_attn.o_proj.weight",)}
    batch = batches[0]
    keep = batch["labels"][:, 1:] != -100

    def f(p):
        logits = functional_call(model, {**state, **p}, (), {"input_ids": batch["input_ids"],
                                                             "attention_mask": batch["attention_mask"]}).logits
        return logits[:, :-1][keep][:5]

    with math_attention():
        jac = jacrev(f)(params)["model.layers.0.self_attn.o_proj.weight"].reshape(5, len(WORDS), -1)
    targets = batch["labels"][:, 1:][keep][:5]
    every = objective_ntk(model, CAUSAL_LM, batches, rows=5, params=sel, outputs="all")
    torch.testing.assert_close(every.kernel, torch.einsum("rcp,scp->rs", jac, jac), rtol=1e-10, atol=1e-12)
    target = objective_ntk(model, CAUSAL_LM, batches, rows=5, params=sel, outputs="target")
    jt = jac[torch.arange(5), targets]
    torch.testing.assert_close(target.kernel, jt @ jt.T, rtol=1e-10, atol=1e-12)
    assert target.products == 5 and every.products == 5 * len(WORDS)
    with pytest.raises(ProbeError, match="max_vjps"):
        objective_ntk(model, CAUSAL_LM, batches, rows=5, params=sel, outputs="all", max_vjps=10)


def test_basin_ntk_on_a_checkpoint(llama, tmp_path, capsys):
    ckpt, calib = llama
    out = tmp_path / "k.json"
    assert main(["ntk", str(ckpt), "--data", str(calib), "--rows", "4", "--params", NORM, "--seq-len", "8",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    kernel = torch.tensor(result["kernel"])
    assert kernel.shape == (4, 4) and result["params"] == 16 and result["products"] == 4
    torch.testing.assert_close(kernel, kernel.T)
    assert result["bottom_eigenvalue"] >= -1e-6 * result["top_eigenvalue"]
    assert "LlamaForCausalLM" in capsys.readouterr().out


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_basin_hessian_kfac_on_a_checkpoint_matches_the_operator(llama, tmp_path, approx):
    from evaluations.probes import KFACOperator

    ckpt, calib = llama
    out = tmp_path / "k.json"
    assert main(["hessian", str(ckpt), "--data", str(calib), "--operator", "kfac", "--params", "lm_head", "-k", "2",
                 "--tol", "1e-6", "--seq-len", "8", "--batch-size", "1", "--dtype", "float64",
                 "--kfac-approx", approx, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    model = load_model(ckpt, dtype="float64")
    op = KFACOperator(model, CAUSAL_LM, load_data(model, calib, seq_len=8, batch_size=1), params="lm_head",
                      kfac_approx=approx)
    top = torch.linalg.eigvalsh(op.matmat(torch.eye(op.size, dtype=torch.float64))).flip(0)[:2]
    assert result["operator"] == "kfac" and result["eigen"]["converged"] and result["kfac_approx"] == approx
    torch.testing.assert_close(torch.tensor(result["eigen"]["values"], dtype=torch.float64), top, rtol=1e-6, atol=0)


@pytest.mark.parametrize("operator, params", [("hessian", r"model\.layers\.\d\.\w+_layernorm"), ("ggn", NORM)])
def test_basin_hessian_bottom_k_matches_eigvalsh(llama, tmp_path, capsys, operator, params):
    """`--which bottom --k 2`: Lanczos on the low end; converged means each value is within its rigorous error
    bound of an eigenvalue and, by interlacing, at or above the i-th smallest (eigvalsh of the dense operator)."""
    from evaluations.probes import curvature_operator

    ckpt, calib = llama
    out = tmp_path / "b.json"
    argv = ["hessian", str(ckpt), "--data", str(calib), "--operator", operator, "--params", params, "--which",
            "bottom", "--k", "2", "--tol", "1e-4", "--seq-len", "8", "--batch-size", "2", "--dtype", "float64",
            "--json", str(out)]
    assert main(argv) == 0
    assert f"{operator}: " in capsys.readouterr().out
    result = json.loads(out.read_text())
    model = load_model(ckpt, dtype="float64")
    batches = load_data(model, calib, seq_len=8, batch_size=2)
    low = torch.linalg.eigvalsh(curvature_operator(operator, model, CAUSAL_LM, batches, params=params).dense())[:2]
    eig = result["eigen"]
    assert result["which"] == "bottom" and eig["converged"] and eig["start"] == "random"
    values = torch.tensor(eig["values"], dtype=torch.float64)
    assert bool((values >= low - 1e-10).all())  # interlacing: theta_i >= lambda_i
    assert bool(((values - low).abs() <= torch.tensor(eig["error_bounds"]) + 1e-10).all())
    torch.testing.assert_close(values, low, rtol=1e-4, atol=1e-8)
