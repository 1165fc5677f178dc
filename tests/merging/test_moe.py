"""`basin moe` / `merging.moe.build_moe` (issue 22): mergekit-moe's YAML into Mixtral, Qwen2-MoE, Qwen3-MoE.

Experts are the base with other MLP weights (fine-tunes that changed only their MLPs), so the MoE with its
router forced to expert k is exactly expert k's dense model; router weights are checked against a hand
computation through transformers' `output_hidden_states` (not the forward pass the builder uses).
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
    _assert_routers_are_the_hand_hidden_states(folders[0], tmp_path / "out",
                                               "block_sparse_moe" if kind == "llama" else "mlp")


def _assert_routers_are_the_hand_hidden_states(base, out, block: str = "block_sparse_moe") -> None:
    """Each expert's router row, per layer, is its prompt's hand-computed hidden state (less the negative
    prompt's), unit-normalised."""
    for k in range(2):
        h = _hand_hidden(base, PROMPTS[k])
        if NEGATIVE[k]:
            h = h - _hand_hidden(base, NEGATIVE[k])
        want = h / h.norm(dim=-1, keepdim=True)
        for layer in range(2):
            torch.testing.assert_close(_router(out, layer, block)[k].double(), want[layer], rtol=1e-5, atol=1e-6)


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


# --- transformers-free config.json, loadability check and tokenizer (merging.moe.hf_config) ---------------------

def _raw_configs():
    """config.json variants of every dense kind: as transformers 5 saves it, as a 4.x checkpoint has it (rope_theta,
    torch_dtype, rope_scaling null), minimal (defaults left to the class), with a list of eos ids."""
    import transformers

    for kind, (cfg_name, _, extra) in KINDS.items():
        cfg = getattr(transformers, cfg_name)(**SMALL, **extra, dtype="bfloat16")
        saved = json.loads(cfg.to_json_string())
        saved["architectures"] = [KINDS[kind][1]]
        legacy = {k: v for k, v in saved.items() if k not in ("rope_parameters", "dtype", "layer_types")}
        legacy.update(rope_theta=500000.0, torch_dtype="float16", rope_scaling=None, transformers_version="4.44.0")
        minimal = dict(SMALL, model_type=cfg.model_type, **extra)
        llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}
        for label, raw in (("saved", saved), ("legacy", legacy), ("minimal", minimal),
                           ("eos list", dict(minimal, eos_token_id=[2, 3], bos_token_id=None)),
                           ("llama3 rope", dict(legacy, rope_scaling=llama3)),
                           ("linear rope", dict(minimal, rope_parameters={"rope_type": "linear", "factor": 2.0})),
                           ("dynamic rope", dict(legacy, rope_scaling={"rope_type": "dynamic", "factor": 2.0}))):
            yield f"{kind} {label}", raw


def test_own_config_writer_equals_transformers_field_for_field():
    from merging.moe import arch as A
    from merging.moe.hf_config import Fields

    cases = 0
    for label, raw in _raw_configs():
        ours = A.dense_config(raw, label)
        theirs = A.dense_config(raw, label, use_transformers=True)
        assert isinstance(ours, Fields) and not isinstance(theirs, Fields), label
        for arch in A.ARCHS:
            if raw["model_type"] not in arch.inputs:
                continue
            for dtype in (None, "bfloat16"):
                want = A.moe_config(arch, theirs, 3, 2, dtype, label)
                got = A.moe_config(arch, ours, 3, 2, dtype, label)
                assert json.dumps(got, indent=2) == json.dumps(want, indent=2), (label, arch.name, dtype)
                cases += 1
    assert cases == 7 * (3 * 2 + 2 + 1) * 2  # 7 variants x (llama, llama_tied, mistral: 2 archs; qwen2 x2, qwen3) x 2


def test_own_config_tables_are_transformers_defaults():
    import dataclasses

    import transformers
    from transformers.configuration_utils import PreTrainedConfig

    from merging.moe.hf_config import BASE_FIELDS, CLASSES

    def declared(cls):
        return tuple((f.name, f.default) for f in dataclasses.fields(cls))

    assert declared(PreTrainedConfig) == BASE_FIELDS
    for c in CLASSES.values():
        cls = getattr(transformers, c.name)
        assert cls.model_type == c.model_type and cls.default_theta == c.default_theta, c.name
        assert declared(cls) == BASE_FIELDS + c.fields, c.name
        assert dict(cls.attribute_map) == dict(c.attribute_map), c.name


def test_configs_outside_the_own_writer_go_to_transformers():
    from merging.moe.hf_config import read_dense

    raw = dict(SMALL, model_type="llama")
    assert read_dense(raw) is not None
    for extra in ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, {"rope_scaling": {"type": "linear",
                                                                                         "factor": 2.0}},
                  {"rope_scaling": {"rope_type": "linear"}}, {"some_new_field": 1},
                  {"hidden_size": "16"}, {"num_attention_heads": 0}, {"hidden_size": None},
                  {"torch_dtype": "auto"}, {"id2label": {"0": "a"}}):
        assert read_dense({**raw, **extra}) is None, extra
    assert read_dense({**raw, "model_type": "gemma"}) is None


