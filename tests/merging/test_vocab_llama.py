"""Tokenizer and vocabulary surgery end to end: two tiny Llamas whose tokenizers differ (built here with
`tokenizers` WordLevel models), merged under `tokenizer_source` / `tokenizer:` rules; the expected rows are
computed by token string from the inputs' own tensors and tokenizers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from merging import merge, open_checkpoint
from taxonomy.errors import BasinError

WORDS_A = ["<unk>", "<s>", "</s>", "apple", "banana", "cherry", "date", "elder", "fig"]
WORDS_B = ["<unk>", "<s>", "</s>", "fig", "zebra", "banana", "yak", "apple", "walrus", "xenon"]
ONLY_A = ["cherry", "date", "elder"]
ONLY_B = ["zebra", "yak", "walrus", "xenon"]
SHARED = ["<unk>", "<s>", "</s>", "apple", "banana", "fig"]
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def word_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_llama(vocab: int, seed: int, tied: bool = False, model_type: str = "llama"):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=tied)
    if model_type == "mistral":
        return MistralForCausalLM(MistralConfig(**kwargs)).eval()
    return LlamaForCausalLM(LlamaConfig(**kwargs)).eval()


def save_model(folder: Path, words: list[str] | None, seed: int, vocab: int | None = None, **kwargs) -> Path:
    model = tiny_llama(vocab or len(words or []), seed, **kwargs)
    model.save_pretrained(folder, safe_serialization=True)
    if words is not None:
        word_tokenizer(words).save_pretrained(folder)
    return folder


def tensors(folder) -> dict[str, torch.Tensor]:
    c = open_checkpoint(folder)
    return {n: c.get(n).float() for n in c.names()}


@pytest.fixture(scope="module")
def ab(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("vocab")
    return save_model(root / "a", WORDS_A, 0), save_model(root / "b", WORDS_B, 1)


def _linear(a: Path, b: Path, **extra) -> dict:
    return {"merge_method": "linear", "base_model": str(a),
            "models": [{"model": str(a), "parameters": {"weight": 0.3}},
                       {"model": str(b), "parameters": {"weight": 0.7}}], **extra}


def _row(state: dict, name: str, words: list[str], token: str) -> torch.Tensor:
    return state[name][words.index(token)]


def _linear_row(sa: dict, sb: dict, name: str, token: str) -> torch.Tensor:
    """The row the 0.3 / 0.7 linear merge (`_linear`) gives a token both vocabularies have."""
    return 0.3 * _row(sa, name, WORDS_A, token) + 0.7 * _row(sb, name, WORDS_B, token)


def test_union_tokenizer_and_rows(tmp_path, ab):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a, b = ab
    merge(_linear(a, b, tokenizer_source="union"), tmp_path / "out", progress=False)
    out = tmp_path / "out"
    tok = AutoTokenizer.from_pretrained(out)
    union = WORDS_A + ONLY_B  # the base's tokens keep their ids, then B's new ones by B's id
    assert {t: tok.convert_tokens_to_ids(t) for t in union} == {t: i for i, t in enumerate(union)}
    text = "apple zebra cherry walrus fig xenon yak date"
    assert tok(text, add_special_tokens=False).input_ids == [union.index(w) for w in text.split()]
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == len(union)
    sa, sb, so = tensors(a), tensors(b), tensors(out)
    for name in (EMBED, HEAD):
        assert so[name].shape == (len(union), 16)
        for t in ONLY_A:
            torch.testing.assert_close(so[name][union.index(t)], _row(sa, name, WORDS_A, t))
        for t in ONLY_B:
            torch.testing.assert_close(so[name][union.index(t)], _row(sb, name, WORDS_B, t))
        for t in SHARED:
            expected = _linear_row(sa, sb, name, t)
            torch.testing.assert_close(so[name][union.index(t)], expected)
    layer = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(so[layer], 0.3 * sa[layer] + 0.7 * sb[layer])
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.vocab_size == len(union)
    with torch.no_grad():
        logits = model(torch.tensor([tok(text).input_ids])).logits
    assert logits.shape[-1] == len(union) and torch.isfinite(logits).all()


def test_remapped_tensors_are_never_in_flight_together(tmp_path, ab, monkeypatch):
    """The engine merges largest first, but tensors remapped to the union vocabulary (fresh copies, not mapped
    files) lead, `prefetch` (2) other tensors apart, so no two are held at once."""
    import merging.methods.apply

    order, original = [], merging.methods.apply.merge_tensor

    def recording(method, name, *args, **kwargs):
        order.append(name)
        return original(method, name, *args, **kwargs)

    monkeypatch.setattr(merging.methods.apply, "merge_tensor", recording)
    merge(_linear(*ab, tokenizer_source="union"), tmp_path / "out", progress=False)
    assert sorted((order.index(EMBED), order.index(HEAD))) == [0, 3]
    state = tensors(ab[0])
    sizes = [state[n].numel() for n in order if n not in (EMBED, HEAD)]
    assert sizes == sorted(sizes, reverse=True)


def test_pad_to_multiple_of_pads_with_each_models_mean_row(tmp_path, ab):
    from transformers import AutoModelForCausalLM

    a, b = ab
    recipe = _linear(a, b, tokenizer={"source": "union", "pad_to_multiple_of": 8})
    merge(recipe, tmp_path / "out", progress=False)
    n = len(WORDS_A) + len(ONLY_B)
    padded = -(-n // 8) * 8
    assert padded > n
    assert json.loads((tmp_path / "out/config.json").read_text())["vocab_size"] == padded
    sa, sb, so = tensors(a), tensors(b), tensors(tmp_path / "out")
    for name in (EMBED, HEAD):
        assert so[name].shape[0] == padded
        expected = 0.3 * sa[name].mean(0) + 0.7 * sb[name].mean(0)
        for row in range(n, padded):
            torch.testing.assert_close(so[name][row], expected)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.get_input_embeddings().weight.shape[0] == padded


@pytest.mark.parametrize("rule", ["tokenizer_source", "tokenizer_block"])
def test_tokenizer_source_model_remaps_to_that_vocabulary(tmp_path, ab, rule):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a, b = ab
    extra = {"tokenizer_source": str(b)} if rule == "tokenizer_source" else {"tokenizer": {"source": str(b)}}
    merge(_linear(a, b, **extra), tmp_path / "out", progress=False)
    out = tmp_path / "out"
    assert (out / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    assert AutoTokenizer.from_pretrained(out).get_vocab() == {w: i for i, w in enumerate(WORDS_B)}
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(WORDS_B)
    sa, sb, so = tensors(a), tensors(b), tensors(out)
    for name in (EMBED, HEAD):
        assert so[name].shape[0] == len(WORDS_B)
        for t in ONLY_B:
            torch.testing.assert_close(so[name][WORDS_B.index(t)], _row(sb, name, WORDS_B, t))
        for t in SHARED:
            expected = _linear_row(sa, sb, name, t)
            torch.testing.assert_close(so[name][WORDS_B.index(t)], expected)
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == len(WORDS_B)


def test_tokenizer_source_base_keeps_base_vocabulary(tmp_path, ab):
    a, b = ab
    merge(_linear(a, b, tokenizer_source="base"), tmp_path / "out", progress=False)
    sa, sb, so = tensors(a), tensors(b), tensors(tmp_path / "out")
    assert so[EMBED].shape[0] == len(WORDS_A)
    for t in ONLY_A:
        torch.testing.assert_close(so[EMBED][WORDS_A.index(t)], _row(sa, EMBED, WORDS_A, t))
    for t in SHARED:
        expected = _linear_row(sa, sb, EMBED, t)
        torch.testing.assert_close(so[EMBED][WORDS_A.index(t)], expected)


def test_token_overrides(tmp_path, ab):
    a, b = ab
    tokens = {
        "apple": {"source": {"kind": "zero"}, "force": True},  # every model takes zeros: the merge is zero
        "banana": {"source": str(b), "force": True},  # every model takes B's banana row
        "cherry": {"source": {"kind": "model_token", "model": str(b), "token": "zebra"}},  # B lacks it: zebra
        "yak": {"source": {"kind": "model_token", "model": str(a), "token_id": 4}},  # A lacks it: A's row 4
    }
    merge(_linear(a, b, tokenizer={"source": "union", "tokens": tokens}), tmp_path / "out", progress=False)
    union = WORDS_A + ONLY_B
    sa, sb, so = tensors(a), tensors(b), tensors(tmp_path / "out")
    for name in (EMBED, HEAD):
        row = {t: so[name][union.index(t)] for t in union}
        torch.testing.assert_close(row["apple"], torch.zeros(16))
        torch.testing.assert_close(row["banana"], _row(sb, name, WORDS_B, "banana"))
        torch.testing.assert_close(row["cherry"], 0.3 * _row(sa, name, WORDS_A, "cherry")
                                   + 0.7 * _row(sb, name, WORDS_B, "zebra"))
        torch.testing.assert_close(row["yak"], 0.3 * sa[name][4] + 0.7 * _row(sb, name, WORDS_B, "yak"))


def test_vocab_mismatch_without_rule_fails_at_plan_time(tmp_path, ab):
    a, b = ab
    with pytest.raises(BasinError, match=rf"vocabulary sizes differ: {a} has 9 rows .*{b} has 10 .*tokenizer_source"):
        merge(_linear(a, b), None, dry_run=True, progress=False)
    assert not (tmp_path / "out").exists()


def test_dry_run_shows_the_remap(tmp_path, ab):
    a, b = ab
    report = merge(_linear(a, b, tokenizer_source="union"), None, dry_run=True, progress=False)
    remapped = sorted(t.name for t in report.plan.tensors if t.vocab)
    assert remapped == [HEAD, EMBED]
    assert {t.name: t.shape for t in report.plan.tensors}[EMBED] == (len(WORDS_A) + len(ONLY_B), 16)
    assert "vocabulary: union" in report.plan.table()
    assert report.plan.to_json()["vocab"]["added_tokens"] == len(ONLY_B)


def test_same_tokenizer_is_left_untouched(tmp_path):
    a = save_model(tmp_path / "a", WORDS_A, 0)
    b = save_model(tmp_path / "b", WORDS_A, 1)
    report = merge(_linear(a, b, tokenizer_source="union"), tmp_path / "out", progress=False)
    assert report.plan.vocab is not None and report.plan.vocab.identity
    assert not any(t.vocab for t in report.plan.tensors)
    sa, sb, so = tensors(a), tensors(b), tensors(tmp_path / "out")
    torch.testing.assert_close(so[EMBED], 0.3 * sa[EMBED] + 0.7 * sb[EMBED])
    assert (tmp_path / "out/tokenizer.json").read_bytes() == (a / "tokenizer.json").read_bytes()


def test_union_needs_tokenizer_files(tmp_path, ab):
    a, _ = ab
    bare = save_model(tmp_path / "bare", None, 2, vocab=12)
    with pytest.raises(BasinError, match=rf"{bare} has no tokenizer files and 12 embedding rows"):
        merge(_linear(a, bare, tokenizer_source="union"), None, dry_run=True, progress=False)


TOKENIZER_CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "tokenizer").glob("*.yaml"))


@pytest.mark.parametrize("config", TOKENIZER_CONFIGS, ids=[c.stem for c in TOKENIZER_CONFIGS])
def test_documented_tokenizer_configs_run(config, tmp_path, ab):
    from string import Template

    from transformers import AutoModelForCausalLM, AutoTokenizer

    a, b = ab
    text = Template(config.read_text()).substitute({"A": str(a), "B": str(b)})
    merge(text, tmp_path / "out", progress=False)
    out = tmp_path / "out"
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("banana zebra apple", add_special_tokens=False).input_ids
    assert tok.convert_ids_to_tokens(ids) == ["banana", "zebra", "apple"]
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([ids])).logits).all()
    sa, sb, so = tensors(a), tensors(b), tensors(out)
    vocab = tok.get_vocab()
    row = {t: so[EMBED][vocab[t]] for t in ("apple", "banana", "zebra")}
    torch.testing.assert_close(row["zebra"], _row(sb, EMBED, WORDS_B, "zebra"))  # only in B (task vector 0)
    if config.stem == "union_tokens":
        assert model.config.vocab_size == so[EMBED].shape[0] == 16
        torch.testing.assert_close(row["apple"], _row(sb, EMBED, WORDS_B, "apple"))
        torch.testing.assert_close(row["banana"], 0.5 * _row(sa, EMBED, WORDS_A, "banana")
                                   + 0.5 * _row(sb, EMBED, WORDS_B, "banana"))  # not forced: both keep theirs
        torch.testing.assert_close(so[EMBED][vocab["cherry"]], 0.5 * _row(sa, EMBED, WORDS_A, "cherry")
                                   + 0.5 * _row(sb, EMBED, WORDS_B, "zebra"))
    else:  # task arithmetic from A with B's vocabulary: A's row + 0.5 (B's row - A's row)
        ra, rb = _row(sa, EMBED, WORDS_A, "apple"), _row(sb, EMBED, WORDS_B, "apple")
        torch.testing.assert_close(row["apple"], ra + 0.5 * (rb - ra))


# --- issue 17 follow-up: mergekit's mapping form of a model reference as a tokenizer source ----------------------
def test_parse_tokenizer_mapping_references():
    """tokenizer_source / tokenizer.source / token rules take {model: <path or {path, revision}>, lora: ...}."""
    from merging.recipe.schema import Recipe
    from merging.recipe.tokenizer import parse_tokenizer

    spec = parse_tokenizer({"model": {"path": "org/m", "revision": "v2"}}, None)
    assert spec.source == "org/m@v2" and spec.model_ref == "org/m@v2"
    assert parse_tokenizer(None, {"source": {"model": {"path": "org/m"}, "lora": "org/l"}}).source == "org/m+org/l"
    assert parse_tokenizer(None, {"source": " base "}).source == "base"
    tokens = {"x": {"source": {"model": {"path": "org/a", "revision": "r"}}},
              "y": {"source": {"kind": "model_token", "model": {"model": {"path": "org/b"}}, "token_id": 1}}}
    rules = parse_tokenizer(None, {"source": "union", "tokens": tokens}).tokens
    assert (rules["x"].source.kind, rules["x"].source.model) == ("model", "org/a@r")
    assert (rules["y"].source.kind, rules["y"].source.model) == ("model_token", "org/b")
    recipe = Recipe.from_dict({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}}],
                               "tokenizer": {"source": {"model": {"path": "org/t", "revision": "main"}}}})
    assert recipe.tokenizer_ref == "org/t@main"


@pytest.mark.parametrize("block, message", [
    ({"source": {"path": "org/m"}}, r"recipe: tokenizer\.source: a model reference mapping needs 'model'"),
    ({"source": {"model": {"path": "org/m", "rev": "x"}}}, r"recipe: tokenizer\.source\.model: unknown field 'rev'"),
    ({"source": 3}, r"recipe: tokenizer\.source must be 'base', 'union' or a model reference, got 3"),
    ({"tokens": {"t": {"source": {"kind": "model_token", "model": {"lora": "x"}, "token": "a"}}}},
     r"tokens\['t'\]\.source\.model: a model reference mapping needs 'model'"),
])
def test_parse_tokenizer_bad_mapping_is_one_line(block, message):
    from merging.recipe.tokenizer import parse_tokenizer

    with pytest.raises(BasinError, match=message) as e:
        parse_tokenizer(None, block)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("form", ["tokenizer_source", "tokenizer_block", "tokenizer_block_path"])
def test_mapping_tokenizer_source_merges_as_the_string(tmp_path, ab, form):
    """The mapping forms give the same output, bit for bit, as `tokenizer_source: <B>` (local folders)."""
    a, b = ab
    extra = {"tokenizer_source": {"model": str(b)}} if form == "tokenizer_source" else {
        "tokenizer": {"source": {"model": {"path": str(b)}} if form.endswith("path") else {"model": str(b)}}}
    tokens = {"apple": {"source": {"model": {"path": str(a)}}, "force": True},
              "yak": {"source": {"kind": "model_token", "model": {"model": {"path": str(a)}}, "token_id": 4}}}
    plain = {"apple": {"source": str(a), "force": True},
             "yak": {"source": {"kind": "model_token", "model": str(a), "token_id": 4}}}
    merge(_linear(a, b, tokenizer_source=str(b)), tmp_path / "ref", progress=False)
    merge(_linear(a, b, **extra), tmp_path / "out", progress=False)
    assert tensors(tmp_path / "out").keys() == tensors(tmp_path / "ref").keys()
    for name, t in tensors(tmp_path / "ref").items():
        assert torch.equal(tensors(tmp_path / "out")[name], t), name
    merge(_linear(a, b, tokenizer={"source": "union", "tokens": plain}), tmp_path / "ref2", progress=False)
    merge(_linear(a, b, tokenizer={"source": "union", "tokens": tokens}), tmp_path / "out2", progress=False)
    ref2, out2 = tensors(tmp_path / "ref2"), tensors(tmp_path / "out2")
    assert all(torch.equal(out2[n], ref2[n]) for n in ref2) and ref2.keys() == out2.keys()
