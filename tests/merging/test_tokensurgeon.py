"""`basin tokensurgeon` / `merging.tokensurgeon.token_surgery`: tiny Llama, GPT-2 and Qwen2 models whose tokenizers
(built offline, `tokenizers` WordLevel) differ from a donor's. Shared tokens keep their rows bit for bit; OMP is
checked against a plain per-step least-squares OMP and a brute-force search, and recovers an exactly sparse
donor row's combination on the model's rows."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from merging import open_checkpoint
from merging.tokensurgeon import token_surgery
from merging.tokensurgeon.approximate import omp
from taxonomy.errors import BasinError

MODEL_WORDS = ["<unk>", "<s>", "</s>", "apple", "banana", "cherry", "date", "elder", "fig", "grape", "-"]
DONOR_WORDS = ["<pad>", "<|bos|>", "<|eos|>", "<unk>", "fig", "zebra", "banana", "apple", "yak", "grape", "date",
               "walrus", "apple-fig", "elder", "cherry"]
DONOR_ONLY = ["<pad>", "zebra", "yak", "walrus", "apple-fig"]
SHARED = [w for w in DONOR_WORDS if w not in DONOR_ONLY]  # <|bos|> / <|eos|> match <s> / </s> by role
DONOR_PAD = 3  # the donor's embedding has 3 rows more than its tokenizer (vocab padding)


def word_tokenizer(words: list[str], bos: str, eos: str, pad: str | None = None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token=bos, eos_token=eos,
                                   pad_token=pad)


def build(family: str, vocab: int, seed: int, tied: bool, **ids):
    import transformers

    torch.manual_seed(seed)
    small = dict(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=tied, **ids)
    if family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                      tie_word_embeddings=tied, **ids)
        return transformers.GPT2LMHeadModel(cfg).eval()
    cls = {"llama": "Llama", "qwen2": "Qwen2"}[family]
    return getattr(transformers, f"{cls}ForCausalLM")(getattr(transformers, f"{cls}Config")(**small)).eval()


def save(folder: Path, family: str, words: list[str], seed: int, tied: bool, pad_rows: int = 0, donor=False):
    bos, eos = ("<|bos|>", "<|eos|>") if donor else ("<s>", "</s>")
    tok = word_tokenizer(words, bos, eos, "<pad>" if donor else None)
    ids = dict(bos_token_id=words.index(bos), eos_token_id=words.index(eos))
    if donor:
        ids["pad_token_id"] = 0
    build(family, len(words) + pad_rows, seed, tied, **ids).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    c = open_checkpoint(folder)
    return {n: c.get(n) for n in c.names()}


EMBED = {"llama": "model.embed_tokens.weight", "qwen2": "model.embed_tokens.weight", "gpt2": "transformer.wte.weight"}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("surgeon")


def pair(root: Path, family: str, tied: bool, donor_family: str = "llama") -> tuple[Path, Path]:
    m, d = root / f"{family}-{tied}", root / f"donor-{donor_family}"
    if not (m / "config.json").exists():
        save(m, family, MODEL_WORDS, 0, tied)
    if not (d / "config.json").exists():
        save(d, donor_family, DONOR_WORDS, 1, False, pad_rows=DONOR_PAD, donor=True)
    return m, d


# --- OMP against independent references -----------------------------------------------------------------------
def reference_omp(y: np.ndarray, a: np.ndarray, k: int) -> tuple[list[int], np.ndarray]:
    """OMP as written in the paper: pick the atom most correlated with the residual, refit by lstsq, repeat."""
    chosen: list[int] = []
    residual = y.copy()
    coef = np.zeros(0)
    for _ in range(k):
        corr = np.abs(a @ residual)
        corr[chosen] = -1.0
        chosen.append(int(np.argmax(corr)))
        coef = np.linalg.lstsq(a[chosen].T, y, rcond=None)[0]
        residual = y - a[chosen].T @ coef
    return chosen, coef


def test_omp_matches_the_per_step_least_squares_reference():
    g = torch.Generator().manual_seed(0)
    atoms, targets = torch.randn(40, 12, generator=g), torch.randn(7, 12, generator=g)
    idx, coeffs = omp(targets, atoms, 6)
    for b in range(7):
        chosen, coef = reference_omp(targets[b].double().numpy(), atoms.double().numpy(), 6)
        assert idx[b].tolist() == chosen
        np.testing.assert_allclose(coeffs[b].numpy(), coef, rtol=1e-10, atol=1e-12)


def test_omp_recovers_an_exactly_sparse_target_like_brute_force():
    g = torch.Generator().manual_seed(1)
    atoms = torch.randn(9, 128, generator=g, dtype=torch.float64)  # incoherent enough for OMP's recovery guarantee
    target = 0.8 * atoms[2] - 1.5 * atoms[7]
    best = min(itertools.combinations(range(9), 2),
               key=lambda s: np.linalg.lstsq(atoms[list(s)].T.numpy(), target.numpy(), rcond=None)[1].sum())
    idx, coeffs = omp(target[None], atoms, 2)
    assert sorted(idx[0].tolist()) == sorted(best) == [2, 7]
    got = dict(zip(idx[0].tolist(), coeffs[0].tolist()))
    assert got[2] == pytest.approx(0.8, abs=1e-12) and got[7] == pytest.approx(-1.5, abs=1e-12)
    # more atoms than needed: the extra coefficients are zero and the fit stays exact
    idx, coeffs = omp(target[None], atoms, 5)
    approx = (coeffs[0, :, None] * atoms[idx[0]]).sum(0)
    torch.testing.assert_close(approx, target, rtol=0, atol=1e-12)


# --- end to end ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,tied", [("llama", False), ("llama", True), ("gpt2", True), ("qwen2", False)])
def test_shared_rows_bit_identical_and_output_loads(root, tmp_path, family, tied):
    import transformers

    model, donor = pair(root, family, tied)
    report = token_surgery(model, donor, tmp_path / "out", progress=False)
    out = tmp_path / "out"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert len(tok) == len(DONOR_WORDS) and tok.bos_token == "<|bos|>"
    rows = len(DONOR_WORDS) + DONOR_PAD
    assert (report.rows, report.shared, report.approximated) == (rows, len(SHARED), len(DONOR_ONLY))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == rows and (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 0)
    src, dst = tensors(model), tensors(out)
    names = [EMBED[family]] + ([] if tied else ["lm_head.weight"])
    role = {"<|bos|>": "<s>", "<|eos|>": "</s>"}
    for name in names:
        assert dst[name].shape[0] == rows and dst[name].dtype == src[name].dtype
        for word in SHARED:
            old = MODEL_WORDS.index(role.get(word, word))
            assert torch.equal(dst[name][tok.convert_tokens_to_ids(word)], src[name][old]), (name, word)
        assert torch.equal(dst[name][len(DONOR_WORDS):], torch.zeros(DONOR_PAD, src[name].shape[1]))
    assert ("lm_head.weight" in dst) == (not tied)
    emb = loaded.get_input_embeddings().weight
    assert torch.equal(emb[tok.convert_tokens_to_ids("apple")], src[EMBED[family]][MODEL_WORDS.index("apple")])
    for name in src:
        if name not in names and name != "lm_head.weight":
            assert torch.equal(src[name], dst[name]), name


def test_omp_row_is_the_same_combination_of_the_model_rows(root, tmp_path):
    """A donor-only token whose donor row is exactly 0.7 apple - 0.3 banana gets 0.7 apple - 0.3 banana of the
    model's rows (embedding and untied head alike)."""
    from safetensors.torch import load_file, save_file

    model, donor = pair(root, "llama", False)
    crafted = tmp_path / "donor"
    crafted.mkdir()
    for f in donor.iterdir():
        (crafted / f.name).write_bytes(f.read_bytes())
    state = load_file(crafted / "model.safetensors")
    a, b, z = DONOR_WORDS.index("apple"), DONOR_WORDS.index("banana"), DONOR_WORDS.index("zebra")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        state[name][z] = 0.7 * state[name][a] - 0.3 * state[name][b]
    save_file(state, crafted / "model.safetensors", metadata={"format": "pt"})
    token_surgery(model, crafted, tmp_path / "out", progress=False)
    src, dst = tensors(model), tensors(tmp_path / "out")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        want = 0.7 * src[name][MODEL_WORDS.index("apple")].double() - 0.3 * src[name][MODEL_WORDS.index("banana")]
        torch.testing.assert_close(dst[name][z].double(), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["mean", "zero", "subword"])
