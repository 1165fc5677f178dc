"""Issue 18 acceptance, safetensors-header half: seeded random mutations of valid headers give a one-line
`BasinError` naming the file, or a checkpoint whose every tensor is exactly the file's bytes (read with numpy
at the header's offsets, and as the safetensors library reads it); never another exception, and memory
bounded (tracemalloc in process; exit 2, no traceback and a bounded peak RSS through the CLI)."""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from merging.io.checkpoint import open_checkpoint
from merging.io.safetensors_format import DTYPES, read_header
from taxonomy.errors import BasinError

ROOT = Path(__file__).resolve().parents[2]
CASES = 400
JUNK = [None, True, False, -1, 0, 1, 3, 4.7, -0.0, 2**31, 2**63, 2**64, 10**30, "F32", "BF16", "x", "", "\0", [],
        [1], [-1], [4.7], [2**63], [True], [[1]], {}, {"a": 1}, [0, 0], [0, 4], [4, 0], [0, 2**64], float("inf"),
        float("nan"), "Infinity", list(range(70))]


def _valid(folder: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    state = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g).bfloat16(),
             "c": torch.arange(4).reshape(2, 2), "d": torch.tensor([True, False, True]),
             "e": torch.zeros(0, dtype=torch.uint8), "f": torch.randn(1, 1, 2, generator=g).half()}
    path = folder / "valid.safetensors"
    save_file(state, path, metadata={"format": "pt"})
    return path


def _split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _mutate_json(rng: random.Random, header: dict) -> dict:
    header = json.loads(json.dumps(header))
    names = [k for k in header if k != "__metadata__"]
    for _ in range(rng.randint(1, 3)):
        name = rng.choice(names + ["__metadata__"])
        roll = rng.random()
        if name == "__metadata__":
            header[name] = rng.choice(JUNK + [{"k": rng.choice(JUNK)}])
        elif not all(isinstance(header[k], dict) for k in names):
            header[name] = rng.choice(JUNK)
        elif roll < 0.45:
            header[name][rng.choice(["dtype", "shape", "data_offsets"])] = rng.choice(JUNK)
        elif roll < 0.6:
            header[name]["dtype"] = rng.choice(list(DTYPES) + ["F8", "I128", "f32"])
        elif roll < 0.7:
            header[name]["shape"] = [rng.randint(-2, 6) for _ in range(rng.randint(0, 3))]
        elif roll < 0.8:
            other = rng.choice(names)
            header[name]["data_offsets"], header[other]["data_offsets"] = (header[other]["data_offsets"],
                                                                          header[name]["data_offsets"])
        elif roll < 0.9:
            del header[name][rng.choice(["dtype", "shape", "data_offsets"])]
        else:
            header[name] = rng.choice(JUNK)
    return header


def _benign(rng: random.Random, header: dict) -> bytes:
    """Changes a reader must accept: entries reordered or renamed, string metadata, extra entry keys, padding."""
    items = list(json.loads(json.dumps(header)).items())
    rng.shuffle(items)
    out = {}
    for name, entry in items:
        if name != "__metadata__" and rng.random() < 0.3:
            name = name + rng.choice(["_x", ".weight", " ", "\u00e9"])
        if name != "__metadata__" and rng.random() < 0.2:
            entry["extra"] = rng.choice(JUNK[:10])
        out[name] = entry
    if rng.random() < 0.5:
        out["__metadata__"] = {"format": "pt", rng.choice(["a", "b:c", "[{"]): rng.choice(["", "x", "[1, {2}]"])}
    return _encode(out) + b" " * rng.randrange(16)


def _encode(header: dict) -> bytes:
    return json.dumps(header, allow_nan=True).encode()


def _mutate_bytes(rng: random.Random, raw: bytes) -> bytes:
    data = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        roll, at = rng.random(), rng.randrange(len(data) or 1)
        if roll < 0.5 and data:
            data[at] = rng.randrange(256)
        elif roll < 0.7:
            data[at:at] = bytes(rng.choice(b'[]{}",:0-9.eE\\\0') for _ in range(rng.randint(1, 8)))
        elif roll < 0.9:
            del data[at:at + rng.randint(1, 8)]
        else:
            data = data[:at]
    return bytes(data)


def fuzz_case(rng: random.Random, header: dict, body: bytes) -> bytes:
    """One mutated file: JSON-level, byte-level, length prefix or truncated data."""
    kind = rng.random()
    raw = _encode(header)
    length = None
    if kind < 0.1:
        raw = _benign(rng, header)
    elif kind < 0.5:
        raw = _encode(_mutate_json(rng, header))
    elif kind < 0.8:
        raw = _mutate_bytes(rng, raw)
    elif kind < 0.9:
        length = rng.choice([0, 1, 7, len(raw) - 1, len(raw) + 1, 2**63, 2**64 - 1, rng.getrandbits(64)])
    else:
        body = body[: rng.randrange(len(body) + 1)]
    return struct.pack("<Q", len(raw) if length is None else length) + raw + body


