"""Task arithmetic family on the real all-MiniLM-L6-v2: two "fine-tunes" with disjoint changes.

Fine-tune A perturbs the attention query/key weights, fine-tune B the feed-forward input weights.
Each merge is loaded into transformers' BertModel and its sentence embeddings compared with the
base's and the fine-tunes', as each method predicts. To stay fast, the word-embedding matrix (half
the parameters, unchanged by both fine-tunes) is left out of the merges and taken from the base.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from merging.modelwise.state_dicts import merge_state_dicts

SENTENCES = ["The cat sat on the mat.", "Merging models averages their weights.",
             "A storm is coming from the north.", "Task vectors add skills to a base model."]


def perturbed(base: dict[str, torch.Tensor], keys: list[str], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = dict(base)
    for k in keys:
        out[k] = base[k] + 0.15 * base[k].std() * torch.randn(base[k].shape, generator=g)
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two threads spin against each other (10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    from transformers import AutoTokenizer, BertConfig

    base = load_file(str(minilm_dir / "model.safetensors"))
    keys_a = [k for k in base if ".attention.self.query.weight" in k or ".attention.self.key.weight" in k]
    keys_b = [k for k in base if ".intermediate.dense.weight" in k]
    config = BertConfig.from_pretrained(minilm_dir)
    batch = AutoTokenizer.from_pretrained(minilm_dir)(SENTENCES, padding=True, return_tensors="pt")
    return {"base": base, "a": perturbed(base, keys_a, 1), "b": perturbed(base, keys_b, 2), "keys_a": keys_a,
            "keys_b": keys_b, "config": config, "batch": batch}


WORDS = "embeddings.word_embeddings.weight"


def merge(m, method: str, params: dict | None = None) -> dict[str, torch.Tensor]:
    drop = lambda sd: {k: v for k, v in sd.items() if k != WORDS}  # noqa: E731
    merged = merge_state_dicts(method, [drop(m["a"]), drop(m["b"])], drop(m["base"]), params or {}, seed=0)
    return {**merged, WORDS: m["base"][WORDS]}


def embed(state: dict[str, torch.Tensor], m) -> np.ndarray:
    """Mean-pooled, normalized sentence embeddings (as sentence-transformers does for this model)."""
    from transformers import BertModel

    model = BertModel(m["config"]).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not missing and set(unexpected) <= {"embeddings.position_ids"}, (missing, unexpected)
    with torch.no_grad():
        hidden = model(**m["batch"]).last_hidden_state
    mask = m["batch"]["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def cosine(x: np.ndarray, y: np.ndarray) -> float:
    """Mean over sentences of the cosine between two embeddings (or displacements)."""
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    y = y / np.linalg.norm(y, axis=-1, keepdims=True)
    return float((x * y).sum(-1).mean())


@pytest.fixture(scope="module")
def embeddings(minilm):
    return {k: embed(minilm[k], minilm) for k in ("base", "a", "b")}


def test_exact_predictions_for_disjoint_changes(minilm, embeddings):
    base, a, b = minilm["base"], minilm["a"], minilm["b"]
    both = {**base, **{k: a[k] for k in minilm["keys_a"]}, **{k: b[k] for k in minilm["keys_b"]}}
    # task arithmetic with lambda 1 recovers both changes; so do TIES at density 1 (each entry has one
    # agreeing model) and SCE (the zero task vector never agrees); Model Stock sees cos = 0: the base
    for method, params in [("task_arithmetic", {}), ("ties", {}), ("sce", {})]:
        merged = merge(minilm, method, params)
        for k in base:
            torch.testing.assert_close(merged[k], both[k], msg=f"{method}: {k}")
    stock = merge(minilm, "model_stock")
    assert all(torch.equal(stock[k], base[k]) for k in base)
    np.testing.assert_allclose(embed(merged, minilm), embed(both, minilm), atol=1e-5)  # merged: the sce merge
    assert cosine(embeddings["a"], embeddings["base"]) < 0.999  # the fine-tunes moved the embeddings


def test_tsv_keeps_the_leading_singular_directions_of_the_one_changed_model(minilm):
    base, a = minilm["base"], minilm["a"]
    merged = merge(minilm, "tsv")
    key = minilm["keys_a"][0]
    u, s, vt = np.linalg.svd((a[key] - base[key]).double().numpy(), full_matrices=False)
    k = s.size // 2  # 1 / T of the components
    expected = base[key].double().numpy() + (u[:, :k] * s[:k]) @ vt[:k]
    np.testing.assert_allclose(merged[key].numpy(), expected, atol=2e-5)


METHODS = [
    ("task_arithmetic", {}), ("ties", {"density": 0.5}), ("dare_linear", {"density": 0.5}),
    ("dare_ties", {"density": 0.5}), ("breadcrumbs", {"density": 0.8, "gamma": 0.01}),
    ("breadcrumbs_ties", {"density": 0.8, "gamma": 0.01}), ("della", {"density": 0.5, "epsilon": 0.1}),
    ("della_linear", {"density": 0.5, "epsilon": 0.1}), ("sce", {"select_topk": 0.5}), ("tsv", {}),
]


@pytest.mark.parametrize("method,params", METHODS, ids=[m for m, _ in METHODS])
def test_merge_carries_both_fine_tunes_changes(minilm, embeddings, method, params):
    """Fit the merge's embedding shift from the base as alpha * shift_A + beta * shift_B (least squares
    over sentences and dimensions): every method keeps part of both changes (alpha, beta > 0.3) and
    none overshoots (< 1.3); task arithmetic keeps both whole (alpha = beta = 1 up to nonlinearity)."""
    e = embed(merge(minilm, method, params), minilm)
    basis = np.stack([(embeddings[k] - embeddings["base"]).reshape(-1) for k in ("a", "b")], axis=1)
    (alpha, beta), *_ = np.linalg.lstsq(basis, (e - embeddings["base"]).reshape(-1), rcond=None)
    assert 0.3 < alpha < 1.3 and 0.3 < beta < 1.3, (method, alpha, beta)
    if method == "task_arithmetic":
        assert abs(alpha - 1) < 0.15 and abs(beta - 1) < 0.15, (alpha, beta)


def test_lora_adapter_on_minilm(minilm_dir, tmp_path, minilm):
    from merging.io.checkpoint import open_checkpoint
    from merging.io.lora import open_lora

    g = torch.Generator().manual_seed(3)
    targets = [f"encoder.layer.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "value")]
    tensors = {}
    for t in targets:
        tensors[f"base_model.model.{t}.lora_A.weight"] = 0.1 * torch.randn(4, 384, generator=g)
        tensors[f"base_model.model.{t}.lora_B.weight"] = 0.1 * torch.randn(384, 4, generator=g)
    folder = tmp_path / "adapter"
    folder.mkdir()
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]}))
    base_ckpt = open_checkpoint(minilm_dir)
    ckpt = open_lora(base_ckpt, folder)
    assert ckpt.folder == minilm_dir
    for t in targets:
        a, b = tensors[f"base_model.model.{t}.lora_A.weight"], tensors[f"base_model.model.{t}.lora_B.weight"]
        assert torch.equal(ckpt.get(t + ".weight"), minilm["base"][t + ".weight"] + 2.0 * (b @ a))
    assert torch.equal(ckpt.get("encoder.layer.0.attention.self.key.weight"),
                       minilm["base"]["encoder.layer.0.attention.self.key.weight"])
    # LoRA's forward (Hu et al. 2022, eq. 3): h = W x + b + s B A x, on the merged model's first query layer
    from transformers import BertModel

    model = BertModel(minilm["config"]).eval()
    model.load_state_dict({n: ckpt.get(n) for n in ckpt.names()}, strict=False)
    x = torch.randn(3, 384, generator=g)
    t = targets[0]
    a, b = tensors[f"base_model.model.{t}.lora_A.weight"], tensors[f"base_model.model.{t}.lora_B.weight"]
    expected = x @ minilm["base"][t + ".weight"].T + minilm["base"][t + ".bias"] + 2.0 * (x @ a.T) @ b.T
    with torch.no_grad():
        torch.testing.assert_close(model.encoder.layer[0].attention.self.query(x), expected, atol=1e-5, rtol=1e-5)
