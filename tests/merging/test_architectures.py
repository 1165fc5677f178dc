"""Issue 17, merging items 1-3: per-layer config fields follow the slices and every output is checked against
the model transformers builds from its config; t = 0 outside the layers (mergekit's planner); before/after-layer
roles per architecture family (GPT-NeoX's embed_out is an output head, T5's shared an input embedding)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merging.architectures import FAMILIES, is_post, patch_layers
from merging.io.checkpoint import open_checkpoint
from merging.output.config import check_loadable
from merging.pipeline import merge
from merging.plan.tensors import build_plan
from merging.recipe.schema import Recipe
from taxonomy.errors import BasinError
from tests.merging.conftest import FAMILY_CONFIGS

FAMILIES_ALL = list(FAMILY_CONFIGS)


def _load(folder: Path):
    """The output loaded by its own class: (model, loading info)."""
    import transformers

    config = json.loads((folder / "config.json").read_text())
    cls = getattr(transformers, config["architectures"][0])
    return cls.from_pretrained(folder, output_loading_info=True)


def _frankenmerge(a: Path, b: Path) -> dict:
    """Layers 0-2 of a, then layers 1-3 of b: 6 layers from 4."""
    return {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(b), "layer_range": [1, 4]}]}]}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# --- item 1: per-layer config fields follow the slices; outputs checked against transformers ------------------
@pytest.mark.parametrize("name", ["qwen2", "qwen3", "gemma2"])
def test_frankenmerge_layer_types_follow_the_slices(tmp_path, family_dirs, name):
    a, b = family_dirs(name)
    types_a = json.loads((a / "config.json").read_text())["layer_types"]
    types_b = json.loads((b / "config.json").read_text())["layer_types"]
    merge(_frankenmerge(a, b), tmp_path / "out", progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    assert config["layer_types"] == types_a[0:3] + types_b[1:4]  # output layer i: its source layer's entry
    assert len(set(config["layer_types"])) == 2  # the fixtures mix sliding and full attention
    model, info = _load(tmp_path / "out")
    assert not any(info.values()), info
    assert model.config.layer_types == config["layer_types"]


def test_layer_types_of_each_source_model(tmp_path, family_dirs):
    """A layer taken from another model takes that model's layer_types entry, not the config source's."""
    a, _ = family_dirs("qwen2")
    b = tmp_path / "b"
    b.mkdir()
    for f in a.iterdir():
        (b / f.name).write_bytes(f.read_bytes())
    config = json.loads((b / "config.json").read_text())
    config["layer_types"] = ["sliding_attention", "full_attention", "full_attention", "full_attention"]
    (b / "config.json").write_text(json.dumps(config))
    merge(_frankenmerge(a, b), tmp_path / "out", progress=False)
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out["layer_types"] == ["full_attention", "full_attention", "sliding_attention",
                                  "full_attention", "full_attention", "full_attention"]


def test_same_layer_count_reordered_still_follows(tmp_path, family_dirs):
    """Gemma2 4 -> 4 layers (0-1 of a twice): the count is unchanged but the pattern is the sources'."""
    a, _ = family_dirs("gemma2")
    recipe = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 1]}]},
        {"sources": [{"model": str(a), "layer_range": [0, 3]}]}]}
    merge(recipe, tmp_path / "out", progress=False)
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out["layer_types"] == ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
    _, info = _load(tmp_path / "out")
    assert not any(info.values()), info


