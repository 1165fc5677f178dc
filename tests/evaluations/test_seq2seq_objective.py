"""The seq2seq objective (`evaluations.model_losses.SEQ2SEQ_LM`) on tiny T5 and BART checkpoints.

References: transformers' own `model(input_ids, attention_mask=..., labels=...)` loss per batch (float64 models),
token-weighted by hand; the tokenizer's own ids per row; a path midpoint against a model loaded by hand with the
interpolated float64 state dict; the CLI (`basin barrier`, `basin hessian`) and its one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evaluations.cli import main
from evaluations.landscape import evaluate_path, linear_path
from evaluations.measure import measure_loss
from evaluations.model_losses import IGNORE, SEQ2SEQ, SEQ2SEQ_LM, model_kind, objective_for
from evaluations.models import load_model
from evaluations.text_data import load_data
from taxonomy.errors import DataError

transformers = pytest.importorskip("transformers")

WORDS = {  # T5: pad 0 = decoder start, eos 1; BART: bos 0, pad 1, eos 2 = decoder start
    "t5": ["<pad>", "</s>", "<unk>", "apple", "banana", "cherry", "date", "elder", "fig", "grape"],
    "bart": ["<s>", "<pad>", "</s>", "<unk>", "apple", "banana", "cherry", "date", "elder", "fig", "grape"],
}
ROWS = [
    {"text": "apple banana cherry", "target": "cherry banana"},
    {"text": "date elder", "target": "elder date fig grape"},
    {"text": "fig grape apple fig date elder cherry banana", "target": "grape"},
    {"text": "cherry", "target": "cherry apple apple banana date elder fig grape"},
    {"text": "banana banana grape elder", "target": "fig fig"},
]
SEQ_LEN = 6
OBJECTIVE = "seq2seq LM target-token cross-entropy (teacher forcing)"


def word_tokenizer(words: list[str]):
    """A whitespace word-level tokenizer that ends every sequence with </s> (as T5's and BART's do)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", words.index("</s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


def tiny(name: str, seed: int):
    torch.manual_seed(seed)
    n = len(WORDS[name])
    if name == "t5":
        cfg = transformers.T5Config(vocab_size=n, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                                    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, dropout_rate=0.0)
        return transformers.T5ForConditionalGeneration(cfg).eval()
    cfg = transformers.BartConfig(vocab_size=n, d_model=16, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                  decoder_ffn_dim=32, max_position_embeddings=32, bos_token_id=0, pad_token_id=1,
                                  eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)
    return transformers.BartForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """t5, t5_b (another seed), bart: checkpoint folders with their tokenizers; pairs.jsonl."""
    root = tmp_path_factory.mktemp("seq2seq")
    out = {}
    for key, name, seed in (("t5", "t5", 0), ("t5_b", "t5", 1), ("bart", "bart", 0)):
        tiny(name, seed).save_pretrained(root / key, safe_serialization=True)
        word_tokenizer(WORDS[name]).save_pretrained(root / key)
        out[key] = root / key
    out["pairs"] = write_jsonl(root / "pairs.jsonl", ROWS)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def by_hand(model, data) -> tuple[float, float, int]:
    """(token-weighted mean of the model's own `labels=` losses, next-token accuracy, target tokens), float64."""
    total, right, tokens = 0.0, 0, 0
    with torch.no_grad():
        for b in data:
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
            keep = b["labels"] != IGNORE
            n = int(keep.sum())
            total += float(out.loss.to(torch.float64)) * n
            right += int((out.logits.argmax(-1)[keep] == b["labels"][keep]).sum())
            tokens += n
    return total / tokens, right / tokens, tokens


