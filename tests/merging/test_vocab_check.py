"""The no-rule vocabulary check (`merging.plan.vocab.check_same_vocab`): inputs with equal embedding row counts but
different token -> id maps are refused at plan time unless a tokenizer rule remaps them. The token maps read
from the files are checked against transformers' `get_vocab()`; the expected differences and merged rows are
computed from the word lists the test models are built with."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import merging.plan.vocab as vocab_mod
from merging import merge
from merging.plan.vocab import check_same_vocab, input_vocab, vocab_from_files
from taxonomy.errors import BasinError
from tests.merging.test_vocab_llama import EMBED, HEAD, WORDS_A, save_model, tensors, word_tokenizer

WORDS_C = ["<unk>", "<s>", "</s>", "fig", "apple", "banana", "kiwi", "lime", "date"]  # as many tokens as WORDS_A
MINILM_TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def _linear(a: Path, b: Path, **extra) -> dict:
    return {"merge_method": "linear", "base_model": str(a),
            "models": [{"model": str(a), "parameters": {"weight": 0.3}},
                       {"model": str(b), "parameters": {"weight": 0.7}}], **extra}


def _differing(words_a: list[str], words_b: list[str]) -> list[str]:
    """Tokens of either list whose position differs or that the other list lacks."""
    return [t for t in dict.fromkeys(words_a + words_b)
            if (words_a.index(t) if t in words_a else None) != (words_b.index(t) if t in words_b else None)]


@pytest.fixture(scope="module")
def ac(tmp_path_factory) -> tuple[Path, Path]:
    assert len(WORDS_A) == len(WORDS_C) and WORDS_A != WORDS_C
    root = tmp_path_factory.mktemp("vocab_check")
    return save_model(root / "a", WORDS_A, 0), save_model(root / "c", WORDS_C, 1)


def _hf_vocab(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return dict(AutoTokenizer.from_pretrained(str(folder), local_files_only=True).get_vocab())


def _copy_tokenizer(src: Path, dst: Path, names=MINILM_TOKENIZER) -> Path:
    dst.mkdir(parents=True)
    for name in names:
        shutil.copyfile(src / name, dst / name)
    return dst


def test_same_rows_different_vocab_is_refused(ac):
    a, c = ac
    differing = _differing(WORDS_A, WORDS_C)
    assert differing  # the two vocabularies do differ, with the same size
    with pytest.raises(BasinError) as err:
        merge(_linear(a, c), None, dry_run=True, progress=False)
    msg = str(err.value)
    assert f"tokenizers differ: {a} and {c} have {len(WORDS_A)} vocabulary rows each" in msg
    assert f"{len(differing)} token(s) have different ids" in msg
    moved = [t for t in differing if t in WORDS_A and t in WORDS_C]
    assert f"{len(moved)} in both at other ids" in msg
    assert f"{len([t for t in differing if t not in WORDS_C])} only in {a}" in msg
    first = min(differing, key=lambda t: min(WORDS_A.index(t) if t in WORDS_A else 99,
                                             WORDS_C.index(t) if t in WORDS_C else 99))
    ids = [str(w.index(first)) if first in w else "-" for w in (WORDS_A, WORDS_C)]
    assert f"{first!r}: {ids[0]}/{ids[1]}" in msg
    assert "tokenizer_source: union" in msg and "tokenizer: block" in msg


def test_refused_naming_the_base_first(ac):
    a, c = ac
    recipe = {"merge_method": "task_arithmetic", "base_model": str(c),
              "models": [{"model": str(a), "parameters": {"weight": 0.5}}]}
    with pytest.raises(BasinError, match=rf"tokenizers differ: {c} and {a}"):
        merge(recipe, None, dry_run=True, progress=False)


def test_identical_tokenizers_merge_row_by_row(tmp_path):
    a = save_model(tmp_path / "a", WORDS_A, 0)
    b = save_model(tmp_path / "b", WORDS_A, 1)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    report = merge(_linear(a, b), tmp_path / "out", progress=False)
    assert report.plan.vocab is None
    sa, sb, so = tensors(a), tensors(b), tensors(tmp_path / "out")
    for name in (EMBED, HEAD):
        torch.testing.assert_close(so[name], 0.3 * sa[name] + 0.7 * sb[name])


def test_same_vocab_in_different_files_merges(tmp_path):
    a = save_model(tmp_path / "a", WORDS_A, 0)
    b = save_model(tmp_path / "b", WORDS_A, 1)
    config = json.loads((b / "tokenizer_config.json").read_text())
    config["model_max_length"] = 77  # the files differ, the vocabularies do not
    (b / "tokenizer_config.json").write_text(json.dumps(config))
    merge(_linear(a, b), tmp_path / "out", progress=False)
    sa, sb, so = tensors(a), tensors(b), tensors(tmp_path / "out")
    torch.testing.assert_close(so[EMBED], 0.3 * sa[EMBED] + 0.7 * sb[EMBED])


def test_same_rows_different_vocab_with_union_matches_rows_by_token(tmp_path, ac):
    a, c = ac
    merge(_linear(a, c, tokenizer_source="union"), tmp_path / "out", progress=False)
    out = tmp_path / "out"
    union = WORDS_A + [t for t in WORDS_C if t not in WORDS_A]
    assert _hf_vocab(out) == {t: i for i, t in enumerate(union)}
    sa, sc, so = tensors(a), tensors(c), tensors(out)
    for name in (EMBED, HEAD):
        assert so[name].shape[0] == len(union)
        for i, t in enumerate(union):
            if t in WORDS_A and t in WORDS_C:
                expected = 0.3 * sa[name][WORDS_A.index(t)] + 0.7 * sc[name][WORDS_C.index(t)]
            else:  # only one model has it: that model's row
                expected = sa[name][WORDS_A.index(t)] if t in WORDS_A else sc[name][WORDS_C.index(t)]
            torch.testing.assert_close(so[name][i], expected)


def test_input_without_tokenizer_files_is_not_compared(tmp_path):
    a = save_model(tmp_path / "a", WORDS_A, 0)
    bare = save_model(tmp_path / "bare", None, 1, vocab=len(WORDS_A))
    merge(_linear(a, bare), tmp_path / "out", progress=False)
    sa, sb, so = tensors(a), tensors(bare), tensors(tmp_path / "out")
    torch.testing.assert_close(so[EMBED], 0.3 * sa[EMBED] + 0.7 * sb[EMBED])


def test_vocab_from_files_matches_transformers(tmp_path, minilm_dir):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    word = save_model(tmp_path / "word", WORDS_C, 0)
    minilm = _copy_tokenizer(minilm_dir, tmp_path / "minilm")
    slow = _copy_tokenizer(minilm_dir, tmp_path / "slow", ("vocab.txt", "tokenizer_config.json"))
    added = tmp_path / "added"
    tok = word_tokenizer(WORDS_C)
    tok.add_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save_pretrained(added)
    pieces = [("<unk>", 0.0), ("▁a", -1.0), ("▁b", -2.0), ("c", -3.0), ("▁", -4.0)]
    unigram = tmp_path / "unigram"
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.Unigram(pieces, unk_id=0)),
                            unk_token="<unk>").save_pretrained(unigram)
    for folder in (word, minilm, slow, added, unigram):
        got = vocab_from_files(folder)
        assert got is not None, folder
        assert got == _hf_vocab(folder), folder
    assert vocab_from_files(added)["<|im_end|>"] == len(WORDS_C) + 1


def test_minilm_check_reads_files_only(tmp_path, minilm_dir, monkeypatch):
    a = _copy_tokenizer(minilm_dir, tmp_path / "a")
    b = _copy_tokenizer(minilm_dir, tmp_path / "b")
    rows = {"A": 30522, "B": 30522}

    def no_transformers(*args):
        raise AssertionError("transformers must not be loaded")

    monkeypatch.setattr(vocab_mod, "load_tokenizer", no_transformers)
    check_same_vocab(["A", "B"], {"A": a, "B": b}, rows)  # byte-identical: passes
    data = json.loads((b / "tokenizer.json").read_text())
    voc = data["model"]["vocab"]
    voc["apple"], voc["banana"] = voc["banana"], voc["apple"]
    (b / "tokenizer.json").write_text(json.dumps(data))
    expected = _hf_vocab(minilm_dir)
    expected["apple"], expected["banana"] = expected["banana"], expected["apple"]
    assert vocab_from_files(b) == expected
    with pytest.raises(BasinError, match=r"tokenizers differ: A and B .* 2 token\(s\) have different ids "
                                         r"\(2 in both at other ids, 0 only in A, 0 only in B"):
        check_same_vocab(["A", "B"], {"A": a, "B": b}, rows)


def test_fallbacks_to_transformers_and_warning(tmp_path, ac):
    a, _ = ac
    odd = save_model(tmp_path / "odd", WORDS_A, 2)
    config = json.loads((odd / "tokenizer_config.json").read_text())
    config.setdefault("added_tokens_decoder", {})[str(len(WORDS_A) + 5)] = {"content": "<extra>", "special": True}
    (odd / "tokenizer_config.json").write_text(json.dumps(config))
    assert vocab_from_files(odd) is None  # an added token the files disagree on: transformers decides
    assert input_vocab(odd, "odd") == _hf_vocab(odd)
    broken = save_model(tmp_path / "broken", WORDS_C, 3)
    (broken / "tokenizer.json").write_text("not json")
    (broken / "tokenizer_config.json").unlink()
    rows = {"a": len(WORDS_A), "broken": len(WORDS_C)}
    with pytest.warns(UserWarning, match="broken: its vocabulary is not compared"):
        check_same_vocab(["a", "broken"], {"a": a, "broken": broken}, rows)
