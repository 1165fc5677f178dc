"""KnOTS (Stoica et al. 2025) on base+lora inputs: the shared basis from the factors against numpy's SVD of the dense
concatenation, KnOTS-TIES / -DARE against an independent float64 implementation, KnOTS-TA of one adapter against
PEFT's merge_and_unload, real PEFT adapter pairs (tiny Llama; GPT-2's Conv1D) merged through `basin merge` and
loaded with transformers, and the bad inputs (one line, exit 2)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from evaluations.cli import main
from merging.io.lora import LoraTensor
from merging.methods.apply import full_params, merge_tensor, tensor_rng
from merging.methods.catalog import get_method
from merging.methods.knots import shared_basis
from taxonomy import BasinError

EPS32 = float(np.finfo(np.float32).eps)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- the independent reference: dense float64 numpy ----

def np_basis(deltas: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """numpy's SVD of [dW_1 | ... | dW_n], components below matrix_rank's float32 tolerance dropped. The block of
    a zero dW_i is exactly zero (numpy leaves ~1e-16 there, which TIES would count as a vote in its mean)."""
    m = np.concatenate(deltas, axis=1)
    u, s, vh = np.linalg.svd(m, full_matrices=False)
    keep = s > s[0] * max(m.shape) * EPS32
    u, s, vh = u[:, keep], s[keep], vh[keep]
    width = deltas[0].shape[1]
    return u, s, [vh[:, i * width:(i + 1) * width] * bool(d.any()) for i, d in enumerate(deltas)]


def np_topk(c: np.ndarray, density: float) -> np.ndarray:
    k = int(density * c.size)
    mask = np.zeros(c.size, dtype=bool)
    mask[np.argsort(-np.abs(c).ravel(), kind="stable")[:k]] = True
    return mask.reshape(c.shape)


def np_ties(cs: list[np.ndarray], weights: list[float], lam: float) -> np.ndarray:
    """TIES (Yadav et al. 2023) on already-sparsified vectors: elect sign(sum w_i c_i) (+ at 0), disjoint mean."""
    weighted = [w * c for w, c in zip(weights, cs)]
    elected = np.where(sum(weighted) >= 0, 1.0, -1.0)
    agree = [(wc * elected > 0) for wc in weighted]
    total = sum(np.where(a, wc, 0.0) for a, wc in zip(agree, weighted))
    count = sum(np.where(a, w, 0.0) for a, w in zip(agree, weights))
    return lam * total / np.where(count == 0, 1.0, count)


def np_knots(base: np.ndarray, deltas: list[np.ndarray], how: str, weights: list[float], lam: float,
             densities: list[float], masks: list[np.ndarray] | None = None) -> np.ndarray:
    """base + U merged(S V_i^T): task arithmetic, TIES (top-k per model) or DARE (the given keep masks, divided by
    the keep probability) then TIES."""
    u, s, vhs = np_basis(deltas)
    cs = [s[:, None] * vh for vh in vhs]
    if how == "ta":
        merged = lam * sum(w * c for w, c in zip(weights, cs))
    elif how == "ties":
        merged = np_ties([np.where(np_topk(c, d), c, 0.0) for c, d in zip(cs, densities)], weights, lam)
    else:
        merged = np_ties([np.where(m, c, 0.0) / d for m, c, d in zip(masks, cs, densities)], weights, lam)
    return base + u @ merged


def factors(out: int, inp: int, ranks: list[int], seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(rand(out, r, seed=seed + i) * 0.5, rand(r, inp, seed=seed + 50 + i)) for i, r in enumerate(ranks)]


def test_shared_basis_from_factors_is_numpys_svd_of_the_concatenation():
    pairs = factors(9, 6, [2, 3, 1], seed=1)
    u, s, vhs = shared_basis([b for b, _ in pairs] + [None], [a for _, a in pairs] + [None])
    deltas = [(b.double() @ a.double()).numpy() for b, a in pairs] + [np.zeros((9, 6))]
    nu, ns, nvhs = np_basis(deltas)
    assert s.numel() == 6 and np.allclose(s.numpy(), ns, rtol=1e-12)  # rank = sum of ranks; the zero block adds 0
    np.testing.assert_allclose(u.numpy() @ u.numpy().T, nu @ nu.T, atol=1e-12)  # the same column space
    for vh, nvh, d in zip(vhs, nvhs, deltas):
        np.testing.assert_allclose((u.numpy() * s.numpy()) @ vh.numpy(), d, atol=1e-12)
        np.testing.assert_allclose(vh.numpy().T @ vh.numpy(), nvh.T @ nvh, atol=1e-12)
    # wider than tall (rank > out) and a rank above the input width
    pairs = factors(3, 2, [4, 2], seed=7)
    u, s, vhs = shared_basis([b for b, _ in pairs], [a for _, a in pairs])
    assert s.numel() == 3
    for (b, a), vh in zip(pairs, vhs):
        np.testing.assert_allclose((u * s).numpy() @ vh.numpy(), (b.double() @ a.double()).numpy(), atol=1e-12)


@pytest.mark.parametrize("how,params", [("ta", {"weight": [1.0, 0.5, 2.0], "lambda": 0.7}),
                                        ("ties", {"density": 0.3, "lambda": 0.6}),
                                        ("ties", {"weight": [1.0, 0.5, 2.0], "density": [0.2, 0.5, 1.0]}),
                                        ("dare", {"density": 0.7, "lambda": 0.8})])
def test_knots_equals_the_dense_float64_reference(how, params):
    """Different ranks and a model without an update on this weight (its block is zero), transposed storage."""
    pairs = factors(8, 5, [2, 4], seed=3)
    base = rand(8, 5, seed=9)
    inputs = [LoraTensor(None, b, a) for b, a in pairs] + [LoraTensor(None)]
    method = get_method(f"knots_{how}")
    p = full_params(method, params, 3)
    got = merge_tensor(method, "layers.0.w", inputs, base, p, seed=5)
    deltas = [(b.double() @ a.double()).numpy() for b, a in pairs] + [np.zeros((8, 5))]
    masks = None
    if how == "dare":  # the masks as the method draws them: torch.rand(k x in) < keep per model, in order
        rng = tensor_rng(5, "layers.0.w")
        masks = [(torch.rand(6, 5, generator=rng) < 0.7).numpy() for _ in range(3)]
    want = np_knots(base.double().numpy(), deltas, how, p["weight"], p["lambda"], p.get("density", [1.0] * 3), masks)
    np.testing.assert_allclose(got.double().numpy(), want, atol=2e-6, rtol=1e-5)
    # stored transposed (Conv1D): the same merge in the layer's orientation, transposed back
    flipped = [LoraTensor(None, x.up, x.down, transpose=True) for x in inputs]
    torch.testing.assert_close(merge_tensor(method, "layers.0.w", flipped, base.T.contiguous(), p, seed=5),
                               got.T, rtol=0, atol=0)
    assert torch.equal(merge_tensor(method, "layers.0.w", inputs, base, p, seed=5), got)  # deterministic


def test_tensors_without_lora_factors_are_the_base_or_the_task_vector_method():
    base = rand(4, 3, seed=1)
    method = get_method("knots_ties")
    p = full_params(method, {"density": 0.5}, 2)
    untouched = merge_tensor(method, "norm.weight", [LoraTensor(None), LoraTensor(None)], base, p, seed=0)
    assert torch.equal(untouched, base)
    saved = [rand(4, 3, seed=2), rand(4, 3, seed=3)]  # modules_to_save copies: plain TIES on their task vectors
    got = merge_tensor(method, "head.weight", [LoraTensor(saved[0]), LoraTensor(saved[1])], base, p, seed=0)
    ties = get_method("ties")
    assert torch.equal(got, merge_tensor(ties, "head.weight", saved, base, full_params(ties, {"density": 0.5}, 2), 0))
    with pytest.raises(BasinError, match="w: model 1 holds a full tensor while others have LoRA"):
        merge_tensor(method, "w", [LoraTensor(None, rand(4, 1), rand(1, 3)), LoraTensor(saved[1])], base, p, 0)
    with pytest.raises(BasinError, match="base\\+lora"):
        method(saved, base, p)  # dense inputs (the in-memory API) are refused


# ---- real PEFT adapters ----

TARGETS = {"llama": [(["q_proj", "v_proj"], 2), (["q_proj", "k_proj"], 4)],  # ranks and targets differ
           "gpt2": [(["c_attn", "c_fc"], 2), (["c_attn", "c_fc"], 3)]}


def _base(family: str):
    import transformers

    torch.manual_seed(0)
    if family == "gpt2":  # tied: no lm_head in the checkpoint
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2,
                                                                    n_positions=16)).eval()
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def peft_pairs(tmp_path_factory):
    """family -> (base folder, [adapter folders], [{module: (s B, A)} per adapter]); random A and B."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("knots")
    out = {}
    for family, specs in TARGETS.items():
        _base(family).save_pretrained(root / f"{family}-base", safe_serialization=True)
        folders, updates = [], []
        for k, (targets, r) in enumerate(specs):
            torch.manual_seed(10 + k)
            extra = {"modules_to_save": ["lm_head"]} if family == "llama" and k == 0 else {}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = get_peft_model(_base(family), LoraConfig(r=r, lora_alpha=2 * r + 1, target_modules=targets,
                                                                 init_lora_weights=False, **extra))
                if extra:
                    with torch.no_grad():
                        model.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.1)
                model.save_pretrained(root / f"{family}-lora{k}")
            scale = (2 * r + 1) / r
            sd = model.state_dict()
            updates.append({key.split("base_model.model.")[1].replace(".lora_A.default.weight", ".weight"):
                            (scale * sd[key.replace("lora_A", "lora_B")].double(), sd[key].double())
                            for key in sd if "lora_A.default" in key})
            folders.append(root / f"{family}-lora{k}")
        out[family] = (root / f"{family}-base", folders, updates)
    return out


