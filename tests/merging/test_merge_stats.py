"""merging.merge_stats (data-free statistics), the recipe's measure: block, modelcard.with_section: no I/O, no
models. References: float64 sums over whole tensors in torch, brute-force sign conflicts, the exact TIES kept count."""

from __future__ import annotations

import pytest
import torch

from merging.merge_stats import CHUNK, cosine_matrix, sparsifier, tensor_stats, zeroed
from merging.output.model_card import with_section
from merging.recipe.schema import Recipe
from taxonomy.errors import RecipeError


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7,), (CHUNK + 5,), (3, 2 * CHUNK // 3 + 1)])
def test_tensor_stats_equal_float64_reference(dtype, shape):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g).to(dtype)
    models = [(base.double() + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype) for _ in range(3)]
    models[1].reshape(-1)[:3] = base.reshape(-1)[:3]  # zero task-vector entries never conflict
    saved = [m.clone() for m in models]
    got = tensor_stats("w", models, base)
    assert all(torch.equal(m, s) for m, s in zip(models, saved))  # inputs untouched (float64 included)
    tvs = [(m.double() - base.double()).reshape(-1) for m in models]
    assert got.squares == pytest.approx([float(t @ t) for t in tvs], rel=1e-13)
    assert got.dots[0, 2] == pytest.approx(float(tvs[0] @ tvs[2]), rel=1e-12)
    stack = torch.stack(tvs)
    brute = sum(1 for e in range(stack.shape[1]) if (stack[:, e] > 0).any() and (stack[:, e] < 0).any()) \
        if stack.shape[1] < 100 else int(((stack > 0).any(0) & (stack < 0).any(0)).sum())
    assert got.conflicts == brute
    cos = got.cosines()
    assert cos[1][0] == cos[0][1] == pytest.approx(float(tvs[0] @ tvs[1] / (tvs[0].norm() * tvs[1].norm())), rel=1e-12)
    again = tensor_stats("w", models, base)
    assert again.squares == got.squares and again.dots == got.dots  # bit-identical reruns


def _bits(stats) -> tuple:
    return (stats.numel, [x.hex() for x in stats.squares], {k: v.hex() for k, v in stats.dots.items()},
            stats.conflicts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,with_base", [(4, True), (4, False), (2, True), (1, True), (1, False)])
def test_compiled_stats_are_numpys_bits(dtype, m, with_base, monkeypatch):
    """`stats_chunks` (_fused.c) replays numpy's pairwise sum of each chunk: the same bits as the numpy path, at
    every size around its blocks (8, 128, the halving) and chunks, with zeros, signed zeros, infinities and NaN."""
    from merging.methods import kernels

    if kernels.compiled is None:
        pytest.skip("the compiled kernels are not built")
    g = torch.Generator().manual_seed(m)
    for n in (1, 7, 8, 9, 127, 128, 129, 136, 255, 1000, CHUNK - 1, CHUNK, CHUNK + 9, 2 * CHUNK + 517):
        models = [(torch.randn(n, generator=g) * 10.0 ** (k - 2)).to(dtype) for k in range(m)]
        base = torch.randn(n, generator=g).to(dtype) if with_base else None
        if n > 8:
            models[0][:2] = 0 if base is None else base[:2]  # zero task-vector entries
            models[-1][2] = -0.0
            if n == 1000:
                models[0][5], models[-1][6] = float("inf"), float("nan")
        got = tensor_stats("w", models, base)
        with monkeypatch.context() as patch:
            patch.setattr(kernels, "compiled", None)
            want = tensor_stats("w", models, base)
        assert _bits(got) == _bits(want), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64, torch.bfloat16])
