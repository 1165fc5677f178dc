"""Issue 20, part 2: points as weights over N memory-mapped checkpoints, streamed into one live model.

References: transformers models loaded by hand (`load_state_dict`) with the hand-weighted float64 state dict and
run by hand; the in-memory evaluator (`evaluate_path` on state dicts) for (x, y) data; a dense float64
Gram-Schmidt for the plane; row norms for filter normalisation; peak memory measured in a subprocess."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from evaluations.checkpoint_landscape import checkpoint_plane, checkpoint_slices
from evaluations.cli import main
from evaluations.landscape import barrier, chain_path, evaluate_path, linear_path
from evaluations.landscape.checkpoint_paths import CheckpointPath, checkpoint_path
from evaluations.lm_path import (
    SeededDirection,
    evaluate_checkpoint_path,
    evaluate_checkpoint_points,
    open_sources,
)
from evaluations.measure import measure_loss
from evaluations.models import load_model
from evaluations.objective import Objective
from evaluations.text_data import load_data
from taxonomy.errors import BasinError, CheckpointError
from tests.evaluations.test_measure_lm import BUILDERS, TEXT, WORDS, ckpts  # noqa: F401 - ckpts is a fixture
from tests.merging.test_vocab_llama import word_tokenizer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def llamas(tmp_path_factory) -> list[Path]:
    """Four tiny Llama checkpoints (seeds 0-3), each with the word tokenizer, and calib.txt beside them."""
    root = tmp_path_factory.mktemp("llamas")
    out = []
    for seed in range(4):
        folder = root / f"llama-{seed}"
        BUILDERS["llama"](seed).save_pretrained(folder, safe_serialization=True)
        word_tokenizer(WORDS).save_pretrained(folder)
        out.append(folder)
    (root / "calib.txt").write_text(TEXT)
    return out


def _state(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in load_file(folder / "model.safetensors").items()}


def _hand_loss(name: str, state: dict[str, torch.Tensor], data) -> float:
    """The causal-LM loss of a fresh model of `name` loaded by hand with `state` (float64)."""
    ref = BUILDERS[name](9).double()
    ref.load_state_dict(state, strict=False)  # a tied head comes with the embedding
    ref.tie_weights()
    return measure_loss(ref, data).loss


def _weighted(states: list[dict], w) -> dict[str, torch.Tensor]:
    return {k: sum(wi * s[k] for wi, s in zip(w, states)) for k in states[0]}


@pytest.mark.parametrize("kind, t, expect", [
    ("bezier", 0.3, (0.49, 0.42, 0.09)), ("polychain", 0.75, (0.0, 0.5, 0.5)), ("chain", 0.5, (0.0, 1.0, 0.0)),
])
def test_three_checkpoint_point_equals_hand_weighted_state(llamas, kind, t, expect):
    a, c, b = llamas[:3]
    model = load_model(a, dtype="float64")
    data = load_data(model, a.parent / "calib.txt", seq_len=5, batch_size=2)
    path = checkpoint_path([a, c, b], kind)
    assert path.weights(t) == pytest.approx(expect, abs=1e-15)
    result = evaluate_path(model, path, data, alphas=[0.0, t, 1.0])
    states = [_state(f) for f in (a, c, b)]
    for i, alpha in enumerate([0.0, t, 1.0]):
        want = _hand_loss("llama", _weighted(states, path.weights(alpha)), data)
        assert result.loss[i] == pytest.approx(want, rel=1e-12)
    assert result.tokens == 12 and result.examples == 3
    assert result.objective == "causal LM next-token cross-entropy"


def test_four_checkpoint_chain_and_tied_head(ckpts, llamas):  # noqa: F811
    model = load_model(llamas[0], dtype="float64")
    data = load_data(model, llamas[0].parent / "calib.txt", seq_len=6)
    result = evaluate_path(model, chain_path(llamas), data, alphas=[0.5, 0.9])
    states = [_state(f) for f in llamas]
    assert result.loss[0] == pytest.approx(_hand_loss("llama", _weighted(states, (0, 0.5, 0.5, 0)), data), rel=1e-12)
    assert result.loss[1] == pytest.approx(_hand_loss("llama", _weighted(states, (0, 0, 0.3, 0.7)), data), rel=1e-10)
    a, b = ckpts["llama_tied"]
    tied = load_model(a, dtype="float64")
    got = evaluate_checkpoint_path(tied, a, b, data, alphas=[0.4])
    assert got.loss[0] == pytest.approx(_hand_loss("llama_tied", _weighted([_state(a), _state(b)], (0.6, 0.4)),
                                                   data), rel=1e-12)
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()


def test_three_line_python_example(ckpts):  # noqa: F811
    """README's example: load, data, barrier of the streamed line; equal to the explicit streamed call."""
    a, b = ckpts["llama"]
    m = load_model(a); d = load_data(m, ckpts["calib"], seq_len=6); bar = barrier(evaluate_path(m, linear_path(a, b), d))  # noqa: E702, E501
    ref = evaluate_checkpoint_path(load_model(a), a, b, d, alphas=25)
    assert bar.value == barrier(ref).value and bar.endpoints == (ref.loss[0], ref.loss[-1])
    assert bar.endpoints[0] == pytest.approx(measure_loss(load_model(a), d).loss, rel=1e-12)