@pytest.mark.parametrize("kind,shared", [("llama", False), ("mistral", False), ("llama_tied", False),
                                         ("qwen3_tied", False), ("qwen2", True), ("llama", True)])
def test_expected_tensors_are_what_transformers_builds(family, kind, shared):
    from merging.moe.arch import expected_tensors
    from merging.moe.build import load_config, open_models, plan_moe
    from merging.output.config import _model_class, _problems

    config = load_config(_config(family[kind], "random", shared=shared))
    plan = plan_moe(config, open_models(config))
    assert plan.own_config
    want = expected_tensors(plan.arch, plan.config)
    assert want == {e.name: e.shape for e in plan.entries}
    assert _problems(_model_class(plan.config["architectures"][0]), plan.config, want) == []
    wrong = dict(want)
    wrong.pop(plan.arch.router(0))
    assert _problems(_model_class(plan.config["architectures"][0]), plan.config, wrong)


def _without_own_writer(monkeypatch):
    from merging.moe import decoder, hf_config, router

    monkeypatch.setattr(hf_config, "read_dense", lambda raw: None)
    monkeypatch.setattr(router.Tokenizer, "of", classmethod(lambda cls, folder: None))
    monkeypatch.setattr(router, "DENSE_MODULES", {})  # the hidden forward's model class through AutoConfig
    monkeypatch.setattr(decoder, "SUPPORTED", ())  # and the forward pass itself by transformers


@pytest.mark.parametrize("kind,mode,shared", [("llama", "random", False), ("llama", "cheap_embed", False),
                                              ("mistral", "random", False), ("qwen2", "random", True),
                                              ("qwen2_tied", "cheap_embed", True), ("qwen3_tied", "random", False),
                                              ("llama_tied", "hidden", False), ("mistral", "hidden", False),
                                              ("qwen2", "hidden", True), ("qwen3_tied", "hidden_avg", False)])
def test_output_bit_identical_to_the_transformers_path(tmp_path, family, monkeypatch, kind, mode, shared):
    """The transformers-free config.json, check, tokenizer and hidden-state forward pass (`merging.moe.decoder`)
    change no byte of the output (float32 forward)."""
    config = _config(family[kind], mode, shared=shared)
    ours = build_moe(config, tmp_path / "ours", progress=False)
    assert ours.plan.own_config
    with monkeypatch.context() as m:
        _without_own_writer(m)
        theirs = build_moe(config, tmp_path / "theirs", progress=False)
    assert ours.content_hash == theirs.content_hash
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "theirs" / name).read_bytes(), name


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3_tied"])
def test_bfloat16_hidden_routers_equal_the_transformers_path(tmp_path, family, monkeypatch, kind):
    """With hidden_dtype bfloat16 too (there basin's transformers path rounds the RoPE frequencies to bfloat16, as
    `model.to(bfloat16)` does; the native forward keeps them float32 as `from_pretrained` does): routers agree to
    bfloat16's rounding."""
    config = _config(family[kind], "hidden", shared=kind == "qwen2")
    ours = build_moe(config, tmp_path / "ours", progress=False, hidden_dtype="bfloat16")
    with monkeypatch.context() as m:
        _without_own_writer(m)
        build_moe(config, tmp_path / "theirs", progress=False, hidden_dtype="bfloat16")
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "ours" / "model.safetensors"), load_file(tmp_path / "theirs" / "model.safetensors")
    assert sorted(a) == sorted(b)
    routers = [n for n in a if n.endswith(("gate.weight", "shared_expert_gate.weight")) and ".experts." not in n]
    assert len(routers) >= 2 * ours.plan.layers - 2
    for n in a:
        if n in routers:
            torch.testing.assert_close(a[n].float(), b[n].float(), rtol=2e-2, atol=1e-2)
        else:
            assert torch.equal(a[n], b[n]), n


def _count_transformers_forward(monkeypatch) -> list[str]:
    from merging.moe import router

    calls: list[str] = []
    real = router.base_model

    def counted(ckpt, dtype, device):  # noqa: ANN001
        calls.append(ckpt.label)
        return real(ckpt, dtype, device)

    monkeypatch.setattr(router, "base_model", counted)
    return calls


