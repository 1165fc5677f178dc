"""Issue 20, first slice: transformers models from checkpoints, calibration text, the streamed causal-LM path.

References: logits bit-identical to the model that was saved; the loss of transformers' own `labels=` path; a
model loaded by hand with the interpolated state dict (float64); exp of a hand-summed mean token loss."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from evaluations.cli import main
from evaluations.landscape import barrier
from evaluations.lm_path import evaluate_checkpoint_path
from evaluations.measure import measure_loss
from evaluations.models import load_model
from evaluations.text_data import load_data
from taxonomy.errors import CheckpointError, DataError
from tests.merging.test_vocab_llama import word_tokenizer

WORDS = ["<unk>", "<s>", "</s>", "apple", "banana", "cherry", "date", "elder", "fig", "grape"]
TEXT = "apple banana cherry date elder fig grape apple fig date\nbanana cherry grape elder apple\n"


def _llama(seed: int, tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                        max_position_embeddings=32, tie_word_embeddings=tied)).eval()


def _gpt2(seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(WORDS), n_embd=16, n_layer=2, n_head=2, n_positions=24,
                                      bos_token_id=1, eos_token_id=2)).eval()


def _bert(seed: int):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=32)).eval()


BUILDERS = {"llama": _llama, "llama_tied": lambda s: _llama(s, tied=True), "gpt2": _gpt2, "bert": _bert}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Two checkpoints (seeds 0, 1) per architecture, each with the word-level tokenizer; and calib.txt."""
    root = tmp_path_factory.mktemp("measure")
    out = {}
    for name, build in BUILDERS.items():
        pair = []
        for seed in (0, 1):
            folder = root / f"{name}-{seed}"
            build(seed).save_pretrained(folder, safe_serialization=True)
            word_tokenizer(WORDS).save_pretrained(folder)
            pair.append(folder)
        out[name] = tuple(pair)
    (root / "calib.txt").write_text(TEXT)
    out["calib"] = root / "calib.txt"
    return out


