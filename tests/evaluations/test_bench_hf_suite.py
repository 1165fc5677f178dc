"""Issue 24: user YAML suites on Hugging Face checkpoints (folders and the Hub cache) with data files (jsonl, csv),
run end to end through `basin bench --suite`, checked against a direct evaluation of the merged checkpoint."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from evaluations.bench import load_suite
from evaluations.cli import main
from taxonomy.errors import BasinError
from tests.evaluations.conftest import BERT_TOKENIZER
from tests.merging.test_hub_cache_layout import COMMIT, lay_out_exact_cache

GOOD, BAD = ("good", "great", "nice", "fine"), ("bad", "awful", "poor", "sad")
FRUIT = ("apple", "banana")
THINGS = ("movie", "meal", "book", "trip", "game", "song")


def sentiment_rows() -> list[dict]:
    return [{"text": f"the {t} was {a}", "label": int(a in GOOD)} for t in THINGS for a in GOOD + BAD]


def fruit_rows() -> list[dict]:
    return [{"text": f"{a} {t} with an {f}", "label": FRUIT.index(f)} for t in THINGS for a in GOOD for f in FRUIT]


def _config():
    import transformers

    return transformers.BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=40, num_labels=2)


def _save(model, folder: Path, minilm_dir: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    for f in BERT_TOKENIZER:
        shutil.copyfile(minilm_dir / f, folder / f)
    return folder


def _fine_tune(base, rows: list[dict], minilm_dir: Path, seed: int):
    """A BertForSequenceClassification started from `base`'s body, 25 Adam steps on the rule-generated rows."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(_config())
    model.bert.load_state_dict(base.state_dict())
    tok = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    enc = tok([r["text"] for r in rows], padding=True, return_tensors="pt")
    y = torch.tensor([r["label"] for r in rows])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(25):
        opt.zero_grad()
        model(**enc, labels=y).loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def pool(tmp_path_factory, minilm_dir) -> Path:
    """base/ (BertModel), ft-sent/ (a folder), ft-fruit (in a Hub cache at hub/), data files and suite.yaml."""
    import transformers

    root = tmp_path_factory.mktemp("hf_suite")
    torch.manual_seed(0)
    base = transformers.BertModel(_config()).eval()
    _save(base, root / "base", minilm_dir)
    _save(_fine_tune(base, sentiment_rows(), minilm_dir, 1), root / "ft-sent", minilm_dir)
    _save(_fine_tune(base, fruit_rows(), minilm_dir, 2), root / "src-fruit", minilm_dir)
    lay_out_exact_cache(root / "hub", "org/ft-fruit", root / "src-fruit", COMMIT)
    shutil.rmtree(root / "src-fruit")
    sent, fruit = sentiment_rows(), fruit_rows()
    for name, rows in (("sent_val", sent[::2]), ("sent_test", sent[1::2])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, rows in (("fruit_val", fruit[::2]), ("fruit_test", fruit[1::2])):
        with open(root / f"{name}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, ["text", "label"])
            w.writeheader()
            w.writerows(rows)
    (root / "suite.yaml").write_text(f"""
name: tiny-hf
base: ./base
tasks:
  - name: sent
    model: ./ft-sent
    data: {{validation: sent_val.jsonl, test: sent_test.jsonl}}
    metric: accuracy
  - name: fruit
    model: org/ft-fruit@{COMMIT}
    data: {{validation: fruit_val.csv, test: fruit_test.csv}}
methods: [task_arithmetic, ties]
""")
    return root


@pytest.fixture
def offline(pool, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_CACHE", str(pool / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(pool / "hub"), raising=False)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True, raising=False)
    return pool


def _direct_accuracy(folder: Path, data: Path) -> float:
    """The measurement path, independent of the bench: load_model + load_data + class_logits."""
    from evaluations.model_losses import class_logits
    from evaluations.models import load_model
    from evaluations.text_data import load_data

    model = load_model(str(folder))
    hits = rows = 0
    with torch.no_grad():
        for batch in load_data(model, data, seq_len=40, batch_size=5):
            logits, y = class_logits(model, batch)
            hits += int((logits.argmax(-1) == y).sum())
            rows += len(y)
    return hits / rows


def test_yaml_suite_of_hub_checkpoints_matches_a_direct_evaluation(offline, tmp_path, capsys):
    import transformers
    from safetensors.torch import load_file

    pool = offline
    out = tmp_path / "out"
    assert main(["bench", "--suite", str(pool / "suite.yaml"), "--out", str(out), "--no-plots"]) == 0
    capsys.readouterr()
    report = json.loads((out / "bench.json").read_text())
    rows = {r["label"]: r for r in report["rows"]}
    assert {"pretrained", "individual fine-tunes", "task arithmetic", "TIES"} <= set(rows)
    ta = rows["task arithmetic"]
    assert ta["selection"] and ta["paths"]["barrier"].keys() == {"sent", "fruit"}
    lam = ta["params"]["lambda"]
    # the merge computed here by hand: base + lambda * sum of task vectors, over the base model's tensors
    base = load_file(str(pool / "base" / "model.safetensors"))
    snapshot = pool / "hub" / "models--org--ft-fruit" / "snapshots" / COMMIT
    folders = {"sent": pool / "ft-sent", "fruit": snapshot}
    fts = {t: load_file(str(f / "model.safetensors")) for t, f in folders.items()}
    data = {"sent": pool / "sent_test.jsonl", "fruit": pool / "fruit_test.csv"}
    for task, folder in folders.items():
        merged = transformers.BertForSequenceClassification.from_pretrained(folder).eval()
        state = merged.state_dict()
        for name, b in base.items():
            key = "bert." + name
            if key in state:
                state[key] = b + lam * sum(ft[key] - b for ft in fts.values())
        merged.load_state_dict(state)
        target = _save(merged, tmp_path / f"merged-{task}", pool / "ft-sent")
        merged_acc = _direct_accuracy(target, data[task])
        ft_acc = _direct_accuracy(folder, data[task])
        assert rows["individual fine-tunes"]["scores"][task] == pytest.approx(ft_acc, abs=1e-9)
        assert ta["scores"][task] == pytest.approx(merged_acc, abs=1e-9)
        assert ta["normalized"][task] == pytest.approx(merged_acc / ft_acc, abs=1e-9)
    assert rows["individual fine-tunes"]["scores"]["sent"] > rows["pretrained"]["scores"]["sent"]


def _suite(pool: Path, text: str) -> Path:
    path = pool / "bad.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.replace("metric: accuracy", "metrc: accuracy"), r"tasks\[0\]: unknown field 'metrc'"),
    (lambda s: s.replace("sent_test.jsonl", "nope.jsonl"), r"tasks\[0\]\.data\.test: no such file"),
    (lambda s: s.replace("{validation: sent_val.jsonl, ", "{"), r"missing split 'validation'"),
    (lambda s: s.replace("methods: [", "method: ["), r"unknown field 'method'"),
    (lambda s: s.replace("[task_arithmetic, ties]", "[task_arithmetic, nosuch]"), r"methods\[1\]"),
    (lambda s: s.replace("metric: accuracy", "metric: f1"), r"tasks\[0\]\.metric: must be one of"),
])
def test_bad_fields_are_one_line_errors(offline, edit, message):
    path = _suite(offline, edit((offline / "suite.yaml").read_text()))
    with pytest.raises(BasinError, match=message) as err:
        load_suite(str(path))
    assert "\n" not in str(err.value)


def test_other_architecture_and_label_on_causal_lm_refused(offline, kind_ckpts):
    text = (offline / "suite.yaml").read_text()
    llama_cls = kind_ckpts["llama_cls"]
    with pytest.raises(BasinError, match=r"tasks\[1\].*(architecture|LlamaForSequenceClassification)"):
        load_suite(str(_suite(offline, text.replace(f"org/ft-fruit@{COMMIT}", str(llama_cls)))))
    causal = text.replace(f"org/ft-fruit@{COMMIT}", str(kind_ckpts["llama"]))
    with pytest.raises(BasinError, match=r"tasks\[1\]\.data: .*column 'label' is only for a sequence classifier"):
        load_suite(str(_suite(offline, causal)))
