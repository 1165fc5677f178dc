"""Bad command lines of every `basin` subcommand: exit 2 and one line on stderr, never a traceback (issue 18).

Also: pickles never run code (a real `__reduce__` payload, with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1), outputs
are atomic and never clobbered without --overwrite, Ctrl-C exits 130 leaving nothing, and a closed stdout pipe
ends quietly.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from evaluations.cli import main
from evaluations.cli.args import float_range, grid_size, int_list, int_range
from evaluations.digits import make_mlp

FACTORY = """
import torch
from evaluations.digits import make_mlp, load_digits_all

def model():
    return make_mlp([64, 8, 10])

def data():
    x, y = load_digits_all()
    return x[:40], y[:40]

def wide_data():
    x, y = load_digits_all()
    return x[:40, :32], y[:40]

def bad_labels():
    x, y = load_digits_all()
    return x[:40], y[:40] + 10

def ragged():
    x, y = load_digits_all()
    return x[:40], y[:30]

def not_a_model():
    return 5

NUMBER = 3
"""

PAYLOAD = """
import os, sys, torch

class Payload:
    def __reduce__(self):
        return (os.system, ("touch " + {marker!r},))

torch.save({{"0.weight": torch.zeros(2), "x": Payload()}}, sys.argv[1])
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """Files for the table: a factory module, checkpoints, a pickle payload, a non-state-dict pickle, outputs."""
    d = tmp_path_factory.mktemp("cli")
    (d / "fac.py").write_text(FACTORY)
    (d / "broken.py").write_text("def model(:\n")
    for i in (0, 1):
        save_file({k: v.contiguous() for k, v in make_mlp([64, 8, 10], seed=i).state_dict().items()},
                  str(d / f"m{i}.safetensors"))
    save_file({k: v.contiguous() for k, v in make_mlp([64, 4, 10], seed=0).state_dict().items()},
              str(d / "mlp4.safetensors"))
    torch.save(make_mlp([64, 4, 10], seed=0).state_dict(), d / "mlp4.pt")
    torch.save([torch.zeros(3)], d / "list.pt")
    torch.save({"epoch": 3, "weights": torch.zeros(2)}, d / "mixed.pt")
    marker = d / "MARKER"
    (d / "payload.py").write_text(PAYLOAD.format(marker=str(marker)))
    subprocess.run([sys.executable, str(d / "payload.py"), str(d / "evil.pt")], check=True)
    (d / "existing.json").write_text("{}")
    (d / "afile").write_text("x")
    (d / "full").mkdir()
    (d / "full" / "barrier.json").write_text("{}")
    (d / "demo_prev" / "linear").mkdir(parents=True)
    return {"d": str(d), "marker": str(marker)}


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    rc = main(argv)
    return rc, capsys.readouterr().err


BARRIER = "barrier {d}/m0.safetensors {d}/m1.safetensors --model-factory {d}/fac.py:model --data {d}/fac.py:data"
LAND = "landscape {d}/m0.safetensors --model-factory {d}/fac.py:model --data {d}/fac.py:data"
HESS = "hessian --widths 64,4,10 --state {d}/mlp4.safetensors"
NTK = "ntk --widths 64,4,10 --state {d}/mlp4.safetensors"

