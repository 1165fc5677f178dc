"""Issue 18, items 6-8: hostile headers and indexes, full or read-only disks, symlinked outputs and temporary
folders as one-line errors (exit 2); resume keyed on content; one writer per output."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from evaluations.cli import main
from merging import merge
from merging.io.checkpoint import open_checkpoint
from merging.io.guard import OutputLock
from merging.io.safetensors_format import read_header
from merging.io.writer import JOURNAL, ShardWriter, parse_size, temp_folder
from taxonomy.errors import BasinError
from tests.merging.conftest import random_state, write_safetensors

ROOT = Path(__file__).resolve().parents[2]


def _file(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _one_line(capsys, argv: list[str], message: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


HOSTILE = {
    "deep": (b"[" * 200_000 + b"]" * 200_000, "not an object of tensor entries"),
    "deep object": (b'{"a":' * 200_000 + b"1" + b"}" * 200_000, "not valid JSON"),
    "infinity": ({"w": {"dtype": "F32", "shape": [float("inf")], "data_offsets": [0, 4]}}, "not valid JSON"),
    "nan": (b'{"w": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}', "not valid JSON"),
    "fraction": ({"w": {"dtype": "F32", "shape": [4.7], "data_offsets": [0, 16]}}, "non-negative integers"),
    "negative": ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [4, 0]}}, "non-negative integers"),
    "bool": ({"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, "non-negative integers"),
    "huge": ({"w": {"dtype": "F32", "shape": [2**64], "data_offsets": [0, 4]}}, "non-negative integers"),
    "dtype": ({"w": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, "dtype 'F33'"),
    "offsets": ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4.0]}}, "data_offsets"),
    "mismatch": ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, "does not match shape"),
    "overlap": ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                 "v": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, "gap or overlap"),
    "past end": ({"w": {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]}}, "truncated"),
    "entry": ({"w": [1, 2, 3]}, "expected dtype, shape and data_offsets"),
    "metadata": ({"__metadata__": {"a": [1]}}, "__metadata__"),
    "list": ([1, 2], "not a JSON object"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_headers_are_one_line_errors(tmp_path, case):
    header, message = HOSTILE[case]
    path = _file(tmp_path / "m.safetensors", header, b"\0" * 16)
    with pytest.raises(BasinError, match=message) as err:
        read_header(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("length", [2**63, 2**64 - 1, 200 * 1024 * 1024, 9])
def test_header_lengths_bounded_before_reading(tmp_path, length):
    path = _file(tmp_path / "m.safetensors", b"{}", length=length)
    with pytest.raises(BasinError, match="corrupted or truncated"):
        read_header(path)


def test_shape_shared_by_every_input_is_still_refused_by_the_cli(tmp_path, capsys):
    """A negative shape in every input used to pass the cross-input checks; open_checkpoint refuses it."""
    header = {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [4, 0]}}
    models = [str(_file(tmp_path / f"m{k}" / "model.safetensors", header, b"\0" * 4).parent) for k in range(2)]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"merge_method": "linear", "models": models}))
    _one_line(capsys, ["merge", str(tmp_path / "r.yaml"), str(tmp_path / "out"), "--no-progress"],
              "non-negative integers")
    for case in ("deep", "infinity", "fraction"):
        _file(tmp_path / "m0" / "model.safetensors", HOSTILE[case][0], b"\0" * 16)
        _one_line(capsys, ["merge", str(tmp_path / "r.yaml"), str(tmp_path / "out"), "--no-progress"],
                  "m0/model.safetensors")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("index", [b"[1, 2]", b'{"weight_map": []}', b'{"weight_map": {"w": "a\\u0000b"}}',
                                   b'{"weight_map": {"w": 3}}', b'{"weight_map": {}}', b"[" * 100_000, b"\xff"])
def test_bad_indexes_are_one_line_errors(tmp_path, index):
    write_safetensors({"w": torch.ones(2)}, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors.index.json").write_bytes(index)
    with pytest.raises(BasinError, match="model.safetensors.index.json"):
        open_checkpoint(tmp_path / "m")


@pytest.mark.parametrize("size", ["infGB", "nanMB", "1e400", "-5GB", "0", "0.5B", "2PB", "lots", "GB"])
def test_bad_shard_sizes(size, tmp_path, capsys):
    with pytest.raises(BasinError, match="shard size"):
        parse_size(size)
    model = write_safetensors(random_state(0), tmp_path / "m")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"merge_method": "linear", "models": [str(model)]}))
    _one_line(capsys, ["merge", str(tmp_path / "r.yaml"), str(tmp_path / "o"), f"--shard-size={size}",
                       "--no-progress"], "shard size")
    assert parse_size("1.5KB") == 1500 and parse_size(" 2 MiB ") == 2 * 1024**2


@pytest.fixture
def recipe(tmp_path):
    models = [write_safetensors(random_state(s), tmp_path / "in" / f"m{s}") for s in range(2)]
    path = tmp_path / "in" / "r.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "linear", "models": [str(m) for m in models]}))
    (tmp_path / "outs").mkdir()
    return path


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT])
@pytest.mark.parametrize("where", ["pwrite", "mkdir", "copy", "rename"])
def test_write_failures_say_what_and_leave_nothing(recipe, capsys, monkeypatch, code, where):
    import merging.io.writer as writer

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(args[0]) if where != "pwrite" else None)

    target = {"pwrite": (writer.os, "pwrite"), "mkdir": (Path, "mkdir"), "copy": (writer.shutil, "copyfile"),
              "rename": (writer.os, "replace")}[where]
    (recipe.parent / "m0" / "tokenizer.json").write_text("{}")  # something to copy
    monkeypatch.setattr(*target, fail)
    outs = recipe.parent.parent / "outs"
    err = _one_line(capsys, ["merge", str(recipe), str(outs / "o"), "--no-progress"], os.strerror(code))
    assert "nothing was written" in err
    assert list(outs.iterdir()) == []


@pytest.mark.slow
def test_read_only_folder_as_an_unprivileged_user(tmp_path):
    """A real EACCES: `basin merge` run as nobody into a folder it may not write (when we can drop root)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run as nobody")
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="basin-ro-"))
    try:
        os.chmod(root, 0o755)
        model = write_safetensors(random_state(0), root / "m")
        (root / "r.yaml").write_text(yaml.safe_dump({"merge_method": "linear", "models": [str(model)]}))
        for p in [root / "m", *root.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        (root / "ro").mkdir(mode=0o555)
        os.chmod(root / "ro", 0o555)
        cmd = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-m",
               "evaluations.cli", "merge", str(root / "r.yaml"), str(root / "ro" / "out"), "--no-progress"]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(root)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=120)
        if "Permission denied" in proc.stderr and "setpriv" in proc.stderr:
            pytest.skip("cannot drop privileges here")
        assert proc.returncode == 2, proc.stderr
        assert "Permission denied" in proc.stderr and "nothing was written" in proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert list((root / "ro").iterdir()) == []
    finally:
        shutil.rmtree(root)


