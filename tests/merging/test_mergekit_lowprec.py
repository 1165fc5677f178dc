"""compute_dtype float16/bfloat16 reproduces mergekit 0.1.5's low-precision merges bit for bit.

The reference is recorded by benchmarks/mergekit_lowprec_fixture.py (mergekit itself, side by side);
the default float32 arithmetic is more precise, so it differs from mergekit in the last bits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from merging import merge
from tests.merging.lowprec_inputs import DTYPES, METHODS, make_inputs, recipe, tensor_hashes

FIXTURE = json.loads((Path(__file__).parent / "data" / "mergekit_lowprec.json").read_text())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("lowprec"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_compute_dtype_matches_mergekit_bit_for_bit(inputs, tmp_path, method, dtype):
    r = recipe(method, dtype, inputs)
    expected = FIXTURE["merges"][f"{method}-{dtype}"]
    merge(dict(r, compute_dtype=dtype), tmp_path / "low", progress=False)
    assert tensor_hashes(tmp_path / "low") == expected
    if method in ("task_arithmetic", "ties"):  # float32 arithmetic (the default) rounds once: not mergekit's bits
        merge(r, tmp_path / "f32", progress=False)
        got = tensor_hashes(tmp_path / "f32")
        assert sum(got[k] != expected[k] for k in expected) > len(expected) // 2


def test_compute_dtype_flag_and_unsupported_method(inputs, tmp_path):
    from taxonomy.errors import BasinError

    r = recipe("ties", "bfloat16", inputs)
    merge(r, tmp_path / "flag", progress=False, compute_dtype="bfloat16")
    assert tensor_hashes(tmp_path / "flag") == FIXTURE["merges"]["ties-bfloat16"]
    bad = dict(r, merge_method="dare_ties", compute_dtype="float16")
    with pytest.raises(BasinError, match="compute_dtype.*dare_ties"):
        merge(bad, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()