def test_chunk64_is_torch_conversion_bit_for_bit(dtype):
    """The float64 chunk (numpy's conversion on this thread) equals torch's `.to(float64)`, signed zeros, NaN,
    infinities, subnormals included."""
    from merging.merge_stats import _chunk64

    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3 * CHUNK + 11, generator=g) * 10.0 ** torch.randint(-40, 38, (3 * CHUNK + 11,), generator=g))
    x[:6] = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-45])
    x = x.to(dtype)
    for start, stop in ((0, CHUNK), (CHUNK, 3 * CHUNK + 11), (5, 9)):
        got = torch.from_numpy(_chunk64(x, start, stop))
        want = x[start:stop].to(torch.float64)
        assert got.dtype == torch.float64 and torch.equal(got.view(torch.int64), want.view(torch.int64))
        got[0] = 7.0
        assert x[start] != 7.0  # a copy


def test_tensor_stats_without_reference_and_zero_vectors():
    a = torch.tensor([1.0, -2.0, 0.0])
    got = tensor_stats("w", [a, torch.zeros(3)], None)
    assert got.squares == [5.0, 0.0] and got.conflicts == 0
    assert cosine_matrix(got.squares, got.dots) == [[1.0, None], [None, None]]
    opposite = tensor_stats("w", [a, -a], None)
    assert opposite.conflicts == 2 and opposite.cosines()[0][1] == -1.0


def test_zeroed_fractions_follow_each_method():
    assert sparsifier("ties") == "magnitude" and sparsifier("breadcrumbs") == "outliers"
    assert sparsifier("dare_ties") == "random" and sparsifier("della") == "della"
    assert sparsifier("task_arithmetic") is None and sparsifier("linear") is None
    assert zeroed("magnitude", 0.3, 10) == 7.0 and zeroed("magnitude", 0.35, 7) == 7 - int(0.35 * 7)
    assert zeroed("random", 0.25, 8) == 6.0 and zeroed("random", 1.0, 8) == 0.0 and zeroed(None, 0.1, 8) == 0.0


BASE = {"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}]}


def test_recipe_measure_block_round_trips():
    block = {"data": "calib.txt", "points": 5, "probes": ["loss", "hessian"], "params": r"layers\.1\.",
             "seq_len": 64, "max_examples": 10, "batch_size": 2, "seed": 3}
    recipe = Recipe.from_dict({**BASE, "measure": block})
    assert recipe.measure == block and recipe.to_dict()["measure"] == block
    assert Recipe.from_yaml(recipe.to_yaml()).measure == block
    assert "measure" not in Recipe.from_dict(BASE).to_dict()


@pytest.mark.parametrize("block, fragment", [
    ({"probes": ["loss", "barrier"]}, "measure.probes: unknown probe 'barrier'; did you mean 'barriers'?"),
    ({"point": 3}, "measure: unknown field 'point'; did you mean 'points'?"),
    ({"points": 1}, "measure.points: expected an integer >= 2, got 1"),
    ({"seq_len": True}, "measure.seq_len: expected an integer >= 2"),
    ({"probes": []}, "measure.probes: expected a non-empty list"),
    ({"data": ""}, "measure.data: expected a non-empty string"),
    ({"params": "(("}, "measure.params: '((' is not a regular expression"),
    ("calib.txt", "measure: expected a mapping"),
])
def test_recipe_measure_block_errors(block, fragment):
    with pytest.raises(RecipeError, match=fragment.replace("(", r"\(").replace("?", r"\?")):
        Recipe.from_dict({**BASE, "measure": block})


def test_with_section_appends_then_replaces():
    card = "# T\n\n## Inputs\n\nx\n\n## Recipe\n\ny\n"
    once = with_section(card, "Measurements", "| a |\n")
    assert once == card + "\n## Measurements\n\n| a |\n"
    twice = with_section(once, "Measurements", "| b |")
    assert twice.count("## Measurements") == 1 and "| a |" not in twice and twice.endswith("| b |\n")
    middle = with_section(card, "Inputs", "z")
    assert middle == "# T\n\n## Inputs\n\nz\n\n## Recipe\n\ny\n"
    assert with_section("", "Measurements", "m") == "## Measurements\n\nm\n"