def test_chunked_writes_are_bit_identical(llamas, monkeypatch):
    """Row chunks (here 7 elements) change nothing: every element is the same float64 sum."""
    import evaluations.lm_path as lm

    model = load_model(llamas[0])
    data = load_data(model, llamas[0].parent / "calib.txt", seq_len=6)
    whole = evaluate_checkpoint_path(model, llamas[0], llamas[1], data, alphas=3)
    monkeypatch.setattr(lm, "CHUNK_ELEMENTS", 7)
    chunked = evaluate_checkpoint_path(model, llamas[0], llamas[1], data, alphas=3)
    assert whole.loss.tobytes() == chunked.loss.tobytes()


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def test_factory_model_xy_data_matches_in_memory_evaluator(tmp_path):
    """Any nn.Module with (x, y) data on a streamed path: the in-memory evaluator's numbers (supervised CE)."""
    refs = []
    for seed in (0, 1):
        save_file(_mlp(seed).state_dict(), tmp_path / f"m{seed}.safetensors")
        refs.append(tmp_path / f"m{seed}.safetensors")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 4, generator=g), torch.randint(0, 3, (20,), generator=g)
    streamed = evaluate_path(_mlp(5), linear_path(*refs), (x, y), alphas=5)
    memory = evaluate_path(_mlp(5), linear_path(_mlp(0).state_dict(), _mlp(1).state_dict()), (x, y), alphas=5,
                           batched=False)
    np.testing.assert_allclose(streamed.loss, memory.loss, rtol=1e-6)
    np.testing.assert_allclose(streamed.accuracy, memory.accuracy)
    assert streamed.objective == "supervised cross_entropy" and streamed.examples == 20


