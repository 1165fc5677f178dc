"""TALL masks' and EMR's side outputs streamed chunk by chunk (masks.SideStream, merging/output/task_files.py
`stream_side_outputs`, `ShardWriter.add_part`) against the whole-tensor functions kept as their reference
(`masks._tall_outputs`, `masks._emr_outputs`): the same bits for every key, with the compiled kernel and without,
1 and 2 chunk workers, float32 and bf16 inputs, sizes that are not multiples of a chunk, a sum buffer or a slab,
non-finite values at chunk borders; a whole merge's side folder is the same as with the whole-tensor path; and a
merge's memory is bounded by a few slabs, not by a tensor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merging.io import writer as writer_module
from merging.io.writer import ShardWriter
from merging.methods import kernels, masks
from merging.methods.catalog import get_method
from merging.methods.chunking import set_chunk_workers
from merging.output import task_files
from merging.pipeline import merge
from taxonomy.errors import OutputError

ROOT = Path(__file__).resolve().parents[2]
B = masks.SUM_BLOCK
CASES = [(1, False), (8193, False), (B, False), (B + 1, False), (3 * B + 12345, False), (3 * B + 12345, True)]


def inputs(numel, n, dtype, special, seed=0):
    g = torch.Generator().manual_seed(seed + numel + n)
    base = torch.randn(numel, generator=g).to(dtype)
    xs = [(base.float() + 0.02 * torch.randn(numel, generator=g)).to(dtype) for _ in range(n)]
    if special:  # around the first chunk border, and a zero task vector
        for i, (at, value) in enumerate(((B - 1, float("nan")), (B, float("inf")), (B + 1, -float("inf")))):
            xs[i % n][at] = value
        xs[-1][B - 2] = base[B - 2]
        base[numel - 1] = float("nan")
    return xs, base


def reference(method, xs, base, dtype, params):
    b = base.to(torch.float32)
    task_vectors = [x.to(torch.float32) - b for x in xs]
    return get_method(method).task_outputs.compute(task_vectors, params, dtype)


def streamed(tmp_path, method, xs, base, dtype, params):
    spec = get_method(method).task_outputs
    n, numel = len(xs), base.numel()
    layout = [(f"{key}/w", shape, d) for key, shape, d in spec.layout((numel,), n, dtype)]
    tmp_path.mkdir(parents=True, exist_ok=True)
    side = ShardWriter(tmp_path / "side", layout)
    writes = task_files.SideWrites(side)
    task_files.stream_side_outputs(spec, writes, "w", xs, base, params, dtype)
    writes.finish()
    side.close()
    return {key.split("/")[0]: value for key, value in load_file(tmp_path / "side" / "model.safetensors").items()}


def assert_same_bits(got, want):
    assert got.keys() == want.keys()
    for key in want:
        a, b = got[key], want[key]
        assert a.dtype == b.dtype and a.shape == b.shape, key
        if a.is_floating_point():
            a, b = a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
        assert torch.equal(a, b), key


@pytest.fixture
def small_slabs(monkeypatch):
    monkeypatch.setattr(task_files, "SLAB_BLOCKS", 2)  # slab borders inside the larger sizes


@pytest.mark.parametrize("method", ["emr", "tall_masks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("numel,special", CASES)
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("compiled", [True, False])
def test_streamed_side_outputs_are_the_whole_tensor_ones(tmp_path, small_slabs, monkeypatch, method, dtype, numel,
                                                         special, workers, compiled):
    if not compiled:
        monkeypatch.setattr(kernels, "compiled", None)
    elif kernels.compiled is None:
        pytest.skip("the compiled kernel is not built")
    params = {"tall_lambda": 0.4}
    xs, base = inputs(numel, 3, dtype, special)
    want = reference(method, xs, base, dtype, params)
    old = set_chunk_workers(workers)
    try:
        got = streamed(tmp_path, method, xs, base, dtype, params)
    finally:
        set_chunk_workers(old)
    assert_same_bits(got, want)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float32])
def test_other_output_dtypes_and_mixed_inputs(tmp_path, small_slabs, out_dtype):
    """bf16 models over a float32 base, the task vector written as float16 or float32 (the kernel writes float32,
    torch rounds)."""
    xs, base = inputs(2 * B + 77, 4, torch.bfloat16, False, seed=5)
    base = base.float() + 1e-3
    for method in ("emr", "tall_masks"):
        want = reference(method, xs, base, out_dtype, {"tall_lambda": 0.7})
        assert_same_bits(streamed(tmp_path / method, method, xs, base, out_dtype, {"tall_lambda": 0.7}), want)


def test_compiled_and_torch_chunks_agree_on_sums():
    """The kernel's sums replay numpy's order (`masks.block_sum`) bit for bit, block by block."""
    if kernels.compiled is None:
        pytest.skip("the compiled kernel is not built")
    xs, base = inputs(B + 8191, 5, torch.float32, False, seed=9)
    stream = masks.SideStream(masks.SIDE_EMR, xs, base, torch.float32)
    for start, stop in ((0, B), (B, B + 8191)):
        vector, ms = torch.empty(stop - start), [torch.empty(stop - start, dtype=torch.bool) for _ in xs]
        fast = stream.chunk(start, stop, vector, ms)
        stream.compiled = False
        slow = stream.chunk(start, stop, vector, ms)
        stream.compiled = True
        assert len(fast) == 10 and fast == slow


def test_add_part_writes_what_add_writes(tmp_path, monkeypatch):
    x = torch.randn(1000).to(torch.bfloat16)
    layout = [("a", (10, 100), torch.bfloat16), ("b", (3,), torch.float32)]
    whole = ShardWriter(tmp_path / "whole", layout)
    whole.add("a", x.view(10, 100))
    whole.add("b", torch.ones(3))
    parts = ShardWriter(tmp_path / "parts", layout)
    for start, stop in ((0, 1), (1, 1), (1, 600), (600, 1000)):
        parts.add_part("a", start, x[start:stop])
    with pytest.raises(OutputError, match="does not continue"):
        parts.add_part("a", 0, x[:1])  # already complete
    with pytest.raises(OutputError, match="does not continue"):
        parts.add_part("b", 1, torch.ones(2))  # not from entry 0
    with pytest.raises(OutputError, match="does not continue"):
        parts.add_part("b", 0, torch.ones(2, dtype=torch.float64))
    parts.add_part("b", 0, torch.ones(2))
    with pytest.raises(OutputError, match="never written"):
        parts.close()
    parts.add_part("b", 2, torch.ones(1))
    assert parts.content_hash() == whole.content_hash()
    monkeypatch.setattr(writer_module, "DROP_BEHIND_LAG", 300)  # ranges waited for and dropped as they go
    unhashed = ShardWriter(tmp_path / "unhashed", layout, hashed=False, drop_behind=True)  # as the side outputs
    for start in range(0, 1000, 100):
        unhashed.add_part("a", start, x[start:start + 100])
    unhashed.add("b", torch.ones(3))
    with pytest.raises(OutputError, match="no content hash"):
        unhashed.content_hash()
    whole.close(), parts.close(), unhashed.close()
    for folder in ("parts", "unhashed"):
        assert (tmp_path / folder / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors"
                                                                            ).read_bytes()


def _models(folder: Path, n: int, shapes: dict[str, tuple[int, ...]], dtype=torch.bfloat16) -> list[str]:
    g = torch.Generator().manual_seed(3)
    base = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    refs = []
    for i in range(n + 1):
        tensors = base if i == 0 else {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(dtype)
                                       for k, v in base.items()}
        (folder / f"m{i}").mkdir(parents=True)
        save_file(tensors, str(folder / f"m{i}" / "model.safetensors"))
        refs.append(str(folder / f"m{i}"))
    return refs


@pytest.mark.parametrize("method", ["emr", "tall_masks"])
def test_a_merge_writes_the_side_folder_of_the_whole_tensor_path(tmp_path, method):
    """A merge (tensors above and below a chunk) with the streamed side outputs and with the whole-tensor `compute`
    (stream switched off): the same side tensors, bit for bit, and the same task models."""
    refs = _models(tmp_path, 3, {"big": (2 * B + 5,), "mat": (300, 1001), "norm": (64,)})
    recipe = {"merge_method": method, "base_model": refs[0], "models": [{"model": r} for r in refs[1:]]}
    spec = get_method(method).task_outputs
    merge(recipe, tmp_path / "streamed", progress=False)
    stream = spec.stream
    object.__setattr__(spec, "stream", None)  # a frozen dataclass: the whole-tensor path, for this merge only
    try:
        merge(recipe, tmp_path / "whole", progress=False)
    finally:
        object.__setattr__(spec, "stream", stream)
    got = load_file(tmp_path / "streamed" / "task_outputs" / "model.safetensors")
    want = load_file(tmp_path / "whole" / "task_outputs" / "model.safetensors")
    assert_same_bits(got, want)
    assert load_file(tmp_path / "streamed" / "model.safetensors").keys() == {"big", "mat", "norm"}
    for t in range(3):
        a = dict(task_files.task_tensors(tmp_path / "streamed", t))
        b = dict(task_files.task_tensors(tmp_path / "whole", t))
        assert_same_bits(a, b)


_PEAK = """
import json, re, sys
from merging.pipeline import merge
def rss(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
recipe = json.loads(sys.argv[1])
before = rss("VmRSS")
merge(recipe, sys.argv[2], progress=False)
print(json.dumps({"before": before, "peak": rss("VmHWM")}))
"""


@pytest.mark.slow
def test_side_outputs_hold_a_few_slabs_not_a_tensor(tmp_path):
    """Peak RSS of an EMR merge of 4 models of one 16M-entry bf16 tensor vs consensus TA on the same inputs (the
    same reads and compiled election, no side outputs): the side outputs add a few slabs (24 MB each), where the
    whole-tensor path held float32 task vectors of every model (4 x 64 MB) and more."""
    refs = _models(tmp_path, 4, {"w": (1 << 24,)})
    peaks = {}
    for method in ("consensus_ta", "emr"):
        recipe = {"merge_method": method, "base_model": refs[0], "models": [{"model": r} for r in refs[1:]]}
        run = subprocess.run([sys.executable, "-c", _PEAK, json.dumps(recipe), str(tmp_path / method)],
                             capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert run.returncode == 0, run.stderr
        peaks[method] = json.loads(run.stdout.strip().splitlines()[-1])
    extra = peaks["emr"]["peak"] - peaks["consensus_ta"]["peak"]
    print(peaks)
    assert extra < 120, peaks  # MB
