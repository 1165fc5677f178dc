"""Record mergekit's float32 merges of tiny checkpoints, for tests/merging/test_mergekit_fp32.py.

    PYTHONPATH=. /work/peers/mk/bin/python benchmarks/mergekit_fp32_fixture.py /work/peers/mk/bin/mergekit-yaml

builds the inputs of tests/merging/lowprec_inputs.py in a temporary folder, runs mergekit-yaml with
`dtype: float32` on each deterministic method of FP32_METHODS (recipes in lowprec_inputs._FORMS), and
writes the sha256 of every output tensor to tests/merging/data/mergekit_fp32.json, plus the values of the
methods of FP32_APPROX (where basin is not bit-identical: the test bounds the relative difference).
mergekit runs in its own environment; it is never a dependency of basin. Recorded with mergekit 0.1.5
and torch 2.13 (CPU).
"""

from __future__ import annotations

import sys

from mergekit_lowprec_fixture import DATA, record

from tests.merging.lowprec_inputs import FP32_APPROX, FP32_METHODS

if __name__ == "__main__":
    record(sys.argv[1] if len(sys.argv) > 1 else "mergekit-yaml", [(m, "float32") for m in FP32_METHODS],
           DATA / "mergekit_fp32.json", values=FP32_APPROX)