def test_symlinked_output_refused_and_symlinked_temp_folder_unlinked(recipe, capsys):
    outs = recipe.parent.parent / "outs"
    elsewhere = outs / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("x")
    (outs / "o").symlink_to(elsewhere)
    _one_line(capsys, ["merge", str(recipe), str(outs / "o"), "--overwrite", "--no-progress"], "symbolic link")
    (outs / "o").unlink()
    (outs / "dangling").symlink_to(outs / "nowhere")
    _one_line(capsys, ["merge", str(recipe), str(outs / "dangling"), "--overwrite", "--no-progress"],
              "symbolic link")
    temp_folder(outs / "o").symlink_to(elsewhere)  # a leftover temporary name pointing elsewhere
    assert main(["merge", str(recipe), str(outs / "o"), "--no-progress"]) == 0
    assert (outs / "o" / "model.safetensors").is_file() and not temp_folder(outs / "o").exists()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["keep.txt"]


def test_overwrite_replaces_only_after_the_new_output_is_complete(recipe, monkeypatch):
    out = recipe.parent.parent / "outs" / "o"
    first = merge(recipe, out, progress=False)
    import merging.io.writer as writer

    real = writer.os.replace
    calls = []

    def replace(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:
            raise OSError(errno.EIO, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(writer.os, "replace", replace)
    with pytest.raises(BasinError, match="Input/output error"):
        merge(recipe, out, progress=False, overwrite=True)
    assert calls[:3] == [("o", ".o.basin-old"), (".o.basin-tmp", "o"), (".o.basin-old", "o")]
    assert sorted(p.name for p in out.parent.iterdir()) == ["o"]
    assert merge(recipe, recipe.parent.parent / "outs" / "x", progress=False).content_hash == first.content_hash


# item 7: resume keyed on content

def _interrupt_after(monkeypatch, k: int) -> None:
    real_add = ShardWriter.add
    count = [0]

    def add(self, name, tensor):
        if count[0] == k:
            raise KeyboardInterrupt
        real_add(self, name, tensor)
        count[0] += 1

    monkeypatch.setattr(ShardWriter, "add", add)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_detects_same_size_input_with_restored_mtime(tmp_path, monkeypatch, dtype):
    models = [write_safetensors(random_state(s, dtype), tmp_path / f"m{s}") for s in range(2)]
    recipe = {"merge_method": "linear", "models": [str(m) for m in models], "parameters": {"weight": [0.3, 0.7]}}
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _interrupt_after(m, 4)
        with pytest.raises(KeyboardInterrupt):
            merge(recipe, out, progress=False, shard_size=250)
    assert (temp_folder(out) / JOURNAL).is_file()
    victim = models[1] / "model.safetensors"
    st = victim.stat()
    replacement = write_safetensors(random_state(7, dtype), tmp_path / "other") / "model.safetensors"
    assert replacement.stat().st_size == st.st_size
    shutil.copyfile(replacement, victim)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))  # as `cp -p` / `rsync -t` leave it
    assert (victim.stat().st_size, victim.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    report = merge(recipe, out, progress=False, shard_size=250)
    fresh = merge(recipe, tmp_path / "fresh", progress=False, shard_size=250)
    assert report.resumed_tensors == 0 and report.content_hash == fresh.content_hash
    for f in (tmp_path / "fresh").glob("*.safetensors"):
        assert (out / f.name).read_bytes() == f.read_bytes()


def test_resume_still_works_when_inputs_are_unchanged_but_touched(tmp_path, monkeypatch):
    models = [write_safetensors(random_state(s), tmp_path / f"m{s}") for s in range(2)]
    recipe = {"merge_method": "linear", "models": [str(m) for m in models]}
    with monkeypatch.context() as m:
        _interrupt_after(m, 5)
        with pytest.raises(KeyboardInterrupt):
            merge(recipe, tmp_path / "out", progress=False)
    os.utime(models[0] / "model.safetensors")  # same bytes, new mtime: still the same content
    report = merge(recipe, tmp_path / "out", progress=False)
    assert report.resumed_tensors == 5
    assert report.content_hash == merge(recipe, tmp_path / "fresh", progress=False).content_hash


# item 8: one writer per output

def test_second_writer_fails_at_once_and_the_first_is_untouched(recipe, capsys):
    out = recipe.parent.parent / "outs" / "o"
    holder = OutputLock(out)
    try:
        err = _one_line(capsys, ["merge", str(recipe), str(out), "--no-progress"], "another basin run")
        assert str(holder.path) in err and not out.exists() and not temp_folder(out).exists()
        with pytest.raises(BasinError, match="another basin run"):
            ShardWriter(out, [("w", (1,), torch.float32)])
    finally:
        holder.release()
    assert main(["merge", str(recipe), str(out), "--no-progress"]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["o"]  # lock file removed


def test_lock_held_by_another_process_then_released_by_its_death(recipe, capsys, monkeypatch):
    """The overlap forced across processes: a process holding the lock (as a merge in flight does) makes a
    second merge fail; once it is killed (SIGKILL, no cleanup) the rerun resumes the interrupted merge."""
    out = recipe.parent.parent / "outs" / "o"
    with monkeypatch.context() as m:
        _interrupt_after(m, 3)
        with pytest.raises(KeyboardInterrupt):
            merge(recipe, out, progress=False)
    lock = out.parent / ".o.basin-lock"
    code = ("import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
            "print('held', flush=True); time.sleep(60)")  # what OutputLock does, without importing torch
    proc = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        _one_line(capsys, ["merge", str(recipe), str(out), "--no-progress"], "another basin run")
        assert (temp_folder(out) / JOURNAL).is_file()  # the holder's partial output was not touched
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert lock.exists()  # left behind by the killed holder: stale, must not block
    start = time.perf_counter()
    report = merge(recipe, out, progress=False)
    assert report.resumed_tensors == 3 and time.perf_counter() - start < 30
    assert not lock.exists()
