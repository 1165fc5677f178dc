"""Issue 20, the report's cost: `write_point`'s compiled pass (`point_chunk` in merging/methods/_fused.c) gives
the bits of its torch ops (the path every point took before, and still takes without the kernel).

References: the torch path itself (`kernels.compiled = None`), bit for bit, and exact rational arithmetic
(`fractions.Fraction`) of round64(x0 w0), then fused multiply-adds, then round32, on sampled entries."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from evaluations.lm_path import CHUNK_ELEMENTS, open_sources, write_point
from merging.methods import kernels
from taxonomy.errors import CheckpointError

pytestmark = pytest.mark.skipif(kernels.compiled is None, reason="the compiled kernels were not built")


class Tiny(nn.Module):
    """A row-chunked weight (3 rows of 0.4 M entries: chunks of 2 rows and 1), a vector, a scalar and an integer
    buffer."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3, (CHUNK_ELEMENTS * 2) // 5))
        self.v = nn.Parameter(torch.zeros(37))
        self.s = nn.Parameter(torch.zeros(()))
        self.register_buffer("count", torch.zeros(4, dtype=torch.int64))


def _checkpoints(tmp_path, dtypes: list[torch.dtype], seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, dtype in enumerate(dtypes):
        state = {name: (torch.randn(t.shape, generator=g) * 10.0 ** torch.randint(-20, 20, t.shape, generator=g))
                 .to(dtype) for name, t in Tiny().state_dict().items() if t.is_floating_point()}
        state["w"][0, :5] = torch.tensor([0.0, -0.0, 1.0, -1.0, 3.0])  # signed zeros, exact values
        state["count"] = torch.arange(4) + i
        save_file(state, tmp_path / f"c{i}.safetensors")
        out.append(tmp_path / f"c{i}.safetensors")
    return out


class Counting:
    """The compiled module, counting its `point_chunk` calls (so a test knows the kernel ran)."""

    def __init__(self):
        self.calls = 0

    def point_chunk(self, *args):
        self.calls += 1
        return _COMPILED.point_chunk(*args)


_COMPILED = kernels.compiled


def _point(paths, weights, compiled) -> dict[str, torch.Tensor]:
    model = Tiny()
    saved = kernels.compiled
    kernels.compiled = compiled
    try:
        write_point(model, open_sources(model, paths), weights)
    finally:
        kernels.compiled = saved
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("dtypes,weights", [
    ([torch.float32, torch.float32], [1 / 3, 2 / 3]),
    ([torch.float32, torch.float32], [1.0, 0.0]),
    ([torch.bfloat16, torch.float32, torch.bfloat16], [0.3, -1.25, 1.9]),
    ([torch.bfloat16], [0.7]),
])
def test_compiled_point_has_the_bits_of_the_torch_ops(tmp_path, dtypes, weights):
    paths = _checkpoints(tmp_path, dtypes)
    counting = Counting()
    fast, slow = _point(paths, weights, counting), _point(paths, weights, None)
    assert counting.calls == 4  # w in two chunks, v, s: every chunk through the kernel
    for name in slow:
        a, b = fast[name], slow[name]
        assert a.dtype == b.dtype and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)), name
    assert torch.equal(fast["count"], torch.arange(4))  # integers from the first source


def test_compiled_point_against_exact_arithmetic(tmp_path):
    from safetensors.torch import load_file

    paths = _checkpoints(tmp_path, [torch.float32, torch.bfloat16, torch.float32], seed=1)
    weights = [0.1, 1 / 7, -2.3]
    point = _point(paths, weights, kernels.compiled)["w"].reshape(-1)
    xs = [load_file(p)["w"].reshape(-1).to(torch.float64) for p in paths]
    rng = np.random.default_rng(0)
    for j in [*range(8), *rng.integers(0, len(point), 300).tolist(), len(point) - 1]:
        acc = float(Fraction(float(xs[0][j])) * Fraction(weights[0]))  # round to float64
        for x, w in zip(xs[1:], weights[1:]):
            acc = float(Fraction(float(x[j])) * Fraction(w) + Fraction(acc))  # one rounding: a fused multiply-add
        assert float(point[j]) == float(np.float32(acc)), j


def test_non_finite_entry_names_the_checkpoint_and_tensor_either_way(tmp_path):
    paths = _checkpoints(tmp_path, [torch.float32, torch.float32])
    from safetensors.torch import load_file

    state = load_file(paths[1])
    state["w"][2, 7] = float("nan")
    save_file(state, paths[1])
    messages = []
    for compiled in (kernels.compiled, None):
        with pytest.raises(CheckpointError) as err:
            _point(paths, [0.5, 0.5], compiled)
        messages.append(str(err.value))
    assert messages[0] == messages[1] and "'w'" in messages[0] and "NaN" in messages[0]


def test_kernel_only_takes_float32_cpu_targets_and_checkpoint_rows(tmp_path):
    """Anything else (a device or bf16 model, a seeded direction) takes the torch ops: the kernel writes through a
    CPU address."""
    from evaluations.lm_path import SeededDirection, _compiled_terms

    model = Tiny()
    srcs = open_sources(model, _checkpoints(tmp_path, [torch.float32, torch.bfloat16]))
    assert _compiled_terms(model.v.data, srcs, [0.5, 0.5], "v", 0, 37) is not None
    for target in (torch.empty(37, device="meta"), torch.empty(37, dtype=torch.bfloat16), torch.empty(74)[::2]):
        assert _compiled_terms(target, srcs, [0.5, 0.5], "v", 0, 37) is None
    direction = SeededDirection(srcs[0], {"v"}, seed=0, index=0)
    assert _compiled_terms(model.v.data, [srcs[0], direction], [1.0, 0.1], "v", 0, 37) is None


def test_compiled_chunks_on_one_and_two_threads_give_the_same_bits_and_the_first_bad_chunk(tmp_path):
    from safetensors.torch import load_file

    paths = _checkpoints(tmp_path, [torch.bfloat16, torch.float32, torch.float32], seed=2)
    weights = [0.25, -0.5, 1.25]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _point(paths, weights, kernels.compiled)
        torch.set_num_threads(2)
        two = _point(paths, weights, kernels.compiled)
        for name in one:
            assert torch.equal(one[name].view(-1).view(torch.uint8), two[name].view(-1).view(torch.uint8)), name
        state = load_file(paths[2])
        state["w"][0, 3] = float("inf")  # the first chunk of w (rows 0-1)
        state["v"][5] = float("nan")  # a later tensor, whose chunk may finish first on another thread
        save_file(state, paths[2])
        with pytest.raises(CheckpointError) as err:
            _point(paths, weights, kernels.compiled)
        assert "'w'" in str(err.value) and "'v'" not in str(err.value)
    finally:
        torch.set_num_threads(threads)