# command line -> a fragment the one-line error must contain
TABLE = [
    ("nosuchcommand", "unknown command"),
    # barrier
    ("barrier {d}/m0.safetensors {d}/m1.safetensors --data {d}/fac.py:data", "--model-factory"),
    (BARRIER + " --alphas 1", "--alphas"),
    (BARRIER + " --alphas nan", "--alphas"),
    (BARRIER + " --alphas 1e3", "--alphas"),
    (BARRIER + " --alphas 100000000000000", "GiB"),
    (BARRIER + " --batched maybe", "--batched"),
    (BARRIER + " --out {d}/afile", "afile"),
    (BARRIER + " --out {d}/afile/sub", "afile"),
    (BARRIER + " --out {d}/full", "--overwrite"),
    ("barrier {d}/m0.safetensors {d}/m1.safetensors --model-factory {d}/fac.py:model --data {d}/fac.py:wide_data",
     "--data"),
    ("barrier {d}/m0.safetensors {d}/m1.safetensors --model-factory {d}/fac.py:model --data {d}/fac.py:bad_labels",
     "--data"),
    ("barrier {d}/m0.safetensors {d}/m1.safetensors --model-factory {d}/fac.py:model --data {d}/fac.py:ragged",
     "rows"),
    ("barrier {d}/m0.safetensors {d}/m1.safetensors --model-factory {d}/fac.py:model --data {d}/fac.py:NUMBER",
     "--data"),
    ("barrier {d}/m0.safetensors {d}/m1.safetensors --model-factory {d}/fac.py:not_a_model --data {d}/fac.py:data",
     "nn.Module"),
    ("barrier {d}/m0.safetensors {d}/m1.safetensors --model-factory {d}/fac.py:NUMBER --data {d}/fac.py:data",
     "callable"),
    ("barrier {d}/m0.safetensors {d}/m1.safetensors --model-factory {d}/broken.py:model --data {d}/fac.py:data",
     "SyntaxError"),
    ("barrier {d}/m0.safetensors {d}/m1.safetensors --model-factory no_such_module:model --data {d}/fac.py:data",
     "no_such_module"),
    ("barrier {d}/m0.safetensors {d}/m1.safetensors --model-factory {d}/fac.py:nope --data {d}/fac.py:data",
     "nope"),
    ("barrier {d}/m0.safetensors {d}/missing.safetensors --model-factory {d}/fac.py:model --data {d}/fac.py:data",
     "missing.safetensors"),
    ("barrier {d}/m0.safetensors {d}/mlp4.safetensors --model-factory {d}/fac.py:model --data {d}/fac.py:data",
     "shape"),
    ("barrier {d}/m0.safetensors {d}/mlp4.pt --model-factory {d}/fac.py:model --data {d}/fac.py:data",
     "--allow-pickle"),
    # landscape
    (LAND + " --grid 100000", "GiB"),
    (LAND + " --grid 1", "--grid"),
    (LAND + " --grid nan", "--grid"),
    (LAND + " --range nan", "--range"),
    (LAND + " --range inf", "--range"),
    (LAND + " --range -inf", "--range"),
    (LAND + " --range 1e999", "--range"),
    (LAND + " --range 0", "--range"),
    (LAND + " --range -1", "--range"),
    (LAND + " --seed -1", "--seed"),
    (LAND + " --seed 1.5", "--seed"),
    (LAND + " --out {d}/afile", "afile"),
    ("landscape {d}/m0.safetensors --model-factory {d}/fac.py:model --data {d}/fac.py:wide_data", "--data"),
    ("landscape {d}/evil.pt --model-factory {d}/fac.py:model --data {d}/fac.py:data", "--allow-pickle"),
    # hessian
    ("hessian --widths 64,x", "--widths"),
    ("hessian --widths 32,10", "--widths"),
    ("hessian --widths 64,0,10", "--widths"),
    ("hessian --widths 64,-3,10", "--widths"),
    ("hessian --widths 64", "--widths"),
    ("hessian --widths 64,10,5", "--widths"),
    ("hessian --widths 64,1000000000,10", "--widths"),
    ("hessian --widths 64,60000,60000,60000,10", "parameters"),
    ("hessian --widths nan", "--widths"),
    ("hessian -k 0", "-k"),
    ("hessian -k nan", "-k"),
    ("hessian --tol nan", "--tol"),
    ("hessian --tol inf", "--tol"),
    ("hessian --tol 0", "--tol"),
    ("hessian --tol 2", "--tol"),
    ("hessian --epochs -1", "--epochs"),
    ("hessian --seed -1", "--seed"),
    ("hessian --seed 99999999999999999999999", "--seed"),
    ("hessian --json {d}/no/such/folder/h.json", "does not exist"),
    ("hessian --json {d}/existing.json", "--overwrite"),
    ("hessian --density {d}/no/such/folder/d.png", "does not exist"),
    ("hessian --json {d}", "folder"),
    (HESS + " --params nomatch", "nomatch"),
    (HESS + " -k 1000", "k"),
    ("hessian --widths 64,8,10 --state {d}/mlp4.safetensors", "shape"),
    ("hessian --widths 64,4,10 --state {d}/missing.safetensors", "missing.safetensors"),
    ("hessian --widths 64,4,10 --state {d}/mlp4.pt", "--allow-pickle"),
    ("hessian --widths 64,4,10 --state {d}/list.pt --allow-pickle", "state dict"),
    ("hessian --widths 64,4,10 --state {d}/mixed.pt --allow-pickle", "state dict"),
    ("hessian --widths 64,4,10 --state {d}/fac.py", "fac.py"),
    ("hessian --widths 64,4,10 --state {d}/evil.pt", "--allow-pickle"),
    ("hessian --widths 64,4,10 --state {d}/evil.pt --allow-pickle", "weights_only"),
    # ntk
    ("ntk -n 0", "-n"),
    ("ntk -n -5", "-n"),
    ("ntk -n nan", "-n"),
    ("ntk -n inf", "-n"),
    (NTK + " -n 100000", "-n"),
    ("ntk --widths 64,,10", "--widths"),
    ("ntk --kind nope", "--kind"),
    ("ntk --json {d}/no/such/folder/k.json", "does not exist"),
    ("ntk --json {d}/existing.json", "--overwrite"),
    ("ntk --widths 64,4,10 --state {d}/evil.pt --allow-pickle", "weights_only"),
    # bench
    ("bench no-such-suite --out {d}/b1", "not a built-in suite"),
    ("bench {d}/missing.yaml --out {d}/b2", "missing.yaml"),
    ("bench {d}/existing.json --out {d}/afile", "afile"),
    ("bench digits-tasks --executor nope", "--executor"),
    ("bench --out {d}/b3", "give one suite"),
    ("bench digits-tasks --suite {d}/x.yaml --out {d}/b4", "give one suite"),
    # align, demo, methods, merge
    ("align {d}/m0.safetensors {d}/m1.safetensors {d}/aligned --seed -1", "--seed"),
    ("align {d}/m0.safetensors {d}/m1.safetensors {d}/aligned --max-iter 0", "--max-iter"),
    ("align {d}/m0.safetensors {d}/m1.safetensors {d}/aligned --max-iter nan", "--max-iter"),
    ("demo --out {d}/afile", "afile"),
    ("demo --out {d}/demo_prev", "--overwrite"),
    ("methods --family nope", "nope"),
    ("merge", "recipe"),
]