def test_t5_and_bart_are_seq2seq_and_bare_ones_are_refused(ckpts):
    for name in ("T5ForConditionalGeneration", "BartForConditionalGeneration", "MarianMTModel"):
        assert model_kind(name) == SEQ2SEQ
    assert objective_for(load_model(ckpts["t5"])) is SEQ2SEQ_LM
    with pytest.raises(DataError, match="T5Model: no text objective"):
        model_kind("T5Model", transformers.T5Config())
    cfg = transformers.Qwen2AudioConfig()  # a decoder LM with an audio encoder, not an encoder-decoder
    with pytest.raises(DataError, match="no text objective"):
        model_kind("Qwen2AudioForConditionalGeneration", cfg)


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_loss_is_the_models_own_labels_loss_token_weighted(ckpts, name):
    model = load_model(ckpts[name], dtype="float64")
    data = load_data(model, ckpts["pairs"], seq_len=SEQ_LEN, batch_size=2)
    tok = word_tokenizer(WORDS[name])
    assert data.kind == "text-target pairs" and len(data) == 3 and data.examples == 5
    inputs = [tok(r["text"], truncation=True, max_length=SEQ_LEN)["input_ids"] for r in ROWS]
    targets = [tok(text_target=r["target"], truncation=True, max_length=SEQ_LEN)["input_ids"] for r in ROWS]
    assert max(map(len, inputs)) == max(map(len, targets)) == SEQ_LEN  # rows 2 and 3 are truncated
    for i, b in enumerate(data):
        for j, (ids, tgt) in enumerate(zip(inputs[2 * i: 2 * i + 2], targets[2 * i: 2 * i + 2])):
            assert b["input_ids"][j, :len(ids)].tolist() == ids and int(b["attention_mask"][j].sum()) == len(ids)
            assert b["labels"][j].tolist() == tgt + [IGNORE] * (b["labels"].shape[1] - len(tgt))
    assert data.tokens == sum(map(len, inputs)) + sum(map(len, targets))
    report = measure_loss(model, data)
    want, accuracy, tokens = by_hand(model, data)
    assert report.objective == OBJECTIVE and report.unit == "target tokens" and report.examples == 5
    assert report.rows == tokens == sum(map(len, targets)) == SEQ2SEQ_LM.rows(data)
    assert report.loss == pytest.approx(want, rel=1e-10)
    assert report.perplexity == pytest.approx(math.exp(report.loss), rel=1e-12)
    assert report.accuracy == accuracy and report.error == pytest.approx(1 - accuracy)
    loss, n = SEQ2SEQ_LM.batch_loss(model, data[0])  # the differentiable batch loss is the model's own too
    own = model(input_ids=data[0]["input_ids"], attention_mask=data[0]["attention_mask"], labels=data[0]["labels"])
    assert loss.requires_grad and n == int((data[0]["labels"] != IGNORE).sum())
    assert float(loss.detach()) == pytest.approx(float(own.loss.detach()), rel=1e-12)


def test_path_midpoint_between_t5_checkpoints_is_the_interpolated_model(ckpts):
    a, b = ckpts["t5"], ckpts["t5_b"]
    model = load_model(a, dtype="float64")
    data = load_data(model, ckpts["pairs"], seq_len=SEQ_LEN, batch_size=2)
    result = evaluate_path(model, linear_path(a, b), data, alphas=[0.0, 0.5])
    sa, sb = (load_file(p / "model.safetensors") for p in (a, b))
    assert "shared.weight" in sa and "encoder.embed_tokens.weight" not in sa  # tied: stored once
    ref = transformers.T5ForConditionalGeneration.from_pretrained(a, dtype=torch.float64).eval()
    with torch.no_grad():
        state = ref.state_dict()
        for k in sa:
            state[k].copy_(0.5 * sa[k].to(torch.float64) + 0.5 * sb[k].to(torch.float64))
    assert torch.equal(ref.encoder.embed_tokens.weight, ref.shared.weight)
    want, accuracy, _ = by_hand(ref, data)
    assert result.loss[1] == pytest.approx(want, rel=1e-10) and result.accuracy[1] == accuracy
    assert result.loss[0] == pytest.approx(by_hand(load_model(a, dtype="float64"), data)[0], rel=1e-10)
    assert abs(result.loss[1] - result.loss[0]) > 1e-6  # the midpoint is another model


