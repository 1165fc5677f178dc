"""float32 merges against mergekit 0.1.5, recorded by benchmarks/mergekit_fp32_fixture.py (mergekit run
side by side in its own environment, never imported): bit for bit for the deterministic methods, except
those of FP32_APPROX, where basin's float64 reductions (norms, dot products, sums of magnitudes) round
differently from mergekit's float32 ones; there the largest difference, relative to the tensor's largest
magnitude, stays below 1e-6.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from merging import merge
from tests.merging.lowprec_inputs import FP32_APPROX, FP32_METHODS, make_inputs, recipe, tensor_hashes

FIXTURE = json.loads((Path(__file__).parent / "data" / "mergekit_fp32.json").read_text())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("fp32"))


def relative_differences(folder: Path, recorded: dict[str, str]) -> dict[str, float]:
    """max |basin - mergekit| / max |mergekit| per tensor."""
    got = {n: t.numpy() for p in folder.glob("*.safetensors") for n, t in load_file(p).items()}
    assert sorted(got) == sorted(recorded)
    out = {}
    for name, raw in recorded.items():
        want = np.frombuffer(base64.b64decode(raw), dtype="<f4").astype(np.float64).reshape(got[name].shape)
        out[name] = float(np.abs(got[name].astype(np.float64) - want).max() / np.abs(want).max())
    return out


@pytest.mark.parametrize("method", FP32_METHODS)
def test_float32_merge_matches_mergekit(inputs, tmp_path, method):
    key = f"{method}-float32"
    merge(recipe(method, "float32", inputs), tmp_path / "out", progress=False)
    got = tensor_hashes(tmp_path / "out")
    assert sorted(got) == sorted(FIXTURE["merges"][key])
    if method not in FP32_APPROX:
        assert got == FIXTURE["merges"][key]
        return
    worst = max(relative_differences(tmp_path / "out", FIXTURE["values"][key]).values())
    assert worst < 1e-6, f"{method}: {worst:.3g}"