def test_simple_methods(root, tmp_path, method):
    model, donor = pair(root, "llama", False)  # (transformers loads a WordLevel tokenizer beside a qwen2 config as
    token_surgery(model, donor, tmp_path / "out", method=method, progress=False)  # Qwen2Tokenizer: no pieces)
    src, dst = tensors(model), tensors(tmp_path / "out")
    e = src["model.embed_tokens.weight"].double()
    row = dst["model.embed_tokens.weight"][DONOR_WORDS.index("apple-fig")].double()
    want = {"mean": e.mean(0), "zero": torch.zeros(16, dtype=torch.float64),
            "subword": (e[MODEL_WORDS.index("apple")] + e[MODEL_WORDS.index("-")] + e[MODEL_WORDS.index("fig")]) / 3}
    torch.testing.assert_close(row, want[method].float().double(), rtol=0, atol=1e-7)


def test_gpt2_donor_for_a_llama_model_and_determinism(root, tmp_path):
    model, donor = pair(root, "llama", False, donor_family="gpt2")
    r1 = token_surgery(model, donor, tmp_path / "a", progress=False)
    r2 = token_surgery(model, donor, tmp_path / "b", progress=False)
    assert r1.content_hash == r2.content_hash
    assert (tmp_path / "a" / "README.md").read_bytes() == (tmp_path / "b" / "README.md").read_bytes()
    dst = tensors(tmp_path / "a")
    assert torch.isfinite(dst["lm_head.weight"]).all()  # a tied donor: its embedding is its head space