def _basin(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_barrier_and_hessian_on_t5(ckpts, tmp_path, capsys):
    a, b, pairs = str(ckpts["t5"]), str(ckpts["t5_b"]), str(ckpts["pairs"])
    rc, out, err = _basin(capsys, "barrier", a, b, "--data", pairs, "--seq-len", str(SEQ_LEN), "--alphas", "3",
                          "--dtype", "float64", "--out", str(tmp_path / "out"))
    assert rc == 0, err
    model = load_model(a, dtype="float64")
    want = measure_loss(model, load_data(model, pairs, seq_len=SEQ_LEN))
    assert (f"model T5ForConditionalGeneration (float64, cpu); 5 examples of {SEQ_LEN} tokens, {want.rows} target "
            f"tokens; loss: {OBJECTIVE}") in out
    payload = json.loads((tmp_path / "out" / "barrier.json").read_text())
    assert payload["path"]["loss"][0] == pytest.approx(want.loss, rel=1e-10)
    rc, out, err = _basin(capsys, "hessian", a, "--data", pairs, "-k", "1", "--seq-len", str(SEQ_LEN),
                          "--params", r"decoder\.final_layer_norm", "--dtype", "float64")
    assert rc == 0, err
    assert f"model T5ForConditionalGeneration (float64, cpu); objective: {OBJECTIVE}; 5 examples" in out
    rc, out, err = _basin(capsys, "ntk", a, "--data", pairs, "--rows", "4", "--seq-len", str(SEQ_LEN))
    assert rc == 0, err
    assert f"model T5ForConditionalGeneration (float32, cpu); objective: {OBJECTIVE}; 5 examples" in out


def test_merge_measure_on_t5(ckpts, tmp_path, capsys):
    """`basin merge --measure`: the inputs' and the merge's losses are the seq2seq objective's, each as measured on
    its own."""
    base, other = ckpts["t5"], ckpts["t5_b"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 0.5}}\n"
                      f"  - model: {other}\n    parameters: {{weight: 0.5}}\n")
    out = tmp_path / "merged"
    rc, _, err = _basin(capsys, "merge", str(recipe), str(out), "--measure", str(ckpts["pairs"]), "--measure-seq-len",
                        str(SEQ_LEN), "--measure-points", "3", "--no-progress")
    assert rc == 0, err
    report = json.loads((out / "measure.json").read_text())
    assert report["objective"] == OBJECTIVE
    for ref, key in ((base, str(base)), (out, "merge")):
        model = load_model(ref)
        want = measure_loss(model, load_data(model, ckpts["pairs"], seq_len=SEQ_LEN))
        got = report["losses"][key]
        assert got["unit"] == "target tokens" and got["tokens"] == want.rows
        assert got["loss"] == pytest.approx(want.loss, rel=1e-6) and got["perplexity"] == pytest.approx(
            math.exp(got["loss"]), rel=1e-12)


BAD = [
    ("calib.txt", None, "a seq2seq LM is measured on rows with `text` (encoder input) and `target` (decoder output)"),
    ("notarget.jsonl", [{"text": r["text"]} for r in ROWS], "a seq2seq LM needs a 'target' column"),
    ("label.jsonl", [{**r, "label": 1} for r in ROWS], "column 'label' is only for a sequence classifier, not a "
     "seq2seq LM"),
    ("pair.jsonl", [{**r, "text_pair": "fig"} for r in ROWS], "column 'text_pair' is not used by a seq2seq LM"),
    ("blank.jsonl", [{"text": "fig", "target": " "}], "row 0: column 'target' is empty"),
]


@pytest.mark.parametrize("file, rows, fragment", BAD)
def test_bad_seq2seq_data_is_a_one_line_error(ckpts, tmp_path, capsys, file, rows, fragment):
    path = tmp_path / file
    if rows is None:
        path.write_text("apple banana cherry\n")
    else:
        write_jsonl(path, rows)
    with pytest.raises(DataError) as err:
        load_data(ckpts["t5"], path, seq_len=SEQ_LEN)
    assert fragment in str(err.value) and file in str(err.value) and "\n" not in str(err.value)
    for argv in (["barrier", str(ckpts["t5"]), str(ckpts["t5_b"])], ["hessian", str(ckpts["t5"]), "-k", "1"]):
        rc, _, err_text = _basin(capsys, *argv, "--data", str(path), "--seq-len", str(SEQ_LEN))
        assert rc == 2 and fragment in err_text and len(err_text.strip().splitlines()) == 1, err_text


def test_a_config_without_a_decoder_start_token_is_a_one_line_error(ckpts, tmp_path):
    import shutil

    folder = tmp_path / "nostart"
    shutil.copytree(ckpts["t5"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["decoder_start_token_id"]
    (folder / "config.json").write_text(json.dumps(cfg))
    model = load_model(folder)
    data = load_data(model, ckpts["pairs"], seq_len=SEQ_LEN)
    with pytest.raises(DataError, match="T5ForConditionalGeneration: cannot make decoder inputs from the targets: "
                                        "config.json needs decoder_start_token_id"):
        measure_loss(model, data)
