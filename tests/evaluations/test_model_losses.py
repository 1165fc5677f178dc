"""The loss follows the model: `measure_loss` with each kind's objective against hand loops over single examples.

References: every example forwarded alone (no padding, no batching), its loss summed in float64 by hand; the real
all-MiniLM-L6-v2 for the contrastive loss (matching pairs must beat shuffled ones)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from evaluations.measure import LossReport, describe, measure_loss
from evaluations.model_losses import (
    CAUSAL_LM,
    CONTRASTIVE,
    MASKED_LM,
    SEQUENCE_CLASSIFICATION,
    model_kind,
    objective_for,
)
from evaluations.models import load_model
from evaluations.text_data import load_data
from taxonomy.errors import DataError
from tests.evaluations.test_text_data import ROWS, columns, write_rows

TOL = {"float32": 1e-5, "bfloat16": 3e-2}
PAIRS = [
    {"text": "A man is playing a guitar on stage.", "text_pair": "Someone plays an acoustic guitar for a crowd."},
    {"text": "The cat is sleeping on the sofa.", "text_pair": "A kitten naps on the couch."},
    {"text": "Stock markets fell sharply today.", "text_pair": "Share prices dropped steeply on the exchange."},
    {"text": "She is cooking pasta in the kitchen.", "text_pair": "A woman prepares spaghetti for dinner."},
    {"text": "The train to Paris leaves at noon.", "text_pair": "The Paris train departs at twelve o'clock."},
]


def _rows(batches, *keys: str):
    """Each example of the batches, unpadded: a dict of 1-row tensors (plus its label / masked labels)."""
    for batch in batches:
        for i in range(len(batch["input_ids"])):
            n = int(batch["attention_mask"][i].sum())
            yield {k: batch[k][i : i + 1, :n] for k in keys if k in batch}, batch["labels"][i]


def _ce64(logits: torch.Tensor, target: int) -> float:
    return float(-logits.double().log_softmax(-1)[target])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name, source", [("llama", "rows"), ("gpt2", "rows"), ("llama", "txt")])
def test_causal_lm_perplexity_is_exp_of_the_hand_mean(kind_ckpts, tmp_path, dtype, name, source):
    model = load_model(kind_ckpts[name], dtype=dtype)
    if source == "rows":
        path = write_rows(tmp_path / "d.jsonl", columns(ROWS, "text"))
    else:
        path = tmp_path / "t.txt"
        path.write_text(" ".join(r["text"] for r in ROWS))
    data = load_data(model, path, seq_len=6, batch_size=2)
    got = measure_loss(model, data)
    losses, wrong = [], 0
    with torch.no_grad():
        for x, labels in _rows(data, "input_ids"):
            logits = model(**x).logits[0].float()
            for t in range(x["input_ids"].shape[1] - 1):
                y = int(labels[t + 1])
                losses.append(_ce64(logits[t], y))
                wrong += int(logits[t].argmax()) != y
    mean = sum(losses) / len(losses)
    assert got.objective == CAUSAL_LM.name and got.rows == got.tokens == len(losses) and got.examples == data.examples
    assert got.loss == pytest.approx(mean, rel=TOL[dtype])
    assert got.perplexity == pytest.approx(math.exp(mean), rel=TOL[dtype] * 3)
    assert got.perplexity == pytest.approx(math.exp(got.loss), rel=1e-12)
    if dtype == "float32":
        assert got.error == wrong / len(losses)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name, names", [("bert_cls", ("text", "label")), ("bert_cls", ("text", "text_pair", "label")),
                                         ("llama_cls", ("text", "label"))])
def test_classifier_loss_and_accuracy_equal_a_hand_loop(kind_ckpts, tmp_path, dtype, name, names):
    model = load_model(kind_ckpts[name], dtype=dtype)
    data = load_data(model, write_rows(tmp_path / "d.csv", columns(ROWS, *names) * 2), seq_len=16, batch_size=4)
    got = measure_loss(model, data)
    losses, right = [], 0
    with torch.no_grad():
        for x, label in _rows(data, "input_ids", "token_type_ids"):
            logits = model(**x).logits[0].float()
            losses.append(_ce64(logits, int(label)))
            right += int(logits.argmax()) == int(label)
    assert got.objective == SEQUENCE_CLASSIFICATION.name and got.rows == got.examples == 10 and got.tokens == 0
    assert got.perplexity is None
    assert got.loss == pytest.approx(sum(losses) / 10, rel=TOL[dtype])
    if dtype == "float32":
        assert got.accuracy == right / 10


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("source", ["rows", "txt"])
def test_masked_lm_loss_equals_the_hand_sum_at_the_masked_positions(kind_ckpts, tmp_path, dtype, source):
    model = load_model(kind_ckpts["bert_mlm"], dtype=dtype)
    if source == "rows":
        path = write_rows(tmp_path / "d.parquet", columns(ROWS, "text", "text_pair"))
    else:
        path = tmp_path / "t.txt"
        path.write_text(" ".join(r["text"] + " " + r["text_pair"] for r in ROWS))
    data = load_data(model, path, seq_len=10, batch_size=3, seed=5)
    got = measure_loss(model, data)
    losses = []
    with torch.no_grad():
        for x, labels in _rows(data, "input_ids", "token_type_ids"):
            logits = model(**x).logits[0].float()
            losses += [_ce64(logits[t], int(y)) for t, y in enumerate(labels[: logits.shape[0]]) if y != -100]
    assert got.objective == MASKED_LM.name and got.rows == got.tokens == len(losses) > 0
    assert got.loss == pytest.approx(sum(losses) / len(losses), rel=TOL[dtype])
    assert got.perplexity == pytest.approx(math.exp(got.loss), rel=1e-12)


def _embed64(model, tok, text: str) -> torch.Tensor:
    enc = tok(text, return_tensors="pt")
    hidden = model(**enc).last_hidden_state[0].double()
    return F.normalize(hidden.mean(0), dim=0)  # one text alone: every token is real


def _contrastive_by_hand(model, tok, pairs: list[dict]) -> float:
    a = torch.stack([_embed64(model, tok, p["text"]) for p in pairs])
    b = torch.stack([_embed64(model, tok, p["text_pair"]) for p in pairs])
    scores = 20.0 * a @ b.T
    return float(-scores.log_softmax(-1).diagonal().mean())


def test_contrastive_loss_of_the_real_minilm_equals_the_hand_computation(minilm_dir, tmp_path):
    from transformers import AutoTokenizer

    model = load_model(minilm_dir)
    tok = AutoTokenizer.from_pretrained(minilm_dir, local_files_only=True)
    data = load_data(model, write_rows(tmp_path / "p.jsonl", PAIRS), seq_len=32, batch_size=8)
    got = measure_loss(model, data)
    with torch.no_grad():
        want = _contrastive_by_hand(model, tok, PAIRS)
    assert got.objective == CONTRASTIVE.name and got.rows == got.examples == 5 and got.unit == "pairs"
    assert got.loss == pytest.approx(want, rel=1e-4, abs=1e-8)  # ~2e-5: float32 logits vs float64 by hand
    assert got.accuracy == 1.0  # each text retrieves its own paraphrase
    shuffled = [{"text": p["text"], "text_pair": PAIRS[(i + 1) % 5]["text_pair"]} for i, p in enumerate(PAIRS)]
    worse = measure_loss(model, load_data(model, write_rows(tmp_path / "s.jsonl", shuffled), seq_len=32))
    with torch.no_grad():
        assert worse.loss == pytest.approx(_contrastive_by_hand(model, tok, shuffled), rel=1e-5)
    assert worse.loss > got.loss + 1.0 and worse.accuracy == 0.0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_contrastive_loss_of_a_tiny_bert_batches_and_pads(kind_ckpts, tmp_path, dtype):
    from transformers import AutoTokenizer

    model = load_model(kind_ckpts["bert"], dtype=dtype)
    tok = AutoTokenizer.from_pretrained(kind_ckpts["bert"], local_files_only=True)
    rows = (columns(ROWS, "text", "text_pair") * 2)[:9]
    data = load_data(model, write_rows(tmp_path / "p.jsonl", rows), seq_len=16, batch_size=4)
    assert [len(b["input_ids"]) for b in data] == [4, 5]  # the lone ninth pair joins the second batch
    got = measure_loss(model, data)
    with torch.no_grad():
        want = (4 * _contrastive_by_hand(model, tok, rows[:4]) + 5 * _contrastive_by_hand(model, tok, rows[4:])) / 9
    assert got.loss == pytest.approx(want, rel=TOL[dtype])


@pytest.mark.parametrize("name, names", [("llama", ("text",)), ("bert_mlm", ("text",)),
                                         ("bert_cls", ("text", "label"))])
def test_loss_is_row_weighted_whatever_the_batch_size(kind_ckpts, tmp_path, name, names):
    model = load_model(kind_ckpts[name], dtype="float64")
    path = write_rows(tmp_path / "d.jsonl", columns(ROWS, *names))
    small, large = (measure_loss(model, load_data(model, path, seq_len=8, batch_size=b)) for b in (2, 5))
    assert small.rows == large.rows and small.loss == pytest.approx(large.loss, rel=1e-12)


def test_measure_runs_in_eval_mode_and_restores_the_mode(kind_ckpts, tmp_path):
    model = load_model(kind_ckpts["bert_cls"])
    data = load_data(model, write_rows(tmp_path / "d.jsonl", columns(ROWS, "text", "label")), seq_len=16)
    want = measure_loss(model, data)
    model.train()
    first, again = measure_loss(model, data), measure_loss(model, data)
    assert first.loss == again.loss == want.loss  # dropout (p=0.1) off while measuring
    assert model.training and all(m.training for m in model.modules())


@pytest.mark.parametrize("name, names, objective", [
    ("llama", ("text",), CAUSAL_LM), ("bert_cls", ("text", "label"), SEQUENCE_CLASSIFICATION),
    ("bert_mlm", ("text",), MASKED_LM), ("bert", ("text", "text_pair"), CONTRASTIVE),
])
def test_each_objective_is_differentiable_and_matches_the_report(kind_ckpts, tmp_path, name, names, objective):
    model = load_model(kind_ckpts[name], dtype="float64")
    assert objective_for(model) is objective
    data = load_data(model, write_rows(tmp_path / "d.jsonl", columns(ROWS, *names)), seq_len=12, batch_size=8)
    loss, rows = objective.batch_loss(model, data[0])
    outputs, targets = objective.predict(model, data[0])
    assert outputs.ndim == 2 and len(targets) == rows == measure_loss(model, data).rows
    assert loss.detach().item() == pytest.approx(measure_loss(model, data).loss, rel=1e-12)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)


def test_describe_names_model_loss_tokens_and_examples(kind_ckpts, tmp_path):
    model = load_model(kind_ckpts["bert_cls"], dtype="bfloat16")
    path = write_rows(tmp_path / "d.jsonl", columns(ROWS, "text", "label"))
    data = load_data(model, path, seq_len=16)
    line = describe(model, objective_for(model), data)
    assert line == (f"model BertForSequenceClassification (bfloat16, cpu); loss sequence classification "
                    f"cross-entropy; data {path} (labelled text): 5 examples, {data.tokens} tokens")
    assert "\n" not in line and data.tokens == sum(int(b["attention_mask"].sum()) for b in data)
    plain = describe(model, objective_for(model), list(data))
    assert plain.endswith("; data 5 examples")


def test_report_json_and_model_kinds():
    report = LossReport(objective="x", loss=1.0, perplexity=None, accuracy=0.25, rows=4, unit="examples", examples=4)
    assert report.to_json() == {"objective": "x", "loss": 1.0, "perplexity": None, "accuracy": 0.25, "error": 0.75,
                                "rows": 4, "unit": "examples", "examples": 4}
    kinds = {n: model_kind(n) for n in ("MistralForCausalLM", "RobertaForSequenceClassification",
                                        "RobertaForMaskedLM", "RobertaModel", "GPT2LMHeadModel")}
    assert kinds == {"MistralForCausalLM": "causal LM", "RobertaForSequenceClassification": "sequence classifier",
                     "RobertaForMaskedLM": "masked LM", "RobertaModel": "encoder", "GPT2LMHeadModel": "causal LM"}
    assert {model_kind(n) for n in ("T5ForConditionalGeneration", "BartForConditionalGeneration")} == {"seq2seq LM"}
    from transformers import T5Config

    for name, config in (("T5Model", T5Config()), ("ViTForImageClassification", None)):
        with pytest.raises(DataError, match=f"{name}: no text objective"):
            model_kind(name, config)


def test_data_of_another_kind_is_a_one_line_error(kind_ckpts, tmp_path):
    llama = load_model(kind_ckpts["llama"])
    bert = load_model(kind_ckpts["bert"])
    data = load_data(llama, write_rows(tmp_path / "d.jsonl", columns(ROWS, "text")), seq_len=8)
    with pytest.raises(DataError, match="the batch has no 'pair_input_ids': the encoder objective needs data"):
        measure_loss(bert, data)


@pytest.mark.parametrize("name, names, unit", [
    ("llama", ("text",), "predicted tokens"), ("bert_mlm", ("text",), "masked tokens"),
    ("bert_cls", ("text", "label"), "examples"), ("bert", ("text", "text_pair"), "pairs"),
])
def test_objective_counts_its_rows_without_the_model(kind_ckpts, tmp_path, name, names, unit):
    """`Objective.rows(batches)` (what `basin hessian` prints) equals the rows the forward pass measures, in the
    objective's unit: an encoder's rows are pairs, not tokens."""
    model = load_model(kind_ckpts[name])
    data = load_data(model, write_rows(tmp_path / "d.jsonl", columns(ROWS, *names)), seq_len=12, batch_size=2, seed=1)
    objective = objective_for(model)
    got = measure_loss(model, data)
    assert objective.unit == got.unit == unit
    assert objective.rows(data) == got.rows > 0
    if unit in ("examples", "pairs"):
        assert got.rows == got.examples == len(ROWS)


def test_cli_barrier_on_an_encoder_counts_pairs(kind_ckpts, tmp_path, capsys):
    """`basin barrier` on an encoder (BertModel, like all-MiniLM-L6-v2) with text pairs printed "0 predicted
    tokens": it names pairs."""
    import json

    from evaluations.cli import main

    data = write_rows(tmp_path / "pairs.jsonl", PAIRS)
    encoder = kind_ckpts["bert"]
    rc = main(["barrier", str(encoder), str(encoder), "--data", str(data), "--seq-len", "16", "--alphas", "2",
               "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "model BertModel (float32, cpu); 5 examples of 16 tokens, 5 pairs; loss: in-batch contrastive" in out
    assert "predicted tokens" not in out
    path = json.loads((tmp_path / "out" / "barrier.json").read_text())["path"]
    assert (path["tokens"], path["unit"], path["examples"]) == (5, "pairs", 5)
