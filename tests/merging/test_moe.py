"""`basin moe` / `merging.moe.build_moe` (issue 22): mergekit-moe's YAML into Mixtral, Qwen2-MoE, Qwen3-MoE.

Experts are the base with other MLP weights (fine-tunes that changed only their MLPs), so the MoE with its
router forced to expert k is exactly expert k's dense model; router weights are checked against a hand
computation through transformers' `output_hidden_states` (not the pre-hooks the builder uses).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from merging.moe import build_moe
from taxonomy.errors import BasinError

WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(61)]
SMALL = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=64)
KINDS = {  # name -> (config class, model class, extra config)
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(tie_word_embeddings=False, sliding_window=4)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False, use_sliding_window=True,
                                                      sliding_window=4, max_window_layers=1)),
    "qwen2_tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3_tied": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=True, head_dim=12)),
}
PROMPTS = [["w1 w2 w3", "w4"], ["w10 w11", "w12 w13 w14"], ["w20"]]
NEGATIVE = [[], ["w30 w31"], ["w40", "w41 w42"]]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _dense(kind: str, mlp_seed: int | None):
    """The base of `kind` (seed 0); with `mlp_seed`, its MLP weights replaced by other random ones."""
    import transformers

    cfg_name, model_name, extra = KINDS[kind]
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(getattr(transformers, cfg_name)(**SMALL, **extra)).eval()
    if mlp_seed is not None:
        g = torch.Generator().manual_seed(mlp_seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".mlp." in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """kind -> [base, expert 1, expert 2, expert 3] folders (HF format, with a tokenizer)."""
    root = tmp_path_factory.mktemp("moe")
    out = {}
    for kind in KINDS:
        folders = []
        for k, seed in enumerate([None, 1, 2, 3]):
            folder = root / f"{kind}{k}"
            _dense(kind, seed).save_pretrained(folder)
            _tokenizer().save_pretrained(folder)
            folders.append(folder)
        out[kind] = folders
    return out


def _config(folders: list[Path], mode: str = "hidden", shared: bool = False, **extra) -> dict:
    experts = [{"source_model": str(f), "positive_prompts": p, "negative_prompts": n}
               for f, p, n in zip(folders[1:3], PROMPTS, NEGATIVE)]
    config = {"base_model": str(folders[0]), "gate_mode": mode, "experts_per_token": 1, "experts": experts, **extra}
    if shared:
        config["shared_experts"] = [{"source_model": str(folders[3]), "positive_prompts": PROMPTS[2],
                                     "negative_prompts": NEGATIVE[2]}]
    return config


def _load(folder: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def _forced_logits(model, k: int, ids: torch.Tensor) -> torch.Tensor:
    """Logits with every token of every layer routed to expert k alone (weight 1)."""
    def force(module, args, out):  # noqa: ANN001, ARG001
        logits, scores, index = out
        return logits, torch.ones_like(scores[:, :1]), torch.full_like(index[:, :1], k)

    handles = [layer.mlp.gate.register_forward_hook(force) for layer in model.model.layers]
    try:
        with torch.no_grad():
            return model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()


IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41]])  # longer than the sliding windows (4)


@pytest.mark.parametrize("kind,arch", [("llama", "MixtralForCausalLM"), ("mistral", "MixtralForCausalLM"),
                                       ("llama_tied", "MixtralForCausalLM"), ("qwen3_tied", "Qwen3MoeForCausalLM")])
def test_forced_expert_equals_its_dense_model(tmp_path, family, kind, arch):
    folders = family[kind]
    build_moe(_config(folders, "random"), tmp_path / "out", progress=False)
    model = _load(tmp_path / "out")
    assert type(model).__name__ == arch
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is KINDS[kind][2]["tie_word_embeddings"]
    for k in (0, 1):
        dense = _dense(kind, k + 1)
        with torch.no_grad():
            want = dense(input_ids=IDS).logits
        torch.testing.assert_close(_forced_logits(model, k, IDS), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["qwen2", "qwen2_tied", "llama"])
def test_qwen2_moe_with_shared_expert(tmp_path, family, kind):
    folders = family[kind]
    build_moe(_config(folders, "random", shared=True), tmp_path / "out", progress=False)
    model = _load(tmp_path / "out")
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    with torch.no_grad():
        for layer in model.model.layers:  # the shared expert's output to zero: what is left is the routed expert
            layer.mlp.shared_expert.down_proj.weight.zero_()
    for k in (0, 1):
        with torch.no_grad():
            want = _dense(kind, k + 1)(input_ids=IDS).logits
        torch.testing.assert_close(_forced_logits(model, k, IDS), want, rtol=1e-5, atol=1e-5)


def _hand_hidden(folder: Path, prompts: list[str]) -> torch.Tensor:
    """Mean over prompts of hidden_states[:-1] at the last token: (layers, hidden), float64."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = _tokenizer()
    rows = []
    for p in prompts:
        ids = torch.tensor([tok("<s>" + p, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
        assert len(out.hidden_states) == model.config.num_hidden_layers + 1
        rows.append(torch.stack(out.hidden_states[:-1])[:, 0, -1].double())
    return torch.stack(rows).mean(0)


def _router(folder: Path, layer: int, block: str = "block_sparse_moe") -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")[f"model.layers.{layer}.{block}.gate.weight"]


@pytest.mark.parametrize("kind", ["llama", "qwen3_tied"])
def test_hidden_router_equals_a_hand_computation(tmp_path, family, kind):
    folders = family[kind]
    build_moe(_config(folders, "hidden"), tmp_path / "out", progress=False)
    block = "block_sparse_moe" if kind == "llama" else "mlp"
    for k in range(2):
        h = _hand_hidden(folders[0], PROMPTS[k])
        if NEGATIVE[k]:
            h = h - _hand_hidden(folders[0], NEGATIVE[k])
        want = h / h.norm(dim=-1, keepdim=True)
        for layer in range(2):
            torch.testing.assert_close(_router(tmp_path / "out", layer, block)[k].double(), want[layer],
                                       rtol=1e-5, atol=1e-6)


def test_cheap_embed_router_equals_a_hand_computation(tmp_path, family):
    from safetensors.torch import load_file

    folders = family["llama"]
    build_moe(_config(folders, "cheap_embed"), tmp_path / "out", progress=False)
    embed = load_file(folders[0] / "model.safetensors")["model.embed_tokens.weight"].double()

    def summed(prompts):
        ids = [WORDS.index(w) for p in prompts for w in ["<s>"] + p.split()]
        v = embed[ids].sum(0)
        return v / v.norm()

    for k in range(2):
        h = summed(PROMPTS[k]) - (summed(NEGATIVE[k]) if NEGATIVE[k] else 0)
        want = h / h.norm()
        for layer in range(2):
            torch.testing.assert_close(_router(tmp_path / "out", layer)[k].double(), want, rtol=1e-5, atol=1e-6)


def test_random_gates_are_seeded_and_bit_identical(tmp_path, family):
    folders = family["llama"]
    a = build_moe(_config(folders, "random"), tmp_path / "a", progress=False)
    b = build_moe(_config(folders, "random"), tmp_path / "b", progress=False)
    c = build_moe(_config(folders, "random", seed=1), tmp_path / "c", progress=False)
    assert a.content_hash == b.content_hash != c.content_hash
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (folders[0] / "tokenizer.json").read_bytes()


def test_expert_tensors_are_the_sources_and_residual_scale(tmp_path, family):
    from safetensors.torch import load_file

    folders = family["llama"]
    config = _config(folders, "random")
    config["experts"][1]["residual_scale"] = 0.5
    build_moe(config, tmp_path / "out", progress=False)
    out = load_file(tmp_path / "out" / "model.safetensors")
    src = [load_file(f / "model.safetensors") for f in folders[:3]]
    for layer in range(2):
        for proj, w in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")):
            name = f"model.layers.{layer}.mlp.{proj}.weight"
            scale = 0.5 if proj == "down_proj" else 1.0
            assert torch.equal(out[f"model.layers.{layer}.block_sparse_moe.experts.0.{w}.weight"], src[1][name])
            assert torch.equal(out[f"model.layers.{layer}.block_sparse_moe.experts.1.{w}.weight"],
                               src[2][name] * scale)
    assert all(torch.equal(out[n], src[0][n]) for n in src[0] if ".mlp." not in n)


def _cli(args: list[str], capsys) -> tuple[int, str, str]:
    from evaluations.cli import main

    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _yaml(tmp_path: Path, config: dict) -> str:
    path = tmp_path / "moe.yml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_cli_dry_run_lists_and_writes_nothing(tmp_path, family, capsys):
    code, out, _ = _cli(["moe", _yaml(tmp_path, _config(family["llama"])), str(tmp_path / "out"), "--dry-run"],
                        capsys)
    assert code == 0 and not (tmp_path / "out").exists()
    assert out.startswith("Mixtral (MixtralForCausalLM): 2 layers, 2 experts, 1 per token")
    assert "model.layers.1.block_sparse_moe.experts.1.w2.weight  [16, 32]  <- " in out


def test_cli_builds_and_refuses_to_clobber(tmp_path, family, capsys):
    path = _yaml(tmp_path, _config(family["llama"], "cheap_embed"))
    assert _cli(["moe", path, str(tmp_path / "out"), "--no-progress"], capsys)[0] == 0
    assert (tmp_path / "out" / "mergekit_moe_config.yml").read_text() == Path(path).read_text()
    code, _, err = _cli(["moe", path, str(tmp_path / "out"), "--no-progress"], capsys)
    assert code == 2 and "exists" in err and len(err.strip().splitlines()) == 1


def _other_shapes(tmp_path: Path) -> Path:
    import transformers

    cfg = transformers.LlamaConfig(**dict(SMALL, intermediate_size=24), tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "wide")
    return tmp_path / "wide"


def _gpt2(tmp_path: Path) -> Path:
    import transformers

    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64)) \
        .save_pretrained(tmp_path / "gpt2")
    return tmp_path / "gpt2"


BAD = {
    "missing expert": (lambda c, t: c["experts"][1].update(source_model=str(t / "nope")), "nope"),
    "unknown gate mode": (lambda c, t: c.update(gate_mode="hiden"), "unknown gate mode 'hiden'; did you mean"),
    "expert shapes": (lambda c, t: c["experts"][1].update(source_model=str(_other_shapes(t))),
                      "tensor 'model.layers.0.mlp.gate_proj.weight' has shape [24, 16], the base's has [32, 16]"),
    "no MoE counterpart": (lambda c, t: c["experts"][0].update(source_model=str(_gpt2(t))),
                           "model_type 'gpt2' has no MoE counterpart"),
    "no prompts": (lambda c, t: c["experts"][0].update(positive_prompts=[]), "experts[0]"),
    "too many per token": (lambda c, t: c.update(experts_per_token=3), "experts_per_token is 3"),
    "unknown field": (lambda c, t: c.update(gate_mod="x"), "unknown field 'gate_mod'"),
    "qwen2 without shared": (lambda c, t: c.update(architecture="qwen"), "shared_experts"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_cli_bad_input_is_one_line_exit_2(tmp_path, family, capsys, case):
    edit, expected = BAD[case]
    config = _config(family["llama"])
    edit(config, tmp_path)
    capsys.readouterr()  # transformers' save_pretrained progress
    code, out, err = _cli(["moe", _yaml(tmp_path, config), str(tmp_path / "out"), "--no-progress"], capsys)
    assert code == 2, (out, err)
    assert err.startswith("basin moe: error: ") and expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_partial_sliding_window_is_refused_for_mixtral_style_outputs(tmp_path):
    import transformers

    cfg = transformers.Qwen3Config(**SMALL, head_dim=8, use_sliding_window=True, sliding_window=4,
                                   max_window_layers=1)
    for k in range(3):
        transformers.Qwen3ForCausalLM(cfg).save_pretrained(tmp_path / f"q{k}")
    config = _config([tmp_path / f"q{k}" for k in range(3)] + [tmp_path / "q2"], "random")
    with pytest.raises(BasinError, match="windows the attention of some layers only"):
        build_moe(config, tmp_path / "out", progress=False)


def test_cli_help_and_listing(capsys):
    from evaluations.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["moe", "--help"])
    assert stop.value.code == 0 and "--dry-run" in capsys.readouterr().out
    assert main(["--help"]) == 0 and "  moe " in capsys.readouterr().out