def test_bad_inputs_are_one_line(root, tmp_path):
    model, donor = pair(root, "llama", False)
    bare = tmp_path / "bare"
    build("llama", len(DONOR_WORDS), 2, False).save_pretrained(bare, safe_serialization=True)
    with pytest.raises(BasinError, match="donor has no tokenizer"):
        token_surgery(model, bare, tmp_path / "x", progress=False)
    with pytest.raises(BasinError, match="unknown approximation method 'knn'"):
        token_surgery(model, donor, tmp_path / "x", method="knn")
    with pytest.raises(BasinError, match="k must be a positive integer"):
        token_surgery(model, donor, tmp_path / "x", k=0)
    (tmp_path / "exists").mkdir()
    with pytest.raises(BasinError, match="exists"):
        token_surgery(model, donor, tmp_path / "exists")
    with pytest.raises(BasinError, match="refused"):
        token_surgery(model, donor, model, overwrite=True)
    assert not (tmp_path / "x").exists()


def test_cli_dry_run_and_errors(root, tmp_path, capsys):
    from evaluations.cli import main

    model, donor = pair(root, "llama", False)
    assert main(["tokensurgeon", str(model), str(donor), str(tmp_path / "out"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert f"{len(SHARED)} shared tokens" in text and "model.embed_tokens.weight  [18, 16]" in text
    assert not (tmp_path / "out").exists()
    assert main(["tokensurgeon", str(model), str(donor), str(tmp_path / "out"), "-k", "0"]) == 2
    assert main(["tokensurgeon", str(model), str(tmp_path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") <= 3 and "Traceback" not in err
    assert main(["tokensurgeon", str(model), str(donor), str(tmp_path / "out"), "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["approximated"] == len(DONOR_ONLY)
