"""`evaluations.text_data.load_data` on every data format and model kind, and its one-line errors.

References: the tokenizer's own ids per row (by hand), the same rows written as jsonl, csv and parquet, the mask
drawn twice with one seed."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from evaluations.text_data import TextData, load_data
from taxonomy.errors import BasinError, DataError

ROWS = [
    {"text": "apple banana cherry", "text_pair": "banana cherry", "label": 2},
    {"text": "date elder", "text_pair": "elder date fig", "label": 0},
    {"text": "fig grape apple fig date", "text_pair": "grape", "label": 1},
    {"text": "cherry", "text_pair": "cherry apple", "label": 2},
    {"text": "banana banana grape elder", "text_pair": "fig fig", "label": 0},
]


def write_rows(path: Path, rows: list[dict]) -> Path:
    """`rows` as a .jsonl, .csv or .parquet file (by `path`'s suffix)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def columns(rows: list[dict], *names: str) -> list[dict]:
    return [{k: r[k] for k in names} for r in rows]


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _equal(a: TextData, b: TextData) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


@pytest.mark.parametrize("model, names, kind", [
    ("llama", ("text",), "text rows"), ("bert_cls", ("text", "label"), "labelled text"),
    ("bert_cls", ("text", "text_pair", "label"), "labelled text pairs"), ("bert", ("text", "text_pair"), "text pairs"),
    ("bert_mlm", ("text",), "text rows"),
])
def test_jsonl_csv_parquet_give_identical_batches(kind_ckpts, tmp_path, model, names, kind):
    rows = columns(ROWS, *names)
    loaded = [load_data(kind_ckpts[model], write_rows(tmp_path / f"d.{ext}", rows), seq_len=16, batch_size=2)
              for ext in ("jsonl", "csv", "parquet")]
    assert all(d.kind == kind and d.examples == 5 for d in loaded)
    assert _equal(loaded[0], loaded[1]) and _equal(loaded[0], loaded[2])
    assert [b["input_ids"].shape[0] for b in loaded[0]] == ([2, 3] if model == "bert" else [2, 2, 1])


def test_text_rows_for_a_causal_lm_are_the_tokenizers_ids_padded(kind_ckpts, tmp_path):
    data = load_data(kind_ckpts["llama"], write_rows(tmp_path / "d.jsonl", columns(ROWS, "text")), seq_len=4,
                     batch_size=3)
    tok = _tokenizer(kind_ckpts["llama"])
    want = [tok(r["text"])["input_ids"][:4] for r in ROWS]  # truncated to seq_len
    first = data[0]
    assert first["input_ids"].shape == (3, 4) and set(first) == {"input_ids", "attention_mask", "labels"}
    for i, ids in enumerate(want[:3]):
        n = len(ids)
        assert first["input_ids"][i, :n].tolist() == ids
        assert first["attention_mask"][i].tolist() == [1] * n + [0] * (4 - n)
        assert first["labels"][i].tolist() == ids + [-100] * (4 - n)
    assert data[1]["input_ids"].shape == (2, 4)  # padded to its own longest row
    assert data.tokens == sum(map(len, want)) and len(data) == 2 and list(data) == data.batches


def test_classifier_rows_carry_labels_names_and_token_types(kind_ckpts, tmp_path):
    rows = [{**r, "label": f"LABEL_{r['label']}"} for r in columns(ROWS, "text", "text_pair", "label")]
    data = load_data(kind_ckpts["bert_cls"], write_rows(tmp_path / "d.jsonl", rows), seq_len=16, batch_size=8)
    batch = data[0]
    assert batch["labels"].tolist() == [r["label"] for r in ROWS]
    enc = _tokenizer(kind_ckpts["bert_cls"])(ROWS[0]["text"], ROWS[0]["text_pair"])
    n = len(enc["input_ids"])
    assert batch["input_ids"][0, :n].tolist() == enc["input_ids"]
    assert batch["token_type_ids"][0, :n].tolist() == enc["token_type_ids"] and 1 in enc["token_type_ids"]


def test_encoder_pairs_fold_a_lone_last_pair_into_the_batch_before(kind_ckpts, tmp_path):
    path = write_rows(tmp_path / "d.jsonl", columns(ROWS, "text", "text_pair"))
    data = load_data(kind_ckpts["bert"], path, seq_len=16, batch_size=4)
    assert [len(b["input_ids"]) for b in data] == [5] and data.kind == "text pairs"
    tok = _tokenizer(kind_ckpts["bert"])
    pair = tok(ROWS[2]["text_pair"])["input_ids"]
    assert data[0]["pair_input_ids"][2, :len(pair)].tolist() == pair
    assert data[0]["pair_attention_mask"][2].sum() == len(pair)
    assert data.tokens == sum(len(tok(r["text"])["input_ids"]) + len(tok(r["text_pair"])["input_ids"]) for r in ROWS)


def test_packed_text_for_a_masked_lm_is_wrapped_in_special_tokens(kind_ckpts, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(r["text"] for r in ROWS))
    data = load_data(kind_ckpts["bert_mlm"], text, seq_len=6, batch_size=8)
    tok = _tokenizer(kind_ckpts["bert_mlm"])
    ids = tok(text.read_text(), add_special_tokens=False)["input_ids"]
    batch = data[0]
    assert batch["input_ids"].shape == (-(-len(ids) // 4), 6) and data.kind == "packed text"
    assert (batch["input_ids"][:, 0] == tok.cls_token_id).all()
    restored = torch.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])
    assert restored[0].tolist() == [tok.cls_token_id, *ids[:4], tok.sep_token_id]


@pytest.mark.parametrize("source", ["rows", "txt"])
def test_mask_is_fixed_by_the_seed(kind_ckpts, tmp_path, source):
    if source == "rows":
        path = write_rows(tmp_path / "d.parquet", columns(ROWS, "text") * 4)
    else:
        path = tmp_path / "t.txt"
        path.write_text(" ".join(r["text"] for r in ROWS) * 3)
    tok = _tokenizer(kind_ckpts["bert_mlm"])
    first, again, other = (load_data(kind_ckpts["bert_mlm"], path, seq_len=12, batch_size=4, seed=s)
                           for s in (7, 7, 8))
    assert _equal(first, again) and not _equal(first, other)
    for batch in first:
        labels, ids = batch["labels"], batch["input_ids"]
        masked = labels != -100
        assert (ids[masked] == tok.mask_token_id).all() and (ids[~masked] != tok.mask_token_id).all()
        assert not torch.isin(labels[masked], torch.tensor(tok.all_special_ids)).any()
        real = batch["attention_mask"].sum(1) - 2  # non-special tokens per row
        want = torch.clamp((0.15 * real + 0.5).floor(), min=1)
        assert masked.sum(1).tolist() == want.long().tolist()


def test_max_examples_and_seed_make_the_draw_reproducible(kind_ckpts, tmp_path):
    path = write_rows(tmp_path / "d.csv", columns(ROWS, "text", "label") * 3)
    picks = [load_data(kind_ckpts["bert_cls"], path, seq_len=16, max_examples=4, seed=s) for s in (1, 1, 2)]
    assert picks[0].examples == 4 and _equal(picks[0], picks[1])
    assert not _equal(picks[0], picks[2])


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _bad_file(tmp_path: Path, case: str) -> Path:
    files = {
        "empty.jsonl": b"", "blank.csv": b"\n\n", "binary.jsonl": bytes(range(256)) * 4,
        "binary.txt": b"\x89PNG\r\n\x1a\n\x00\x00", "binary.parquet": b"not parquet at all",
        "data.tsv": b"text\tlabel\n", "broken.jsonl": b'{"text": "apple"\n',
    }
    if case in files:
        (tmp_path / case).write_bytes(files[case])
    return tmp_path / case


ERRORS = [
    ("llama", "empty.jsonl", {}, "empty.jsonl: the data file is empty"),
    ("llama", "blank.csv", {}, "blank.csv: the data file is empty"),
    ("llama", "binary.jsonl", {}, "binary.jsonl: not a text file"),
    ("bert_mlm", "binary.txt", {}, "binary.txt: not a text file"),
    ("bert", "binary.parquet", {}, "binary.parquet: not a parquet file"),
    ("llama", "data.tsv", {}, "data.tsv: unknown data file extension '.tsv'"),
    ("llama", "broken.jsonl", {}, "broken.jsonl: cannot read the rows"),
    ("llama", "missing.jsonl", {}, "missing.jsonl: no such data file"),
    ("llama", ("notext.jsonl", [{"body": "apple"}]), {}, "no 'text' column (columns: body)"),
    ("llama", ("lab.jsonl", columns(ROWS, "text", "label")), {}, "column 'label' is only for a sequence classifier"),
    ("gpt2", ("pair.csv", columns(ROWS, "text", "text_pair")), {}, "column 'text_pair' is not used by a causal LM"),
    ("bert_mlm", ("lab.parquet", columns(ROWS, "text", "label")), {}, "column 'label' is only for"),
    ("bert_cls", ("nolab.jsonl", columns(ROWS, "text")), {}, "needs a 'label' column"),
    ("bert_cls", ("big.jsonl", [{"text": "apple", "label": 3}]), {}, "row 0: label 3 is out of range for the "
     "model's num_labels=3"),
    ("llama_cls", ("neg.csv", [{"text": "apple", "label": 1}, {"text": "fig", "label": -1}]), {}, "row 1: label -1 "
     "is out of range"),
    ("bert_cls", ("name.jsonl", [{"text": "apple", "label": "POSITIVE"}]), {}, "row 0: label 'POSITIVE' is not a "
     "class index"),
    ("bert", ("nopair.jsonl", columns(ROWS, "text")), {}, "add a 'text_pair' column"),
    ("bert", ("one.jsonl", columns(ROWS[:1], "text", "text_pair")), {}, "needs at least 2 pairs per batch"),
    ("bert", ("p.jsonl", columns(ROWS, "text", "text_pair")), {"batch_size": 1}, "needs at least 2 pairs"),
    ("llama", ("blank.jsonl", [{"text": "apple"}, {"text": " "}]), {}, "row 1: column 'text' is empty"),
    ("llama", ("null.jsonl", [{"text": "apple"}, {"text": None}]), {}, "row 1: column 'text' is None"),
    ("bert", ("calib.txt", None), {}, "an encoder is measured on rows with `text` and `text_pair` columns"),
    ("bert_cls", ("calib.txt", None), {}, "a sequence classifier is measured on rows with a `label` column"),
    ("gpt2", ("calib.txt", None), {"seq_len": 25}, "seq_len=25 exceeds the model's 24 positions"),
    ("bert_mlm", ("calib.txt", None), {"seq_len": 41}, "seq_len=41 exceeds the model's 40 positions"),
    ("bert_mlm", ("calib.txt", None), {"seq_len": 2}, "leaves no room beside the tokenizer's special tokens"),
]


@pytest.mark.parametrize("model, case, kwargs, fragment", ERRORS)
def test_bad_data_is_a_one_line_error_naming_the_file(kind_ckpts, tmp_path, model, case, kwargs, fragment):
    if isinstance(case, tuple):
        name, rows = case
        path = write_rows(tmp_path / name, rows) if rows is not None else tmp_path / name
        if rows is None:
            path.write_text("apple banana cherry date\n")
    else:
        path = _bad_file(tmp_path, case)
    with pytest.raises(DataError) as err:
        load_data(kind_ckpts[model], path, **{"seq_len": 16, **kwargs})
    message = str(err.value)
    assert fragment in message and "\n" not in message, message
    if "seq_len" not in fragment and "room" not in fragment:
        assert path.name in message


def test_missing_tokenizer_is_a_one_line_error(kind_ckpts, tmp_path):
    for name in ("bert_cls", "llama"):
        folder = _copy(kind_ckpts[name], tmp_path / f"notok-{name}")
        for f in folder.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "vocab")):
                f.unlink()
        path = write_rows(tmp_path / "d.jsonl", columns(ROWS, "text", "label"))
        with pytest.raises(DataError, match=f"notok-{name}: no usable tokenizer in the checkpoint folder"):
            load_data(folder, path, seq_len=16)


