"""Issue 20, the merge report: `basin merge --measure`, measure.json, the card's section, data-free statistics.

References: each model loaded separately (`load_model` + `measure_loss`); the streamed path between two
checkpoints evaluated on its own; task-vector norms, cosines and sign conflicts computed in float64 over the
inputs' whole state dicts; the dense Hessian of the token-weighted mean loss (torch.func.hessian) for the top
eigenvalue; the exact kept count int(density n) of TIES."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evaluations.cli import main
from evaluations.measure import measure_loss
from evaluations.models import load_model
from evaluations.text_data import load_data
from tests.evaluations.test_measure_lm import TEXT, WORDS, _bert, _gpt2, _llama
from tests.merging.test_vocab_llama import word_tokenizer

SEQ = 8
BUILD = {"llama": _llama, "gpt2": _gpt2, "bert": _bert}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread (OpenMP barriers on a shared machine cost 100x on 16-wide matmuls)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _save(model, folder: Path, tokenizer: bool = True) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer:
        word_tokenizer(WORDS).save_pretrained(folder)
    return folder


def _perturbed(build, seed: int, scale: float = 0.05):
    model = build(0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict:
    """Per architecture: a base and three fine-tune-like inputs (base + noise), with a tokenizer; calib.txt."""
    root = tmp_path_factory.mktemp("merge_measure")
    out: dict = {"root": root}
    for arch in ("llama", "gpt2"):
        out[arch] = [_save(BUILD[arch](0), root / f"{arch}-base")]
        out[arch] += [_save(_perturbed(BUILD[arch], s), root / f"{arch}-ft{s}") for s in (1, 2, 3)]
    (root / "calib.txt").write_text(TEXT * 3)  # 45 tokens: 5 blocks of 8 and one of 5
    out["calib"] = root / "calib.txt"
    return out


def _recipe(path: Path, base: Path, models: list[Path], method: str = "ties", extra: str = "",
            params: list[str] | None = None) -> Path:
    params = params or ["{weight: 1.0, density: 0.5}", "{weight: 1.0, density: 0.7}", "{weight: 0.5, density: 0.3}"]
    lines = [f"merge_method: {method}", f"base_model: {base}", "models:"]
    for m, p in zip(models, params):
        lines += [f"  - model: {m}", f"    parameters: {p}"]
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def _basin(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _loss(ref, calib, dtype="float32") -> float:
    model = load_model(ref, dtype=dtype)
    return measure_loss(model, load_data(model, calib, seq_len=SEQ)).loss


def _task_vectors(base: Path, models: list[Path]) -> dict[str, list[torch.Tensor]]:
    sb = load_file(base / "model.safetensors")
    states = [load_file(m / "model.safetensors") for m in models]
    return {k: [s[k].double() - sb[k].double() for s in states] for k in sb if sb[k].is_floating_point()}


@pytest.fixture(scope="module")
def measured(fam, tmp_path_factory):
    """`basin merge --measure` of a 4-model TIES merge per architecture (CLI main()), run twice for llama."""
    root = tmp_path_factory.mktemp("measured")
    runs = {}
    for arch in ("llama", "gpt2"):
        base, *models = fam[arch]
        recipe = _recipe(root / f"{arch}.yaml", base, models)
        for k in range(2 if arch == "llama" else 1):
            out = root / f"{arch}-out{k}"
            rc = main(["merge", str(recipe), str(out), "--measure", str(fam["calib"]), "--measure-seq-len", str(SEQ),
                       "--measure-points", "3", "--no-progress"])
            assert rc == 0
            runs[arch, k] = out
    return runs


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_measure_losses_equal_separate_evaluation(fam, measured, arch):
    out = measured[arch, 0]
    report = json.loads((out / "measure.json").read_text())
    assert report["models"] == [str(p) for p in fam[arch]] + ["merge"]
    assert report["losses"]["merge"]["loss"] == _loss(out, fam["calib"])
    for ref in fam[arch]:
        assert report["losses"][str(ref)]["loss"] == _loss(ref, fam["calib"])
    merged = report["losses"]["merge"]
    assert merged["perplexity"] == pytest.approx(math.exp(merged["loss"]), rel=1e-12)
    assert merged["tokens"] == 5 * 7 + 4 and merged["examples"] == 6


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_measure_paths_and_barriers(fam, measured, arch):
    from evaluations.landscape import barrier
    from evaluations.lm_path import evaluate_checkpoint_path

    report = json.loads((measured[arch, 0] / "measure.json").read_text())
    losses = report["losses"]
    assert [p["from"] for p in report["paths"]] == [str(p) for p in fam[arch]]
    for p in report["paths"]:
        assert p["alphas"] == [0.0, 0.5, 1.0]
        assert p["loss"][0] == losses[p["from"]]["loss"] and p["loss"][-1] == losses["merge"]["loss"]
    assert len(report["barriers"]) == 6
    a, b = fam[arch][1], fam[arch][3]
    row = next(r for r in report["barriers"] if r["a"] == str(a) and r["b"] == str(b))
    model = load_model(a)
    path = evaluate_checkpoint_path(model, a, b, load_data(model, fam["calib"], seq_len=SEQ), alphas=3)
    assert row["path"]["loss"] == path.loss.tolist()
    assert row["loss_barrier"]["value"] == barrier(path, "loss", "linear").value
    chord = path.loss[1] - 0.5 * (path.loss[0] + path.loss[2])
    assert row["loss_barrier"]["value"] == pytest.approx(max(chord, 0.0), abs=1e-12)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_stats_equal_direct_state_dict_computation(fam, measured, arch):
    stats = json.loads((measured[arch, 0] / "measure.json").read_text())["merge_stats"]
    base, *models = fam[arch]
    tvs = _task_vectors(base, models)
    assert stats["inputs"] == [str(m) for m in models] and stats["relative_to"] == str(base)
    rows = {r["name"]: r for r in stats["tensors"]}
    assert set(rows) == set(tvs)
    for name, vs in tvs.items():
        flat = [v.reshape(-1) for v in vs]
        assert rows[name]["norms"] == pytest.approx([float(v.norm()) for v in flat], rel=1e-12)
        cos = float(flat[0] @ flat[2] / (flat[0].norm() * flat[2].norm()))
        assert rows[name]["cosines"][0][2] == pytest.approx(cos, rel=1e-9, abs=1e-12)
        conflicts = (torch.stack(flat) > 0).any(0) & (torch.stack(flat) < 0).any(0)
        assert rows[name]["sign_conflict_rate"] == float(conflicts.sum()) / flat[0].numel()
        n = flat[0].numel()
        assert rows[name]["dropped"] == [(n - int(d * n)) / n for d in (0.5, 0.7, 0.3)]  # TIES: exact kept count
    whole = [torch.cat([vs[i].reshape(-1) for vs in tvs.values()]) for i in range(3)]
    model = stats["model"]
    assert model["norms"] == pytest.approx([float(w.norm()) for w in whole], rel=1e-12)
    for i in range(3):
        for j in range(3):
            want = float(whole[i] @ whole[j] / (whole[i].norm() * whole[j].norm()))
            assert model["cosines"][i][j] == pytest.approx(want, rel=1e-9, abs=1e-12)
    every = torch.stack(whole)
    assert model["sign_conflict_rate"] == float(((every > 0).any(0) & (every < 0).any(0)).sum()) / every.shape[1]
    assert stats["dropped"]["exact"] is True


def test_measure_json_is_byte_identical_and_card_has_the_section(measured):
    first, again = measured["llama", 0], measured["llama", 1]
    assert (first / "measure.json").read_bytes() == (again / "measure.json").read_bytes()
    card = (first / "README.md").read_text()
    assert card.count("## Measurements") == 1 and card.index("## Reproducibility") < card.index("## Measurements")
    merge_row = next(line for line in card.splitlines() if line.startswith("| **merge** |"))
    loss = json.loads((first / "measure.json").read_text())["losses"]["merge"]["loss"]
    assert f"{loss:.4f}" in merge_row
    assert "| A | B | loss barrier | at alpha |" in card and "sign-conflict rate" in card
    assert (first / "measure_paths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "measure_paths.png" in card
    assert (first / "README.md").read_text() == (again / "README.md").read_text()


def _dense_top_eigenvalue(ref: Path, calib: Path, prefix: str) -> float:
    """The largest eigenvalue of the Hessian of the token-weighted mean next-token loss over the whole data, on
    the parameters under `prefix`, from torch.func.hessian (float64)."""
    from torch.func import functional_call, hessian

    model = load_model(ref, dtype="float64")
    data = load_data(model, calib, seq_len=SEQ, batch_size=4)
    names = [n for n, _ in model.named_parameters() if n.startswith(prefix)]
    state = dict(model.named_parameters())
    sizes = [state[n].numel() for n in names]

    def loss(flat):
        parts = dict(zip(names, (p.reshape(state[n].shape) for n, p in zip(names, flat.split(sizes)))))
        total, rows = 0, 0
        for batch in data:
            logits = functional_call(model, {**state, **parts}, (),
                                     {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
                                     ).logits[:, :-1]
            target = batch["labels"][:, 1:]
            keep = target != -100
            total = total + torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum")
            rows += int(keep.sum())
        return total / rows

    flat = torch.cat([state[n].detach().reshape(-1) for n in names])
    return float(torch.linalg.eigvalsh(hessian(loss)(flat).detach()).max())


def test_recipe_measure_block_hessian_against_dense(fam, tmp_path, capsys):
    base, *models = fam["llama"]
    block = (f"measure:\n  data: {fam['calib']}\n  probes: [loss, hessian]\n  params: model\\.norm\n"
             f"  seq_len: {SEQ}\n  batch_size: 4\n")
    recipe = _recipe(tmp_path / "r.yaml", base, models[:2], method="task_arithmetic", extra=block,
                     params=["{weight: 0.5}", "{weight: 0.5}"])
    rc, out, err = _basin(capsys, "merge", recipe, tmp_path / "out", "--no-progress")
    assert rc == 0, err
    report = json.loads((tmp_path / "out" / "measure.json").read_text())
    assert report["spec"]["probes"] == ["loss", "hessian"] and report["paths"] == [] and report["barriers"] == []
    assert [h["model"] for h in report["hessian"]] == [str(base), *map(str, models[:2]), "merge"]
    for h, ref in zip(report["hessian"], [base, *models[:2], tmp_path / "out"], strict=True):
        assert h["converged"] and h["params"] == 16
        assert h["top_eigenvalue"] == pytest.approx(_dense_top_eigenvalue(ref, fam["calib"], "model.norm"),
                                                    rel=1e-4)
    assert "top Hessian eigenvalue" in out
    assert "Top Hessian eigenvalue of the loss (16 parameters, Lanczos)" in (tmp_path / "out" / "README.md").read_text()
    assert not (tmp_path / "out" / "measure_paths.png").exists()  # no paths asked: no plot


def test_cli_flags_override_the_recipe_block(fam, tmp_path, capsys):
    base, *models = fam["gpt2"]
    block = f"measure:\n  data: {tmp_path / 'missing.txt'}\n  points: 7\n  probes: [paths]\n  seq_len: 4\n"
    recipe = _recipe(tmp_path / "r.yaml", base, models[:1], method="task_arithmetic", extra=block,
                     params=["{weight: 1.0}"])
    rc, _, err = _basin(capsys, "merge", recipe, tmp_path / "out", "--measure", fam["calib"], "--measure-points", "2",
                        "--measure-seq-len", SEQ, "--no-progress")
    assert rc == 0, err
    report = json.loads((tmp_path / "out" / "measure.json").read_text())
    assert report["spec"]["points"] == 2 and report["spec"]["seq_len"] == SEQ and report["spec"]["data"] == "calib.txt"
    assert [len(p["loss"]) for p in report["paths"]] == [2, 2]
    assert report["paths"][0]["loss"][0] == _loss(base, fam["calib"])


def test_lora_input_is_measured_through_the_merge_reference_parser(fam, tmp_path, capsys):
    from tests.merging.test_lora import lora_pair, write_adapter

    base = fam["llama"][0]
    name = "model.layers.0.self_attn.q_proj"
    a, b = lora_pair(16, 16, 2, 7)
    adapter = write_adapter(tmp_path / "ad", {f"base_model.model.{name}.lora_A.weight": a,
                                              f"base_model.model.{name}.lora_B.weight": b}, target_modules=["q_proj"])
    lora = f"{base}+{adapter}"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {lora}\n    parameters: {{weight: 0.5}}\n"
                      f"  - model: {fam['llama'][1]}\n    parameters: {{weight: 0.5}}\n")
    rc, _, err = _basin(capsys, "merge", recipe, tmp_path / "out", "--measure", fam["calib"], "--measure-seq-len",
                        SEQ, "--measure-points", "2", "--no-progress")
    assert rc == 0, err
    report = json.loads((tmp_path / "out" / "measure.json").read_text())
    assert report["losses"][lora]["loss"] == _loss(lora, fam["calib"])
    assert report["merge_stats"]["relative_to"] is None  # no base: statistics of the weights themselves
    sa = load_model(lora).state_dict()
    sb = load_file(fam["llama"][1] / "model.safetensors")
    row = next(r for r in report["merge_stats"]["tensors"] if r["name"] == f"{name}.weight")
    assert row["norms"] == pytest.approx([float(sa[f"{name}.weight"].double().norm()),
                                          float(sb[f"{name}.weight"].double().norm())], rel=1e-12)


def test_hub_id_input(fam, tmp_path, capsys, monkeypatch):
    """A Hub id from the local cache (offline), resolved by the merge's reference parser."""
    import huggingface_hub.constants as constants

    from tests.conftest import lay_out_hub_cache

    cache = tmp_path / "hub"
    lay_out_hub_cache(cache, "org/tiny-llama", fam["llama"][1], "a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache), raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True, raising=False)
    recipe = _recipe(tmp_path / "r.yaml", fam["llama"][0], ["org/tiny-llama"], method="task_arithmetic",
                     params=["{weight: 0.5}"])
    rc, _, err = _basin(capsys, "merge", recipe, tmp_path / "out", "--measure", fam["calib"], "--measure-seq-len",
                        SEQ, "--measure-points", "2", "--no-progress")
    assert rc == 0, err
    report = json.loads((tmp_path / "out" / "measure.json").read_text())
    assert report["models"] == [str(fam["llama"][0]), "org/tiny-llama", "merge"]
    assert report["losses"]["org/tiny-llama"]["loss"] == _loss(fam["llama"][1], fam["calib"])


def _every_point_report(refs: list, out: Path, calib: Path, points: int, payload: dict) -> bytes:
    """measure.json as the report made it before it reused end points, on the config source's model (`refs[0]`:
    the base, else the first input): every loss by `copy_weights` + `measure_loss`, every point of every path and
    barrier by `evaluate_checkpoint_path`, in torch ops (the compiled point kernel off); the merge statistics,
    objective and data hash taken from `payload`."""
    from evaluations.landscape import barrier
    from evaluations.lm_path import evaluate_checkpoint_path
    from evaluations.merge_report import MeasureReport, MeasureSpec, _row, _series
    from evaluations.models import check_names, copy_weights
    from merging.io.checkpoint import open_checkpoint
    from merging.methods import kernels

    saved, kernels.compiled = kernels.compiled, None
    try:
        labels = {str(r): r for r in refs}
        labels["merge"] = out
        model = load_model(refs[0])
        data = load_data(model, calib, seq_len=SEQ)
        losses = {}
        for label, ref in labels.items():
            ckpt = open_checkpoint(ref)
            copy_weights(model, ckpt, check_names(model, ckpt, label))
            losses[label] = _row(measure_loss(model, data))
        paths = [{"from": str(r), "to": "merge", **_series(evaluate_checkpoint_path(model, r, out, data, points))}
                 for r in refs]
        barriers = []
        for i, a in enumerate(refs):
            for b in refs[i + 1:]:
                path = evaluate_checkpoint_path(model, a, b, data, points)
                barriers.append({"a": str(a), "b": str(b), "loss_barrier": barrier(path, "loss", "linear").to_json(),
                                 "error_barrier": barrier(path, "error", "linear").to_json(), "path": _series(path)})
    finally:
        kernels.compiled = saved
    report = MeasureReport(spec=MeasureSpec(data=str(calib), points=points, seq_len=SEQ),
                           objective=payload["objective"], data_sha256=payload["data_sha256"], models=list(labels),
                           losses=losses, paths=paths, barriers=barriers, stats=payload["merge_stats"],
                           plot=payload["plot"])
    return (json.dumps(report.to_json(), indent=2) + "\n").encode()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_measure_json_equals_every_point_evaluated_on_its_own(fam, measured, arch):
    """Reusing each model's loss for the path end points (and the compiled point kernel) changes no byte."""
    got = (measured[arch, 0] / "measure.json").read_bytes()
    assert got == _every_point_report(fam[arch], measured[arch, 0], fam["calib"], 3, json.loads(got))


def test_each_distinct_model_is_measured_once(fam, tmp_path, monkeypatch):
    """4 inputs and a merge at 4 points per path: 5 losses + 2 interior points x (4 paths + 6 barriers) = 25
    forward passes (45 when every point of every path is evaluated on its own)."""
    from evaluations import lm_path, measure
    from merging.methods import kernels

    calls = {"loss": 0, "point": 0, "kernel": 0}

    def counted(kind, fn):
        def wrapper(*args, **kwargs):
            calls[kind] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(measure, "measure_loss", counted("loss", measure.measure_loss))
    monkeypatch.setattr(lm_path, "measure", counted("point", lm_path.measure))

    class Kernels:  # the compiled module, its point kernel counted
        def __init__(self, module):
            self.module, self.point_chunk = module, counted("kernel", module.point_chunk)

        def __getattr__(self, name):
            return getattr(self.module, name)

    if kernels.compiled is not None:
        monkeypatch.setattr(kernels, "compiled", Kernels(kernels.compiled))
    base, *models = fam["gpt2"]
    recipe = _recipe(tmp_path / "r.yaml", base, models)
    out = tmp_path / "out"
    assert main(["merge", str(recipe), str(out), "--measure", str(fam["calib"]), "--measure-seq-len", str(SEQ),
                 "--measure-points", "4", "--no-progress"]) == 0
    assert calls["loss"] == 5 and calls["point"] == 2 * (4 + 6)
    assert kernels.compiled is None or calls["kernel"] > 0
    monkeypatch.undo()
    got = (out / "measure.json").read_bytes()
    assert got == _every_point_report(fam["gpt2"], out, fam["calib"], 4, json.loads(got))


def test_end_point_whose_tied_tensors_differ_is_evaluated_as_a_point(fam, tmp_path):
    """GPT-2 ties lm_head to wte: a file holding both, different, loads (copy_weights) with its lm_head but is
    written as a point with its wte; the report then evaluates that end point instead of reusing the loss."""
    from evaluations.lm_path import CheckpointSource
    from evaluations.merge_report import _ties_agree

    base, ft = fam["gpt2"][:2]
    odd = tmp_path / "odd"
    shutil.copytree(ft, odd)
    state = load_file(odd / "model.safetensors")
    state["lm_head.weight"] = state["transformer.wte.weight"] + 0.5
    from safetensors.torch import save_file

    save_file(state, odd / "model.safetensors", metadata={"format": "pt"})
    model = load_model(odd)
    assert not _ties_agree(model, CheckpointSource(model, odd, "odd"))
    assert _ties_agree(model, CheckpointSource(model, ft, "ft"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {odd}\n    parameters: {{weight: 0.5}}\n"
                      f"  - model: {base}\n    parameters: {{weight: 0.5}}\n")
    out = tmp_path / "out"
    assert main(["merge", str(recipe), str(out), "--measure", str(fam["calib"]), "--measure-seq-len", str(SEQ),
                 "--measure-points", "3", "--no-progress"]) == 0
    got = (out / "measure.json").read_bytes()
    report = json.loads(got)
    assert report["paths"][0]["loss"][0] != report["losses"][str(odd)]["loss"]  # the guard matters here
    assert got == _every_point_report([odd, base], out, fam["calib"], 3, report)


def test_without_measure_the_hook_is_never_called(fam, tmp_path, capsys, monkeypatch):
    from merging import engine
    from merging.merge_stats import MergeStats

    def boom(*_args, **_kwargs):
        raise AssertionError("MergeStats.observe called without --measure")

    monkeypatch.setattr(MergeStats, "observe", boom)
    base, *models = fam["llama"]
    recipe = _recipe(tmp_path / "r.yaml", base, models)
    rc, _, err = _basin(capsys, "merge", recipe, tmp_path / "out", "--no-progress")
    assert rc == 0, err
    assert engine._OBSERVER.get() is None
    assert not (tmp_path / "out" / "measure.json").exists()
    assert "## Measurements" not in (tmp_path / "out" / "README.md").read_text()


def test_observer_sees_every_tensor_once_and_is_reset(fam, tmp_path):
    from merging.engine import _OBSERVER, observing
    from merging.merge_stats import MergeStats
    from merging.pipeline import merge

    base, *models = fam["gpt2"]
    stats = MergeStats(base_ref=str(base))
    with observing(stats.observe):
        report = merge(_recipe(tmp_path / "r.yaml", base, models, method="dare_ties"), tmp_path / "out",
                       progress=False)
    assert _OBSERVER.get() is None and stats.calls == report.tensors
    got = stats.to_json()
    assert got["dropped"]["exact"] is False  # DARE: random masks, the expected fraction 1 - density
    assert got["model"]["dropped"] == pytest.approx([0.5, 0.3, 0.7], abs=1e-12)


def test_base_among_the_tensors_is_the_reference(fam, tmp_path):
    """linear with the base listed under models: the base enters as one of `tensors`; task vectors from it."""
    from merging.engine import observing
    from merging.merge_stats import MergeStats
    from merging.pipeline import merge

    base, ft1, ft2, _ = fam["llama"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: linear\nbase_model: {base}\nmodels:\n" + "".join(
        f"  - model: {m}\n    parameters: {{weight: 1.0}}\n" for m in (base, ft1, ft2)))
    stats = MergeStats(base_ref=str(base))
    with observing(stats.observe):
        merge(recipe, tmp_path / "out", progress=False)
    got = stats.to_json()
    assert got["inputs"] == [str(ft1), str(ft2)] and got["relative_to"] == str(base) and got["dropped"] is None
    whole = [torch.cat([v.reshape(-1) for v in vs]) for vs in zip(*_task_vectors(base, [ft1, ft2]).values())]
    assert got["model"]["norms"] == pytest.approx([float(w.norm()) for w in whole], rel=1e-12)


def test_card_without_matplotlib_says_so(fam, measured, tmp_path, monkeypatch):
    from evaluations import plotting
    from evaluations.merge_report import MeasureReport, MeasureSpec, write_report

    out = tmp_path / "out"
    shutil.copytree(measured["llama", 0], out)
    (out / "measure_paths.png").unlink()
    payload = json.loads((out / "measure.json").read_text())
    report = MeasureReport(spec=MeasureSpec(data=str(fam["calib"]), seq_len=SEQ, points=3), objective="x",
                           data_sha256="0" * 64, models=payload["models"], losses=payload["losses"],
                           paths=payload["paths"], barriers=payload["barriers"], stats=payload["merge_stats"])
    monkeypatch.setattr(plotting, "optional_pyplot", lambda: None)
    written, files = write_report(report, out)
    card = (out / "README.md").read_text()
    assert written.plot is None and not (out / "measure_paths.png").exists()
    assert "No plot of the paths: matplotlib is not installed" in card and card.count("## Measurements") == 1
    assert json.loads((out / "measure.json").read_text())["plot"] is None
    assert [f.name for f in files] == ["measure.json", "README.md"]


def test_plot_drawn_on_its_thread_is_the_main_threads(measured):
    """measure_paths.png, drawn on a thread while the barriers run, equals the figure drawn afresh here from
    measure.json's paths."""
    from evaluations.merge_report import render_paths

    out = measured["llama", 0]
    paths = json.loads((out / "measure.json").read_text())["paths"]
    assert (out / "measure_paths.png").read_bytes() == render_paths(paths)


def test_plot_thread_error_is_raised_by_write_report(fam, measured, tmp_path, monkeypatch):
    from evaluations import merge_report
    from evaluations.merge_report import MeasureReport, MeasureSpec, write_report

    def broken(paths):
        raise RuntimeError("plot broke")

    monkeypatch.setattr(merge_report, "render_paths", broken)
    payload = json.loads((measured["llama", 0] / "measure.json").read_text())
    report = MeasureReport(spec=MeasureSpec(data=str(fam["calib"]), seq_len=SEQ, points=3), objective="x",
                           data_sha256="0" * 64, models=payload["models"], paths=payload["paths"])
    report.figure = merge_report._Figure(report.paths)
    with pytest.raises(RuntimeError, match="plot broke"):
        write_report(report, tmp_path / "out")
    assert not (tmp_path / "out" / "measure.json").exists()


# --- bad input: one line, exit 2, nothing merged ---------------------------------------------------------------
@pytest.fixture(scope="module")
def bare(fam, tmp_path_factory) -> list[Path]:
    """Two llama inputs as weights only (no config.json)."""
    root = tmp_path_factory.mktemp("bare")
    out = []
    for src in fam["llama"][:2]:
        (root / src.name).mkdir()
        shutil.copyfile(src / "model.safetensors", root / src.name / "model.safetensors")
        out.append(root / src.name)
    return out


def _bad(kind: str, fam, bare, tmp_path) -> tuple[Path, list[str]]:
    base, *models = fam["llama"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    data = ["--measure", str(fam["calib"]), "--measure-seq-len", str(SEQ)]
    if kind == "missing":
        return _recipe(tmp_path / "r.yaml", base, models), ["--measure", str(tmp_path / "nope.txt")]
    if kind == "empty":
        return _recipe(tmp_path / "r.yaml", base, models), ["--measure", str(empty), "--measure-seq-len", "4"]
    if kind == "no_config":
        return _recipe(tmp_path / "r.yaml", bare[0], bare[1:], method="task_arithmetic",
                       params=["{weight: 1.0}"]), data
    if kind in ("probe", "field"):
        block = "measure:\n  probes: [loss, hessain]\n" if kind == "probe" else "measure:\n  point: 3\n"
        return _recipe(tmp_path / "r.yaml", base, models, extra=block), data
    if kind == "no_data":
        return _recipe(tmp_path / "r.yaml", base, models), ["--measure-points", "5"]
    if kind == "sweep":
        return _recipe(tmp_path / "r.yaml", base, models[:1], method="task_arithmetic",
                       params=["{weight: {grid: [0.5, 1.0]}}"]), data
    if kind == "bert":
        b0, b1 = (_save(BUILD["bert"](s), tmp_path / f"bert{s}") for s in (0, 1))
        return _recipe(tmp_path / "r.yaml", b0, [b1], method="task_arithmetic", params=["{weight: 1.0}"]), data
    slices = (f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {base}\n        layer_range: [0, 1]\n"
              f"  - sources:\n      - model: {models[0]}\n        layer_range: [1, 2]\n")
    (tmp_path / "r.yaml").write_text(slices)
    return tmp_path / "r.yaml", data


@pytest.mark.parametrize("kind, fragment", [
    ("missing", "nope.txt: no such text file"),
    ("empty", "empty.txt: no tokens"),
    ("no_config", "llama-base: no config.json beside the weights; --measure builds the model from it"),
    ("probe", "unknown probe 'hessain'; did you mean 'hessian'?"),
    ("field", "measure: unknown field 'point'; did you mean 'points'?"),
    ("no_data", "--measure-points: nothing to measure without --measure DATA"),
    ("bert", "an encoder is measured on rows with `text` and `text_pair` columns"),
    ("slices", "--measure: a slices: merge"),
    ("sweep", "--measure: a sweep ({grid: ...} settings) writes several outputs"),
])
def test_bad_input_fails_before_the_merge(fam, bare, tmp_path, capsys, kind, fragment):
    recipe, extra = _bad(kind, fam, bare, tmp_path)
    rc, _, err = _basin(capsys, "merge", recipe, tmp_path / "out", "--no-progress", *extra)
    assert rc == 2
    assert fragment in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()  # nothing merged, nothing written