def _masked_lm(model, batch):
    """A non-causal objective (every token predicted at its own position), as another model kind would bring."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    keep = batch["attention_mask"].bool()
    return logits[keep], batch["input_ids"][keep]


MASKED = Objective(name="masked LM token cross-entropy", loss="cross_entropy", predict=_masked_lm, unit="masked tokens")


@pytest.fixture(scope="module")
def berts(tmp_path_factory, minilm_dir) -> list[Path]:
    from transformers import BertConfig, BertForMaskedLM

    root = tmp_path_factory.mktemp("berts")
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        folder = root / f"bert-{seed}"
        BertForMaskedLM(BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=32)).save_pretrained(folder)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
            shutil.copyfile(minilm_dir / name, folder / name)  # a BERT tokenizer with a mask token
        out.append(folder)
    (root / "calib.txt").write_text(TEXT)
    return out


def test_any_objective_on_bert(berts):
    a, b = berts
    model = load_model(a, dtype="float64")
    data = load_data(model, a.parent / "calib.txt", seq_len=6)
    got = evaluate_checkpoint_path(model, a, b, data, alphas=[0.25], objective=MASKED)
    from transformers import BertForMaskedLM

    ref = BertForMaskedLM(model.config).double().eval()
    sa, sb = _state(a), _state(b)
    ref.load_state_dict({k: 0.75 * sa[k] + 0.25 * sb[k] for k in sa}, strict=False)
    ref.tie_weights()
    with torch.no_grad():
        out, target = _masked_lm(ref, data[0])
        want = float(torch.nn.functional.cross_entropy(out, target))
    rows = int(data[0]["attention_mask"].sum())
    assert len(data) == 1 and got.loss[0] == pytest.approx(want, rel=1e-12) and got.tokens == rows
    assert got.objective == MASKED.name


def test_plane_through_three_checkpoints_matches_dense_gram_schmidt(llamas):
    o, a, b = llamas[:3]
    model = load_model(o, dtype="float64")
    data = load_data(model, o.parent / "calib.txt", seq_len=6)
    land = checkpoint_plane(model, o, a, b, data, grid=2, margin=0.0)
    so, sa, sb = (_state(f) for f in (o, a, b))
    keys = [k for k in so if k != "lm_head.weight" or True]
    vo, va, vb = (torch.cat([s[k].reshape(-1) for k in keys]) for s in (so, sa, sb))
    u = (va - vo) / (va - vo).norm()
    w = vb - vo
    v = w - (w @ u) * u
    v = v / v.norm()
    np.testing.assert_allclose(land.plane.points, [[0, 0], [float((va - vo).norm()), 0],
                                                   [float(w @ u), float(w @ (v))]], rtol=1e-10)
    np.testing.assert_allclose(land.plane.weights(land.plane.points[:, 0], land.plane.points[:, 1]), np.eye(3),
                               atol=1e-10)
    x, y = land.slice_2d.alphas[1], land.slice_2d.betas[0]  # a grid corner
    point = vo + x * u + y * v
    state, start = {}, 0
    for k in keys:
        state[k] = point[start : start + so[k].numel()].reshape(so[k].shape)
        start += so[k].numel()
    assert land.slice_2d.loss[0, 1] == pytest.approx(_hand_loss("llama", state, data), rel=1e-9)


def test_seeded_directions_filter_normalised_and_slice_point_exact(llamas):
    c = llamas[0]
    model = load_model(c, dtype="float64")
    data = load_data(model, c.parent / "calib.txt", seq_len=6)
    (src,) = open_sources(model, [c])
    params = {n for n, _ in model.named_parameters()}
    d1, d2 = (SeededDirection(src, params, 7, j) for j in (1, 2))
    center = _state(c)
    dirs = [{k: d.rows(k, 0, len(v)) for k, v in center.items()} for d in (d1, d2)]
    w = "model.layers.0.mlp.up_proj.weight"
    np.testing.assert_allclose(dirs[0][w].norm(dim=1), center[w].norm(dim=1), rtol=1e-12)
    assert not dirs[0]["model.norm.weight"].any() and not torch.equal(dirs[0][w], dirs[1][w])
    assert torch.equal(dirs[0][w], SeededDirection(src, params, 7, 1).rows(w, 0, len(center[w])))
    land = checkpoint_slices(model, c, data, grid=3, span=0.5, seed=7)
    assert land.slice_1d.loss[1] == pytest.approx(measure_loss(load_model(c, dtype="float64"), data).loss,
                                                  rel=1e-12)
    hand = {k: center[k] + 0.5 * dirs[0][k] - 0.5 * dirs[1][k] for k in center}
    assert land.slice_2d.loss[0, 2] == pytest.approx(_hand_loss("llama", hand, data), rel=1e-10)  # a=+0.5, b=-0.5


def test_points_refuse_bad_inputs(ckpts, llamas, tmp_path):  # noqa: F811
    model = load_model(llamas[0])
    data = load_data(model, ckpts["calib"], seq_len=5)
    with pytest.raises(BasinError, match="bezier path needs exactly 3 checkpoints"):
        checkpoint_path(llamas[:2], "bezier")
    with pytest.raises(CheckpointError, match=r"weights: expected a finite \[points, 2\]"):
        evaluate_checkpoint_points(model, llamas[:2], np.array([[0.5, np.inf]]), data)
    with pytest.raises(CheckpointError, match="are collinear"):
        checkpoint_plane(model, llamas[0], llamas[1], llamas[1], data, grid=2)
    wide = tmp_path / "wide"
    state = load_file(llamas[1] / "model.safetensors")
    state["model.norm.weight"] = torch.ones(17)
    wide.mkdir()
    save_file(state, wide / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' has shape \(17,\), LlamaForCausalLM expects"):
        evaluate_path(model, CheckpointPath([llamas[0], wide, llamas[2]], "bezier"), data, alphas=2)


MEMORY_CHILD = r"""
import json, sys
import torch, transformers
from transformers import LlamaForCausalLM
from evaluations.lm_path import evaluate_checkpoint_points
from evaluations.models import load_model
from evaluations.peak_memory import PeakMemory
refs = sys.argv[1:]
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, 500, (2, 16), generator=g)
data = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]
with PeakMemory() as load:
    model = load_model(refs[0])