def _recipe(path: Path, base: Path, adapters: list[Path], method: str, **parameters) -> str:
    recipe = {"merge_method": method, "base_model": str(base), "dtype": "float32", "parameters": parameters,
              "models": [{"model": f"{base}+{a}"} for a in adapters]}
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def _state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_one_adapter_knots_ta_is_peft_merge_and_unload(tmp_path, peft_pairs):
    from peft import PeftModel

    base, adapters, _ = peft_pairs["llama"]
    out = tmp_path / "out"
    assert main(["merge", _recipe(tmp_path / "r.yaml", base, adapters[1:], "knots_ta"), str(out),
                 "--no-progress"]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = PeftModel.from_pretrained(type(_base("llama")).from_pretrained(base), adapters[1]).merge_and_unload()
    got = _state(out)
    for name, value in want.state_dict().items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=2e-7, msg=name)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_peft_pair_through_the_cli_matches_the_reference_and_loads(tmp_path, peft_pairs, family, capsys):
    import transformers

    base, adapters, updates = peft_pairs[family]
    out = tmp_path / "out"
    recipe = _recipe(tmp_path / "r.yaml", base, adapters, "knots_ties", density=0.4, **{"lambda": 0.9})
    assert main(["merge", recipe, str(out), "--no-progress", "--json"]) == 0
    capsys.readouterr()
    got, before = _state(out), _state(base)
    modules = sorted({m for u in updates for m in u})
    assert modules  # every LoRA'd weight: the float64 reference, in the layer's orientation
    for name in modules:
        stored = before[name].double()
        conv1d = family == "gpt2"  # Conv1D weights are stored in x out; the updates are out x in
        deltas = [(u[name][0] @ u[name][1]).numpy() if name in u else np.zeros(stored.T.shape if conv1d
                                                                                else stored.shape) for u in updates]
        layer = stored.T if conv1d else stored
        want = np_knots(layer.numpy(), deltas, "ties", [1.0, 1.0], 0.9, [0.4, 0.4])
        np.testing.assert_allclose(got[name].double().numpy(), want.T if conv1d else want, atol=2e-6, err_msg=name)
    if family == "llama":  # the modules_to_save head (test below); every other tensor is the base's
        assert not torch.equal(got["lm_head.weight"], before["lm_head.weight"])
    for name in set(before) - set(modules) - {"lm_head.weight"}:
        assert torch.equal(got[name], before[name]), name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 40) and torch.isfinite(logits).all()
    # deterministic: a rerun writes the same bytes
    assert main(["merge", recipe, str(tmp_path / "again"), "--no-progress"]) == 0
    assert (tmp_path / "again/model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_modules_to_save_head_is_ties_of_its_task_vectors(tmp_path, peft_pairs, capsys):
    from merging.io.lora import read_adapter

    base, adapters, _ = peft_pairs["llama"]
    out = tmp_path / "out"
    assert main(["merge", _recipe(tmp_path / "r.yaml", base, adapters, "knots_ties", density=0.4), str(out),
                 "--no-progress"]) == 0
    head = _state(base)["lm_head.weight"]
    saved = read_adapter(adapters[0]).full["lm_head.weight"]
    ties = get_method("ties")
    want = merge_tensor(ties, "lm_head.weight", [saved, head], head, full_params(ties, {"density": 0.4}, 2), 0)
    assert torch.equal(_state(out)["lm_head.weight"], want)


def _fails(capsys, argv: list[str], message: str) -> None:
    assert main(["merge", *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_bad_inputs_are_one_line_errors(tmp_path, peft_pairs, capsys):
    import shutil

    base, adapters, _ = peft_pairs["llama"]
    plain = tmp_path / "plain"
    shutil.copytree(base, plain)  # a full model, not base+lora
    recipe = {"merge_method": "knots_ties", "base_model": str(base),
              "models": [{"model": f"{base}+{adapters[0]}"}, {"model": str(plain)}]}
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(recipe))
    _fails(capsys, [str(tmp_path / "a.yaml"), str(tmp_path / "o1")], "is not a base+lora reference")
    recipe["models"][1] = {"model": f"{plain}+{adapters[1]}"}  # an adapter on another base folder
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(recipe))
    _fails(capsys, [str(tmp_path / "b.yaml"), str(tmp_path / "o2")], "is not the recipe's base_model")
    gpt2_base, gpt2_adapters, _ = peft_pairs["gpt2"]  # a GPT-2 adapter on the Llama base: modules not found
    recipe["models"][1] = {"model": f"{base}+{gpt2_adapters[0]}"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(recipe))
    _fails(capsys, [str(tmp_path / "c.yaml"), str(tmp_path / "o3")], "has no tensor")
    del recipe["base_model"]
    recipe["models"] = recipe["models"][:1]
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(recipe))
    _fails(capsys, [str(tmp_path / "d.yaml"), str(tmp_path / "o4")], "base_model")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_methods_listed_with_their_needs(capsys):
    import taxonomy

    rows = [line for line in taxonomy.table().splitlines() if line.startswith("knots_")]
    assert len(rows) == 3 and all("base,lora" in row for row in rows)
    assert taxonomy.get("knots_dare_ties").name == "knots_dare"
    assert json.dumps(taxonomy.get("knots_ties").defaults())  # plain JSON values


def test_an_observer_sees_each_input_in_full(tmp_path, peft_pairs):
    """`engine.observing` (merge statistics, --measure) gets dense tensors even where the method reads factors."""
    from merging.engine import observing
    from merging.io.checkpoint import open_checkpoint
    from merging.pipeline import merge

    base, adapters, _ = peft_pairs["llama"]
    seen: dict[str, list[torch.Tensor]] = {}

    def observe(plan, k, tensors, base_tensor):
        seen[plan.tensors[k].name] = tensors

    with observing(observe):
        merge(_recipe(tmp_path / "r.yaml", base, adapters, "knots_dare"), tmp_path / "out", progress=False)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight", "lm_head.weight"):
        for got, adapter in zip(seen[name], adapters):
            torch.testing.assert_close(got, open_checkpoint(f"{base}+{adapter}").get(name), rtol=0, atol=1e-6)