def test_tabular_data_without_datasets_names_the_extra(kind_ckpts, tmp_path, monkeypatch):
    path = write_rows(tmp_path / "d.jsonl", columns(ROWS, "text"))
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"needs the `datasets` package: pip install 'basin\[data\]'"):
        load_data(kind_ckpts["llama"], path, seq_len=16)
    text = tmp_path / "t.txt"
    text.write_text("apple banana cherry")
    assert load_data(kind_ckpts["llama"], text, seq_len=4).tokens == 3  # .txt needs no extra


def test_a_model_without_a_checkpoint_folder_is_refused(tmp_path):
    from torch import nn

    with pytest.raises(BasinError, match="no text objective|no checkpoint folder"):
        load_data(nn.Linear(2, 2), tmp_path / "x.txt")


def test_default_block_length_fits_the_model(kind_ckpts, tmp_path):
    """No seq_len asked: 128 tokens per block, or the model's positions where it has fewer (these tiny models have
    24-40); an explicit length over them stays an error naming the limit."""
    from evaluations.models import load_model

    path = tmp_path / "calib.txt"
    path.write_text("apple banana cherry date " * 60 + "\n")
    for name, positions in (("gpt2", 24), ("bert_mlm", 40), ("llama", 32)):
        data = load_data(kind_ckpts[name], path)
        assert data.seq_len == positions
        assert max(b["input_ids"].shape[1] for b in data) == positions
        model = load_model(kind_ckpts[name])
        assert load_data(model, path).seq_len == positions
    with pytest.raises(DataError, match="ask for at most 24 tokens per block"):
        load_data(kind_ckpts["gpt2"], path, seq_len=25)