@pytest.mark.parametrize("dry_run", [True, False])
def test_unloadable_output_is_refused(tmp_path, family_dirs, monkeypatch, dry_run):
    """The issue's reproduction: only num_hidden_layers patched. The merge and --dry-run now fail, nothing written."""
    import merging.output.config as oc

    def count_only(config, origins):
        config["num_hidden_layers"] = len(origins)

    monkeypatch.setattr(oc, "patch_layers", count_only)
    a, b = family_dirs("qwen2")
    with pytest.raises(BasinError, match="4 layer_types entries for 6 layers"):
        merge(_frankenmerge(a, b), tmp_path / "out", progress=False, dry_run=dry_run)
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_unloadable_output(tmp_path, family_dirs, monkeypatch, capsys):
    """Exit 2, one line, no traceback, no output folder (the reproduction on Gemma2 through the CLI)."""
    import merging.output.config as oc
    from evaluations.cli import main

    monkeypatch.setattr(oc, "patch_layers", lambda config, origins: config.update(num_hidden_layers=len(origins)))
    a, b = family_dirs("gemma2")
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps(_frankenmerge(a, b)))
    code = main(["merge", str(recipe), str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and not (tmp_path / "out").exists()
    assert len(err.strip().splitlines()) == 1 and "layer_types" in err


def test_t5_unequal_stacks_frankenmerge_refused(tmp_path):
    """T5 with 4 encoder and 2 decoder blocks: slices renumber both stacks, decoder block 3 would be unexpected."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=4, num_decoder_layers=2, num_heads=2,
                   decoder_start_token_id=0)
    T5ForConditionalGeneration(cfg).save_pretrained(tmp_path / "t5")
    with pytest.raises(BasinError, match=r"unexpected decoder\.block\.3\."):
        merge(_frankenmerge(tmp_path / "t5", tmp_path / "t5"), tmp_path / "out", progress=False, dry_run=True)


def test_check_loadable_reports_missing_unexpected_shapes(family_dirs):
    """Hand-made defects against a Llama's real layout; tied duplicates optional; notes when it cannot check."""
    a, _ = family_dirs("llama")
    ckpt = open_checkpoint(a)
    config = json.loads((a / "config.json").read_text())
    shapes = {n: ckpt.meta(n).shape for n in ckpt.names()}
    assert len(shapes) == 3 + 4 * 9 and check_loadable(config, shapes) is None
    broken = dict(shapes, **{"model.layers.9.mlp.up_proj.weight": (32, 16), "model.norm.weight": (17,)})
    del broken["model.layers.2.self_attn.q_proj.weight"]
    with pytest.raises(BasinError) as e:
        check_loadable(config, broken)
    text = str(e.value)
    assert "missing model.layers.2.self_attn.q_proj.weight" in text
    assert "unexpected model.layers.9.mlp.up_proj.weight" in text
    assert "shape: model.norm.weight is [17], the model's is [16]" in text
    fewer = dict(config, num_hidden_layers=3)  # the layer count: layer 3's 9 tensors are unexpected
    with pytest.raises(BasinError, match="LlamaForCausalLM \\(3 layers\\): unexpected model.layers.3"):
        check_loadable(fewer, shapes)
    tied = dict(config, tie_word_embeddings=True)
    assert check_loadable(tied, {n: s for n, s in shapes.items() if n != "lm_head.weight"}) is None
    assert check_loadable(tied, shapes) is None  # the tied duplicate may be present too
    assert "no class" in check_loadable(dict(config, architectures=["NoSuchForCausalLM"]), shapes)


def test_check_loadable_without_transformers(monkeypatch, family_dirs):
    import sys

    a, _ = family_dirs("llama")
    config = json.loads((a / "config.json").read_text())
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert "not installed" in check_loadable(config, {})
    with pytest.raises(BasinError, match="2 layer_types entries for 4 layers"):  # checked without transformers
        check_loadable(dict(config, layer_types=["full_attention"] * 2), {})


def test_patch_layers_index_lists_and_counts():
    """Qwen-MoE's mlp_only_layers keep the output layers whose source was listed; T5 counts both stacks."""
    config = {"num_hidden_layers": 4, "mlp_only_layers": [1, 3], "layer_types": list("abcd")}
    patch_layers(config, [(0, None), (1, None), (3, None), (1, None), (2, None)])
    assert config == {"num_hidden_layers": 5, "mlp_only_layers": [1, 2, 3], "layer_types": list("abdbc")}
    t5 = {"num_layers": 4, "num_decoder_layers": 4}
    patch_layers(t5, [(0, None), (1, None)])
    assert t5 == {"num_layers": 2, "num_decoder_layers": 2}


# --- item 2: t = 0 outside the layers (mergekit's planner) ----------------------------------------------------
def test_gradient_outside_the_layers_takes_its_first_value(tmp_path, family_dirs):
    """weight [1, 0] over depth: mergekit gives lm_head and the final norm the first model's (t = 0)."""
    a, b = family_dirs("llama")
    recipe = {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": [1, 0]}},
                                                   {"model": str(b), "parameters": {"weight": [0, 1]}}]}
    merge(recipe, tmp_path / "out", progress=False)
    out, sa, sb = _tensors(tmp_path / "out"), _tensors(a), _tensors(b)
    for name in ("lm_head.weight", "model.norm.weight", "model.embed_tokens.weight"):
        assert torch.equal(out[name], sa[name]), name
    assert torch.equal(out["model.layers.3.mlp.up_proj.weight"], sb["model.layers.3.mlp.up_proj.weight"])  # t = 1


def test_mergekit_ties_example_parameters_outside_the_layers(family_dirs):
    """mergekit's examples/ties.yml on tiny Llamas: lm_head and norm read every gradient at t = 0
    (mergekit 0.1.5 side by side: all 39 tensors bit-identical)."""
    a, b = family_dirs("llama")
    ckpts = {str(p): open_checkpoint(p) for p in (a, b)}
    recipe = Recipe.from_dict({
        "merge_method": "ties", "base_model": str(a), "parameters": {"normalize": True, "int8_mask": True},
        "models": [{"model": str(b), "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}},
                   {"model": str(a), "parameters": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}}]})
    by_name = {tp.name: tp for tp in build_plan(recipe, ckpts).tensors}
    for name in ("lm_head.weight", "model.norm.weight", "model.embed_tokens.weight"):
        assert by_name[name].t == 0.0 and by_name[name].params["density"][0] == 1.0, name
    assert by_name["model.layers.3.mlp.up_proj.weight"].params["density"][0] == pytest.approx(0.1)


# --- item 3: before/after-layer roles per architecture family ------------------------------------------------
EXPECTED_ROLES = {  # hand-written from each family's checkpoint: (before the layers, after them)
    **{f: ({"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"})
       for f in ("llama", "mistral", "qwen2", "qwen3", "phi3", "mixtral")},
    **{f: ({"model.embed_tokens.weight"}, {"model.norm.weight"}) for f in ("qwen2_tied", "gemma2")},
    "gpt2": ({"transformer.wte.weight", "transformer.wpe.weight"},
             {"transformer.ln_f.weight", "transformer.ln_f.bias"}),
    "gpt_neox": ({"gpt_neox.embed_in.weight"},
                 {"gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias", "embed_out.weight"}),
    "bert": ({f"embeddings.{n}" for n in ("word_embeddings.weight", "position_embeddings.weight",
                                          "token_type_embeddings.weight", "LayerNorm.weight", "LayerNorm.bias")},
             {"pooler.dense.weight", "pooler.dense.bias"}),
    "t5": ({"shared.weight"}, {"encoder.final_layer_norm.weight", "decoder.final_layer_norm.weight"}),
}


@pytest.mark.parametrize("name", FAMILIES_ALL)
def test_roles_per_family_in_a_frankenmerge(tmp_path, family_dirs, name):
    """Slices a[0, 3] + b[1, 4]: tensors before the layers are a's, those after them b's (mergekit's planner);
    the output loads with its own class, no missing or unexpected keys, finite outputs."""
    a, b = family_dirs(name)
    pre, post = EXPECTED_ROLES[name]
    merge(_frankenmerge(a, b), tmp_path / "out", progress=False)
    out, sa, sb = _tensors(tmp_path / "out"), _tensors(a), _tensors(b)
    outside = {n for n in out if not any(k in n for k in ("layers.", ".h.", "layer.", "block."))}
    assert outside == pre | post
    for n in pre:
        assert torch.equal(out[n], sa[n]) and not torch.equal(out[n], sb[n]), n
    for n in post:
        assert torch.equal(out[n], sb[n]), n
    assert all(not is_post(n, json.loads((a / "config.json").read_text())) for n in pre)
    model, info = _load(tmp_path / "out")
    assert not any(info.values()), info
    _assert_finite(model)


def _assert_finite(model) -> None:
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            out = model(input_ids=ids, decoder_input_ids=ids)
        else:
            out = model(input_ids=ids)
    value = out.logits if hasattr(out, "logits") else out.last_hidden_state
    assert value.shape[:2] == (1, 4) and torch.isfinite(value).all()


def test_every_family_of_the_table_is_a_transformers_model_type():
    from transformers import CONFIG_MAPPING

    assert set(FAMILIES) <= set(CONFIG_MAPPING.keys())