@pytest.mark.parametrize("name", list(BUILDERS))
def test_load_model_logits_bit_identical(ckpts, name):
    model = load_model(ckpts[name][0])
    ref = BUILDERS[name](0)
    assert type(model) is type(ref)
    x = torch.tensor([[1, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(model(x)[0], ref(x)[0])


def test_load_model_tied_weights_share_storage(ckpts):
    model = load_model(ckpts["gpt2"][0])
    assert "lm_head.weight" not in load_file(ckpts["gpt2"][0] / "model.safetensors")
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_load_model_file_ref_and_dtype(ckpts):
    model = load_model(ckpts["llama"][0] / "model.safetensors", dtype="float64")
    assert model.model.embed_tokens.weight.dtype == torch.float64
    ref = load_file(ckpts["llama"][0] / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(model.model.embed_tokens.weight, ref.double())


def test_load_model_sharded_folder(tmp_path):
    ref = _llama(3)
    ref.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    model = load_model(tmp_path / "sharded")
    x = torch.tensor([[1, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_load_model_errors(ckpts, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copyfile(ckpts["llama"][0] / "model.safetensors", bare / "model.safetensors")
    with pytest.raises(CheckpointError, match="no config.json.*--model-factory"):
        load_model(bare)
    remote = _copy(ckpts["llama"][0], tmp_path / "remote")
    cfg = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**cfg, "model_type": "mystery", "architectures": ["MysteryLM"],
                                                   "auto_map": {"AutoConfig": "x.MysteryConfig"}}))
    with pytest.raises(CheckpointError, match="remote code"):
        load_model(remote)
    custom = _copy(ckpts["llama"][0], tmp_path / "custom")
    (custom / "config.json").write_text(json.dumps({**cfg, "architectures": ["MysteryForCausalLM"]}))
    with pytest.raises(CheckpointError, match="'MysteryForCausalLM' is not a transformers model class"):
        load_model(custom)
    state = load_file(ckpts["llama"][0] / "model.safetensors")
    missing = _copy(ckpts["llama"][0], tmp_path / "missing")
    save_file({k: v for k, v in state.items() if k != "lm_head.weight"}, missing / "model.safetensors")
    with pytest.raises(CheckpointError, match="'lm_head.weight' of LlamaForCausalLM is missing"):
        load_model(missing)
    extra = _copy(ckpts["llama"][0], tmp_path / "extra")
    save_file({**state, "extra.weight": torch.zeros(2)}, extra / "model.safetensors")
    with pytest.raises(CheckpointError, match="'extra.weight' is not in LlamaForCausalLM"):
        load_model(extra)


def test_load_model_hub_id_from_local_cache(hub_cache, minilm_dir):
    """A real checkpoint whose file still holds the now non-persistent `embeddings.position_ids` buffer."""
    model = load_model("sentence-transformers/all-MiniLM-L6-v2")
    assert type(model).__name__ == "BertModel"
    saved = load_file(minilm_dir / "model.safetensors")
    assert "embeddings.position_ids" in saved
    state = model.state_dict()
    assert all(torch.equal(state[k], saved[k]) for k in state)


def test_load_model_base_plus_lora(ckpts, tmp_path):
    from tests.merging.test_lora import lora_pair, write_adapter

    base = ckpts["llama"][0]
    name = "model.layers.0.self_attn.q_proj.weight"
    a, b = lora_pair(16, 16, 2, 7)
    adapter = write_adapter(tmp_path / "ad", {f"base_model.model.{name[:-7]}.lora_A.weight": a,
                                              f"base_model.model.{name[:-7]}.lora_B.weight": b},
                            target_modules=["q_proj"])
    model = load_model(f"{base}+{adapter}", dtype="float64")
    want = load_file(base / "model.safetensors")[name].double() + 4 * (b @ a).double()
    torch.testing.assert_close(model.get_parameter(name), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"dtype": "float8"}, "dtype='float8'"), ({"device": "nodevice"}, "not a torch device"),
    ({"device": "cuda:99"}, "cuda:99"),
])
def test_load_model_bad_dtype_device(ckpts, kwargs, fragment):
    with pytest.raises(CheckpointError, match=fragment):
        load_model(ckpts["llama"][0], **kwargs)


def test_load_text_data_packs_blocks(ckpts):
    batches = load_data(ckpts["llama"][0], ckpts["calib"], seq_len=6, batch_size=2)
    ids = [WORDS.index(w) for w in TEXT.split()]  # 15 tokens -> blocks of 6, 6, 3 (+3 padding)
    assert [b["input_ids"].shape for b in batches] == [(2, 6), (1, 6)]
    flat = torch.cat([b["input_ids"] for b in batches])
    mask = torch.cat([b["attention_mask"] for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    assert flat[mask.bool()].tolist() == ids
    assert mask.sum(1).tolist() == [6, 6, 3]
    assert labels[2].tolist() == ids[12:] + [-100] * 3
    picked = load_data(ckpts["llama"][0], ckpts["calib"], seq_len=6, max_examples=2, seed=3)
    again = load_data(ckpts["llama"][0], ckpts["calib"], seq_len=6, max_examples=2, seed=3)
    assert len(picked) == 1 and picked[0]["input_ids"].shape == (2, 6)
    assert torch.equal(picked[0]["input_ids"], again[0]["input_ids"])


def test_load_text_data_errors(ckpts, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="empty.txt: no tokens"):
        load_data(ckpts["llama"][0], empty, seq_len=8)
    with pytest.raises(DataError, match="seq_len=64 exceeds the model's 32 positions"):
        load_data(ckpts["llama"][0], ckpts["calib"], seq_len=64)
    notok = _copy(ckpts["llama"][0], tmp_path / "notok")
    for f in notok.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    with pytest.raises(DataError, match="no usable tokenizer"):
        load_data(notok, ckpts["calib"], seq_len=8)
    with pytest.raises(DataError, match="no such text file"):
        load_data(ckpts["llama"][0], tmp_path / "nope.txt", seq_len=8)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_causal_lm_loss_matches_transformers_and_hand_sum(ckpts, name):
    model = load_model(ckpts[name][0], dtype="float64")
    data = load_data(model, ckpts["calib"], seq_len=6, batch_size=8)  # one batch, one padded row
    got = measure_loss(model, data)
    batch = data[0]
    with torch.no_grad():
        hf = model(**batch).loss.item()  # transformers' own shifted, -100-masked mean
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    token_losses, wrong = [], 0
    for row in range(len(batch["input_ids"])):
        for t in range(5):
            y = int(batch["labels"][row, t + 1])
            if y != -100:
                token_losses.append(float(-torch.log_softmax(logits[row, t], -1)[y]))
                wrong += int(logits[row, t].argmax()) != y
    mean = sum(token_losses) / len(token_losses)
    assert got.tokens == len(token_losses) == 5 + 5 + 2 and got.examples == 3
    assert got.loss == pytest.approx(hf, rel=1e-6)  # transformers upcasts logits to float32 only
    assert got.loss == pytest.approx(mean, rel=1e-12)
    assert got.perplexity == pytest.approx(math.exp(mean), rel=1e-12)
    assert got.error == wrong / len(token_losses)


@pytest.mark.parametrize("name", ["llama", "llama_tied", "gpt2"])
def test_path_point_equals_model_with_interpolated_state(ckpts, name):
    a, b = ckpts[name]
    model = load_model(a, dtype="float64")
    data = load_data(model, ckpts["calib"], seq_len=5, batch_size=2)
    result = evaluate_checkpoint_path(model, a, b, data, alphas=[0.0, 0.3, 1.0])
    sa, sb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    for i, alpha in enumerate([0.0, 0.3, 1.0]):
        ref = BUILDERS[name](0).double()
        state = {k: (1 - alpha) * sa[k].double() + alpha * sb[k].double() for k in sa}
        ref.load_state_dict(state, strict=False)  # tied heads come with the embedding
        ref.tie_weights()
        want = measure_loss(ref, data)
        assert result.loss[i] == pytest.approx(want.loss, rel=1e-10)
        assert result.perplexity[i] == pytest.approx(want.perplexity, rel=1e-10)
        assert result.accuracy[i] == pytest.approx(1 - want.error)
    bar = barrier(result, "loss", "linear")
    chord = result.loss[1] - (0.7 * result.loss[0] + 0.3 * result.loss[2])
    assert bar.value == pytest.approx(max(chord, 0.0), abs=1e-12)


def test_path_is_deterministic(ckpts):
    a, b = ckpts["gpt2"]
    model = load_model(a)
    data = load_data(model, ckpts["calib"], seq_len=5, max_examples=2, seed=1)
    first = evaluate_checkpoint_path(model, a, b, data, alphas=4)
    again = evaluate_checkpoint_path(load_model(a), a, b, data, alphas=4)
    assert first.loss.tobytes() == again.loss.tobytes() and first.tokens == again.tokens == 8


def test_path_refuses_bad_inputs(ckpts, tmp_path):
    model = load_model(ckpts["llama"][0])
    data = load_data(model, ckpts["calib"], seq_len=5)
    with pytest.raises(CheckpointError, match="is missing from the checkpoint|has shape|is not in"):
        evaluate_checkpoint_path(model, ckpts["llama"][0], ckpts["gpt2"][1], data, alphas=2)
    nan = _copy(ckpts["llama"][1], tmp_path / "nan")
    state = load_file(nan / "model.safetensors")
    state["model.norm.weight"][3] = float("nan")
    save_file(state, nan / "model.safetensors")
    with pytest.raises(CheckpointError, match="nan: tensor 'model.norm.weight' has NaN or infinite values"):
        evaluate_checkpoint_path(model, ckpts["llama"][0], nan, data, alphas=2)
    with pytest.raises(DataError, match="the encoder objective needs data loaded for that model"):
        evaluate_checkpoint_path(load_model(ckpts["bert"][0]), *ckpts["bert"], data, alphas=2)


def _basin(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_barrier_text(ckpts, tmp_path, capsys):
    a, b = ckpts["llama"]
    rc, out, err = _basin(capsys, "barrier", str(a), str(b), "--data", str(ckpts["calib"]), "--seq-len", "6",
                          "--alphas", "3", "--dtype", "float64", "--out", str(tmp_path / "out"))
    assert rc == 0, err
    assert "model LlamaForCausalLM (float64, cpu); 3 examples of 6 tokens, 12 predicted tokens" in out
    payload = json.loads((tmp_path / "out" / "barrier.json").read_text())
    model = load_model(a, dtype="float64")
    want = measure_loss(model, load_data(model, ckpts["calib"], seq_len=6))
    assert payload["path"]["loss"][0] == pytest.approx(want.loss, rel=1e-10)
    assert payload["path"]["tokens"] == 12


@pytest.mark.parametrize("extra, fragment", [
    (["--seq-len", "99"], "seq_len=99 exceeds the model's 32 positions"),
    (["--data", "EMPTY"], "no tokens"),
    (["--data", "nomodule:fn"], "a module:fn needs --model-factory"),
    (["--device", "cuda:99"], "cuda:99"),
    (["--dtype", "float8"], "--dtype"),
])
def test_cli_barrier_text_errors(ckpts, tmp_path, capsys, extra, fragment):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    a, b = ckpts["llama"]
    args = ["barrier", str(a), str(b), "--data", str(ckpts["calib"]), "--seq-len", "8", *extra]
    rc, _, err = _basin(capsys, *[str(empty) if x == "EMPTY" else x for x in args])
    assert rc == 2
    assert fragment in err and len(err.strip().splitlines()) == 1, err


def test_factory_load_into_accepts_tied_and_recomputed_tensors(ckpts, minilm_dir):
    """The --model-factory path (landscape.io.load_into, in place) reads tied heads saved once and old
    checkpoints' non-persistent buffers, as load_model does; empty tensors (all at data_ptr 0) are not taken as
    tied."""
    from torch import nn
    from transformers import BertConfig, BertModel

    from evaluations.landscape.io import load_into

    model = _gpt2(5)
    assert load_into(str(ckpts["gpt2"][0]), model) is model
    saved = load_file(ckpts["gpt2"][0] / "model.safetensors")
    for name, t in saved.items():
        assert torch.equal(model.state_dict()[name], t), name
    assert torch.equal(model.state_dict()["lm_head.weight"], saved["transformer.wte.weight"])
    bert = BertModel(BertConfig.from_pretrained(minilm_dir))
    load_into(str(minilm_dir), bert)  # position_ids: absent from the file, recomputed by the model
    assert torch.equal(bert.embeddings.word_embeddings.weight, load_file(minilm_dir / "model.safetensors")[
        "embeddings.word_embeddings.weight"])
    module = nn.Module()
    module.a, module.b = nn.Parameter(torch.zeros(0)), nn.Parameter(torch.zeros(0))
    with pytest.raises(CheckpointError, match="'b' of Module is missing"):
        load_into({"a": torch.zeros(0)}, module)