def _check_accepted(path: Path) -> None:
    """An accepted file: each tensor equals its bytes as the header places them (numpy over the raw file)."""
    ckpt = open_checkpoint(path)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    for name in ckpt.names():
        entry = header[name]
        meta = ckpt.meta(name)
        assert meta.dtype == DTYPES[entry["dtype"]] and list(meta.shape) == entry["shape"]
        begin, end = entry["data_offsets"]
        want = np.frombuffer(raw, dtype=np.uint8, count=end - begin, offset=8 + n + begin)
        got = ckpt.get(name).contiguous().reshape(-1).view(torch.uint8).numpy()
        assert got.tobytes() == want.tobytes(), name
    with safe_open(str(path), "pt") as f:  # the format's own reader accepts it too, with the same tensors
        assert sorted(f.keys()) == sorted(ckpt.names())
        for name in f.keys():
            assert f.get_tensor(name).reshape(-1).view(torch.uint8).numpy().tobytes() == \
                ckpt.get(name).reshape(-1).view(torch.uint8).numpy().tobytes(), name


def test_fuzzed_headers_give_one_line_errors_or_exact_tensors(tmp_path):
    header, body = _split(_valid(tmp_path))
    rng = random.Random(18)
    outcomes = {"refused": 0, "accepted": 0}
    tracemalloc.start()
    try:
        for case in range(CASES):
            path = tmp_path / f"case{case}.safetensors"
            path.write_bytes(fuzz_case(rng, header, body))
            tracemalloc.reset_peak()
            try:
                _check_accepted(path)
                outcomes["accepted"] += 1
            except BasinError as err:
                message = str(err)
                assert "\n" not in message and str(path) in message, message
                outcomes["refused"] += 1
            peak = tracemalloc.get_traced_memory()[1]
            assert peak < 8 * 1024**2, (case, peak)
            path.unlink()
    finally:
        tracemalloc.stop()
    assert outcomes["refused"] > CASES // 2 and outcomes["accepted"] > 10, outcomes


@pytest.mark.parametrize("kind", ["brackets", "entries", "metadata"])
def test_big_hostile_headers_stay_within_a_multiple_of_their_size(tmp_path, kind):
    """Memory is bounded by the header's size (at most MAX_HEADER): a list of a million empty lists is refused
    before it is built; a valid but huge header costs a bounded multiple of its bytes."""
    size = 512 * 1024
    raw = {
        "brackets": b"[" + b"[]," * (size // 3) + b"[]]",
        "entries": b"{" + b",".join(b'"t%d":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}' % k
                                    for k in range(size // 52)) + b"}",
        "metadata": b'{"__metadata__":{' + b",".join(b'"%d":""' % k for k in range(size // 10)) + b"}}",
    }[kind]
    path = tmp_path / "big.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    tracemalloc.start()
    try:
        try:
            metas, _ = read_header(path)
            assert kind != "brackets" and len(metas) == (size // 52 if kind == "entries" else 0)
        except BasinError as err:
            assert kind == "brackets" and "not an object of tensor entries" in str(err)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * len(raw), peak / len(raw)


@pytest.mark.slow
def test_fuzzed_inputs_through_the_cli_exit_2_without_traceback(tmp_path):
    """A few fuzzed files merged by `basin merge` subprocesses (run side by side): exit 0 or 2, one line,
    never a traceback; peak RSS of each bounded."""
    header, body = _split(_valid(tmp_path))
    rng = random.Random(1818)
    procs = []
    for case in range(2):  # each subprocess imports torch: two keep this test near 10 s on 2 cores
        folder = tmp_path / f"m{case}"
        folder.mkdir()
        refused = None
        while refused is not True:  # pick cases open_checkpoint refuses (the interesting ones here)
            (folder / "model.safetensors").write_bytes(fuzz_case(rng, header, body))
            try:
                read_header(folder / "model.safetensors")
                refused = False
            except BasinError:
                refused = True
        (folder / "r.yaml").write_text(yaml.safe_dump({"merge_method": "linear", "models": [str(folder)]}))
        # VmHWM, not ru_maxrss: ru_maxrss survives execve, so it would report the forking pytest's peak
        code = ("import re, sys; from evaluations.cli import main; rc = main(sys.argv[1:]); "
                "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)); sys.exit(rc)")
        procs.append(subprocess.Popen(
            [sys.executable, "-c", code, "merge", str(folder / "r.yaml"), str(tmp_path / f"out{case}"),
             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)}))
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "model.safetensors" in err, err
        assert int(out.strip()) < 2 * 1024**2  # kB: torch's import is most of it
    assert not any(tmp_path.glob("out*"))