def test_hidden_forward_falls_back_to_transformers_outside_the_native_one(tmp_path, family, monkeypatch):
    """A base whose config.json the native forward does not cover (YaRN RoPE here) goes through transformers
    (and its routers are still the hand computation's); a covered one never builds the transformers model."""
    import transformers

    calls = _count_transformers_forward(monkeypatch)
    build_moe(_config(family["llama"], "hidden"), tmp_path / "native", progress=False)
    assert calls == []
    cfg = transformers.LlamaConfig(**SMALL, tie_word_embeddings=False,
                                   rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0,
                                                    "original_max_position_embeddings": 32})
    folders = []
    for k in range(3):
        torch.manual_seed(k)
        transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / f"y{k}")
        _tokenizer().save_pretrained(tmp_path / f"y{k}")
        folders.append(tmp_path / f"y{k}")
    build_moe(_config(folders, "hidden"), tmp_path / "out", progress=False)
    assert len(calls) == 1
    _assert_routers_are_the_hand_hidden_states(folders[0], tmp_path / "out")


def test_rope_scaling_base_goes_through_transformers_and_loads(tmp_path):
    import transformers

    cfg = transformers.LlamaConfig(**SMALL, tie_word_embeddings=False,
                                   rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0,
                                                    "original_max_position_embeddings": 32})
    for k in range(3):
        torch.manual_seed(k)
        transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / f"r{k}")
    report = build_moe(_config([tmp_path / f"r{k}" for k in range(3)], "random"), tmp_path / "out", progress=False)
    assert not report.plan.own_config
    model = _load(tmp_path / "out")
    assert model.config.rope_parameters["rope_type"] == "yarn"


def _byte_bpe(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the quick brown fox", "jumps over the lazy dog"] * 5,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|begin|>", "<|end|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin|>", eos_token="<|end|>").save_pretrained(folder)


def test_plain_tokenizer_encodes_as_transformers(tmp_path, family):
    from transformers import AutoTokenizer

    from merging.moe.router import Tokenizer, token_ids

    _byte_bpe(tmp_path / "bpe")
    (tmp_path / "bpe" / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    prompts = ["w1 w2 w3", "the quick dog", " lazy  fox!", "<s>w4", "<|end|> over"]
    for folder in (family["llama"][0], family["mistral"][0], family["qwen3_tied"][0], tmp_path / "bpe"):
        ours, theirs = Tokenizer.of(folder), AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        assert ours is not None and ours.bos_token == theirs.bos_token
        for p in prompts:
            assert torch.equal(token_ids(ours, p), token_ids(theirs, p)), (folder, p)
    config = json.loads((tmp_path / "bpe" / "tokenizer_config.json").read_text())
    for change in ({"tokenizer_class": "LlamaTokenizer"}, {"split_special_tokens": True},
                   {"bos_token": "<not in the vocabulary>"}):
        (tmp_path / "bpe" / "tokenizer_config.json").write_text(json.dumps({**config, **change}))
        assert Tokenizer.of(tmp_path / "bpe") is None, change
    assert Tokenizer.of(family["qwen2"][0]) is None  # AutoTokenizer gives qwen2 its Qwen2Tokenizer


def test_no_gate_mode_imports_transformers(tmp_path, family):
    """A whole process builds every gate mode without importing transformers (the import is most of its time):
    random, cheap_embed, and hidden / hidden_avg by basin's own forward pass."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    code = ("import sys, json; from merging.moe import build_moe; cfgs = json.loads(sys.argv[1]);"
            "[build_moe(c, o, progress=False) for c, o in cfgs];"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'transformers', 'tokenizers'}))")
    cfgs = [[_config(family[kind], mode), str(tmp_path / mode)] for kind, mode in (
        ("llama", "random"), ("llama", "cheap_embed"), ("llama", "hidden"), ("qwen3_tied", "hidden_avg"))]
    out = subprocess.run([sys.executable, "-c", code, json.dumps(cfgs)], cwd=root, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(root)}, check=True)
    assert out.stdout.strip() == "['tokenizers']", out.stderr
    assert all((tmp_path / mode / "model.safetensors").is_file() for mode in ("cheap_embed", "hidden", "hidden_avg"))


def test_benchmark_import_split():
    """benchmarks/moe_vs_mergekit.py's split of `-X importtime` output (torch pulled in by transformers counts as
    transformers; what no tracked package imports is "other")."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "moe_vs_mergekit.py"
    spec = importlib.util.spec_from_file_location("moe_vs_mergekit", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    text = "\n".join(f"import time: {s * 1000:>9} | {c * 1000:>10} | {'  ' * d}{n}" for s, c, d, n in [
        (0, 0, 0, "self [us]"), (10, 10, 2, "torch._C"), (20, 30, 1, "torch"), (5, 35, 0, "merging.moe"),
        (40, 40, 2, "torch.distributed"), (10, 50, 1, "transformers.models.x"), (1, 51, 0, "transformers"),
        (3, 3, 1, "tokenizers"), (2, 5, 0, "yaml")])
    got = bench.import_split(text.replace("import time:         0 |          0 | self [us]",
                                          "import time: self [us] | cumulative | imported package"))
    assert got == pytest.approx({"torch": 0.030, "transformers": 0.051, "tokenizers": 0.003, "other": 0.007})