size = sum(p.numel() * p.element_size() for p in model.parameters())
with PeakMemory() as path:
    w = torch.softmax(torch.randn(4, len(refs), generator=g), 1).double().numpy()
    evaluate_checkpoint_points(model, refs, w, data)
print(json.dumps({"size": size, "load": load.anon_growth, "path": path.anon_growth, "path_start": path.anon_start,
                  "load_start": load.anon_start}))
"""


def test_peak_anonymous_memory_bounded_whatever_the_endpoints(tmp_path):
    """load_model ~1x the model; a 4-point path over 5 endpoints adds only chunks and activations on top."""
    from transformers import LlamaConfig, LlamaForCausalLM

    refs = []
    for seed in range(5):
        torch.manual_seed(seed)
        m = LlamaForCausalLM(LlamaConfig(vocab_size=500, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
        m.save_pretrained(tmp_path / f"m{seed}")
        refs.append(str(tmp_path / f"m{seed}"))
    proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, *refs], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    mib = 2**20
    assert got["size"] > 8 * mib  # ~9.4 MB of float32 weights: the allowances below are small against it
    assert got["load"] < 1.05 * got["size"] + 2 * mib, got
    assert got["load"] + got["path"] < 1.3 * got["size"] + 4 * mib, got  # path growth measured after the load


def _basin(capsys, *args: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_landscape_slices_and_plane_on_llama(llamas, tmp_path, capsys):
    calib = llamas[0].parent / "calib.txt"
    rc, out, err = _basin(capsys, "landscape", llamas[0], "--data", calib, "--seq-len", 6, "--grid", 3,
                          "--range", 0.5, "--seed", 7, "--dtype", "float64", "--out", tmp_path / "s")
    assert rc == 0, err
    assert ("model LlamaForCausalLM (float64, cpu); 3 examples of 6 tokens, 12 predicted tokens; loss: causal LM "
            "next-token cross-entropy") in out
    payload = json.loads((tmp_path / "s" / "landscape.json").read_text())
    model = load_model(llamas[0], dtype="float64")
    want = checkpoint_slices(model, llamas[0], load_data(model, calib, seq_len=6), grid=3, span=0.5, seed=7)
    assert payload["slice_2d"]["loss"] == want.slice_2d.loss.tolist() and payload["tokens"] == 12
    rc, out, err = _basin(capsys, "landscape", llamas[0], "--data", calib, "--seq-len", 6, "--grid", 2,
                          "--through", llamas[1], llamas[2], "--dtype", "bfloat16", "--out", tmp_path / "p")
    assert rc == 0, err
    assert "model LlamaForCausalLM (bfloat16, cpu)" in out and "plane: loss min" in out
    payload = json.loads((tmp_path / "p" / "landscape.json").read_text())
    assert np.array(payload["slice_2d"]["loss"]).shape == (2, 2) and payload["plane_points"]["origin"] == [0, 0]
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["contour.png", "landscape.json", "surface.png"]
    rc, _, err = _basin(capsys, "landscape", llamas[0], "--data", calib, "--grid", 2, "--out", tmp_path / "p")
    assert rc == 2 and "already exists" in err and len(err.strip().splitlines()) == 1


def test_cli_barrier_on_bert_with_its_objective_and_via(berts, llamas, tmp_path, capsys, monkeypatch):
    import evaluations.model_losses as ml

    monkeypatch.setattr(ml, "objective_for", lambda model: MASKED)
    a, b = berts
    rc, out, err = _basin(capsys, "barrier", a, b, "--data", a.parent / "calib.txt", "--seq-len", 6, "--alphas", 3,
                          "--out", tmp_path / "bert")
    assert rc == 0, err
    assert re.search(r"model BertForMaskedLM \(float32, cpu\); \d+ examples of 6 tokens, \d+ masked tokens; "
                     r"loss: masked LM", out)
    payload = json.loads((tmp_path / "bert" / "barrier.json").read_text())
    assert payload["path"]["objective"] == MASKED.name and len(payload["path"]["loss"]) == 3
    monkeypatch.undo()
    rc, out, err = _basin(capsys, "barrier", llamas[0], llamas[1], "--via", llamas[2], "--curve", "polychain",
                          "--data", llamas[0].parent / "calib.txt", "--seq-len", 6, "--alphas", 3,
                          "--dtype", "float64", "--out", tmp_path / "via")
    assert rc == 0, err
    payload = json.loads((tmp_path / "via" / "barrier.json").read_text())
    model = load_model(llamas[2], dtype="float64")
    mid = measure_loss(model, load_data(model, llamas[0].parent / "calib.txt", seq_len=6)).loss
    assert payload["curve"] == "polychain" and payload["path"]["loss"][1] == pytest.approx(mid, rel=1e-12)


def _no_config(src: Path, dst: Path) -> Path:
    dst.mkdir()
    (dst / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    return dst


@pytest.mark.parametrize("command", ["barrier", "landscape"])
def test_cli_checkpoint_errors_one_line_exit_2(llamas, ckpts, tmp_path, capsys, command):  # noqa: F811
    calib = llamas[0].parent / "calib.txt"
    bare = _no_config(llamas[0], tmp_path / "bare")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    for f in llamas[0].iterdir():
        (unknown / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**cfg, "architectures": ["NoSuchForCausalLM"]}))
    gpt = ckpts["gpt2"][1]
    cases = [([bare], "no config.json beside the weights; pass --model-factory"),
             ([unknown], "'NoSuchForCausalLM' is not a transformers model class")]
    if command == "barrier":
        cases = [([c[0][0], llamas[1]], c[1]) for c in cases]
        cases += [([llamas[0], gpt], "is missing from the checkpoint"),
                  ([llamas[0], llamas[1], "--via", gpt], "is missing from the checkpoint"),
                  # --via with a factory is streamed too now: the factory itself is what is wrong here
                  ([llamas[0], llamas[1], "--via", llamas[2], "--model-factory", "x:y"],
                   "--model-factory x:y: cannot import module 'x'")]
    else:
        cases += [([llamas[0], "--through", llamas[1], gpt], "is missing from the checkpoint"),
                  ([llamas[0], "--through", llamas[1], llamas[2], "--model-factory", "x:y"],
                   "--through needs checkpoints")]
    for args, fragment in cases:
        rc, _, err = _basin(capsys, command, *args, "--data", calib, "--seq-len", 6, "--grid" if command ==
                            "landscape" else "--alphas", 2)
        assert rc == 2 and fragment in err and len(err.strip().splitlines()) == 1, (args, err)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_load_model_bfloat16_matches_from_pretrained(ckpts, name):  # noqa: F811
    """Built directly in bfloat16: float32-by-design buffers (Llama's RoPE inv_freq) stay float32, so the logits
    are bit-identical to transformers' own from_pretrained(dtype=bfloat16) (a .to(bfloat16) pass rounded them)."""
    from transformers import AutoModel

    folder = ckpts[name][0]
    model = load_model(folder, dtype="bfloat16")
    ref = AutoModel.from_pretrained(folder, dtype=torch.bfloat16).eval() if name == "bert" else None
    if ref is None:
        from transformers import AutoModelForCausalLM

        ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    assert {k: v.dtype for k, v in model.named_buffers()} == {k: v.dtype for k, v in ref.named_buffers()}
    x = torch.tensor([[1, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(model(x)[0], ref(x)[0])


def test_cli_default_seq_len_fits_a_short_model(llamas, tmp_path, capsys):
    """`basin barrier` / `basin hessian` without --seq-len on a model of fewer than 128 positions use its length and
    say so."""
    from transformers import AutoConfig

    positions = AutoConfig.from_pretrained(llamas[0]).max_position_embeddings
    assert positions < 128
    calib = llamas[0].parent / "calib.txt"
    rc, out, err = _basin(capsys, "barrier", llamas[0], llamas[1], "--data", calib, "--alphas", 3,
                          "--out", tmp_path / "b")
    assert rc == 0, err
    assert f"examples of {positions} tokens" in out
    rc, out, err = _basin(capsys, "hessian", llamas[0], "--data", calib, "-k", 1, "--tol", "1e-2")
    assert rc == 0, err
    assert f"examples of {positions} tokens" in out