@pytest.mark.parametrize("line,fragment", TABLE, ids=[line.split(" {d}")[0][:60] + f"-{i}"
                                                       for i, (line, _) in enumerate(TABLE)])
def test_bad_command_line_is_one_line_exit_2(env, capsys, line, fragment):
    argv = line.format(d=env["d"]).split()
    rc, err = run_cli(argv, capsys)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("basin"), err
    assert fragment in lines[0], err
    assert not Path(env["marker"]).exists()


def test_payload_never_runs_with_torch_forcing_full_pickles(env, capsys, monkeypatch):
    """Every entry that loads state, with and without --allow-pickle, under TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    d, evil = env["d"], f"{env['d']}/evil.pt"
    fac = f"--model-factory {d}/fac.py:model --data {d}/fac.py:data"
    lines = [f"barrier {evil} {d}/m1.safetensors {fac}", f"barrier {d}/m0.safetensors {evil} {fac}",
             f"landscape {evil} {fac}", f"hessian --widths 64,4,10 --state {evil}",
             f"ntk --widths 64,4,10 --state {evil}", f"align {evil} {d}/m1.safetensors {d}/aligned"]
    for line in lines:
        for extra in ([], [] if line.startswith("align") else ["--allow-pickle"]):  # align has no opt-in
            rc, err = run_cli(line.split() + extra, capsys)
            assert rc == 2 and len(err.strip().splitlines()) == 1, (line, extra, err)
            assert "evil.pt" in err
            assert not Path(env["marker"]).exists(), (line, extra)
    # the payload file does run code when loaded as a full pickle: the test would see it
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({evil!r}, weights_only=False)"], check=True)
    assert Path(env["marker"]).exists()
    Path(env["marker"]).unlink()


def test_state_safetensors_and_allowed_pickle_give_the_trained_models_numbers(env, tmp_path):
    """--state as .safetensors (no pickle at all), or a .pt with --allow-pickle: the same eigenvalues, bit for
    bit, as the probe run in-process on the model that was saved."""
    from torch import nn

    from evaluations.digits import load_digits_split, train_classifier
    from evaluations.probes import HessianOperator, lanczos

    data = load_digits_split()
    model = train_classifier(make_mlp([64, 4, 10], seed=0), *data.train, epochs=1, seed=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "t.safetensors"))
    torch.save(model.state_dict(), tmp_path / "t.pt")
    expected = lanczos(HessianOperator(model.eval(), nn.CrossEntropyLoss(), data.train, params="2"), k=1,
                       tol=1e-3).to_json()["values"]
    common = ["hessian", "--widths", "64,4,10", "-k", "1", "--params", "2"]
    runs = {"safetensors": ["--state", str(tmp_path / "t.safetensors")],
            "pickle": ["--state", str(tmp_path / "t.pt"), "--allow-pickle"]}
    for name, extra in runs.items():
        out = tmp_path / f"{name}.json"
        assert main(common + extra + ["--json", str(out)]) == 0
        assert json.loads(out.read_text())["eigen"]["values"] == expected, name
    assert expected[0] > 0


def barrier_argv(env, out: Path, *extra: str) -> list[str]:
    d = env["d"]
    return [*f"barrier {d}/m0.safetensors {d}/m1.safetensors --model-factory {d}/fac.py:model "
            f"--data {d}/fac.py:data --alphas 3 --out {out}".split(), *extra]


def test_outputs_never_clobbered_without_overwrite(env, tmp_path, capsys):
    out = tmp_path / "bar"
    assert main(barrier_argv(env, out)) == 0
    first = (out / "barrier.json").read_bytes()
    (out / "barrier.json").write_text("mine")
    rc, err = run_cli(barrier_argv(env, out), capsys)
    assert rc == 2 and "--overwrite" in err and (out / "barrier.json").read_text() == "mine"
    assert main(barrier_argv(env, out, "--overwrite")) == 0
    assert (out / "barrier.json").read_bytes() == first  # deterministic, and replaced
    assert sorted(p.name for p in out.iterdir()) == ["barrier.json", "path.png"]


def test_ctrl_c_exits_130_and_leaves_nothing(env, tmp_path, capsys, monkeypatch):
    """Ctrl-C while the outputs are being written: one line, exit 130, no file, no temporary, no new folder."""
    import evaluations.landscape.plots as plots

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "plot_path", interrupted)
    out = tmp_path / "new" / "bar"
    rc, err = run_cli(barrier_argv(env, out), capsys)
    assert rc == 130 and err.strip().splitlines()[-1] == "basin barrier: interrupted" and "Traceback" not in err
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "kept"
    existing.mkdir()
    rc, _ = run_cli(barrier_argv(env, existing), capsys)
    assert rc == 130 and list(existing.iterdir()) == []


def test_full_disk_is_one_line_and_nothing_written(env, tmp_path, capsys, monkeypatch):
    import evaluations.landscape.plots as plots

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(plots, "plot_path", full)
    out = tmp_path / "bar"
    rc, err = run_cli(barrier_argv(env, out), capsys)
    last = err.strip().splitlines()[-1]  # above it: the progress bar of the computation
    assert rc == 2 and last.startswith("basin barrier: error: ") and "Traceback" not in err
    assert "No space left on device" in last and "nothing was written" in err and "path.png" in err
    assert not out.exists()


def test_hessian_json_and_density_written_atomically(tmp_path, env, capsys):
    out, png = tmp_path / "h.json", tmp_path / "d.png"
    argv = ["hessian", "--widths", "64,4,10", "--state", f"{env['d']}/mlp4.safetensors", "-k", "1", "--params", "2",
            "--json", str(out)]
    assert main(argv) == 0
    assert json.loads(out.read_text())["params"] == 50
    rc, err = run_cli(argv, capsys)
    assert rc == 2 and "--overwrite" in err
    assert main(argv + ["--overwrite", "--density", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.png", "h.json"]


@pytest.mark.parametrize("command,codes", [(["--help"], {141}), (["methods"], {141}),
                                           (["barrier", "--help"], {0, 141})])  # argparse drops the write error
def test_closed_stdout_pipe_ends_quietly(command, codes):
    """The reader of stdout goes away first (`basin ... | head -1`): no traceback, no message, exit 141."""
    code = "import sys; from evaluations.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert err == "" and proc.returncode in codes, (proc.returncode, err)


def test_piped_into_head(tmp_path):
    code = "import sys; from evaluations.cli import main; sys.exit(main(sys.argv[1:]))"
    for command in ("--help", "methods"):
        shell = f"{sys.executable} -c '{code}' {command} | head -1"
        done = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
        assert done.stderr == "" and len(done.stdout.splitlines()) == 1, done


def test_argument_types():
    finite = float_range(0, 1, lo_open=True)
    assert finite("1e-3") == 1e-3 and finite("1") == 1.0
    for bad in ("nan", "NaN", "inf", "-inf", "1e999", "0", "-1", "1.5", "x", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            finite(bad)
    count = int_range(1, 10)
    assert count("10") == 10
    for bad in ("0", "11", "1.0", "nan", "1e3"):
        with pytest.raises(argparse.ArgumentTypeError):
            count(bad)
    assert int_list(1, min_len=2)("64, 8,10") == [64, 8, 10]
    for bad in ("64", "64,", "64,0", "a,b"):
        with pytest.raises(argparse.ArgumentTypeError):
            int_list(1, min_len=2)(bad)


def test_grid_size_is_refused_above_the_memory_estimate(monkeypatch):
    import evaluations.cli.args as args_module

    monkeypatch.setattr(args_module, "memory_budget", lambda: 100 * args_module.BYTES_PER_POINT)
    assert grid_size(2)("10") == 10 and grid_size(1)("100") == 100
    with pytest.raises(argparse.ArgumentTypeError, match="GiB"):
        grid_size(2)("11")
    with pytest.raises(argparse.ArgumentTypeError, match="GiB"):
        grid_size(1)("101")
    assert math.isqrt(args_module.memory_budget() // args_module.BYTES_PER_POINT) == 10
