"""Record mergekit's fp16/bf16 merges of tiny checkpoints, for basin's `compute_dtype` test.

    PYTHONPATH=. python benchmarks/mergekit_lowprec_fixture.py /path/to/mergekit-yaml

builds the inputs of tests/merging/lowprec_inputs.py in a temporary folder, runs mergekit-yaml on
linear, task_arithmetic, ties (density 0.5) and slerp (t = 0.3) with `dtype: float16` and
`bfloat16`, and writes the sha256 of every output tensor to tests/merging/data/mergekit_lowprec.json.
Recorded with mergekit 0.1.5 and torch 2.13 (CPU).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from merging.io.atomic import atomic_write_text
from tests.merging.lowprec_inputs import DTYPES, METHODS, make_inputs, recipe, tensor_hashes, tensor_values

DATA = Path(__file__).resolve().parents[1] / "tests" / "merging" / "data"


def record(mergekit_yaml: str, merges: list[tuple[str, str]], out: Path, values: tuple[str, ...] = ()) -> None:
    """Run mergekit-yaml on each (method, dtype) and write the per-tensor sha256 (and, for the methods in
    `values`, the float32 values) to `out`."""
    version = subprocess.run([str(Path(mergekit_yaml).with_name("python")), "-c",
                              "import importlib.metadata as m, torch; print(m.version('mergekit'), torch.__version__)"],
                             capture_output=True, text=True, check=True).stdout.split()
    result: dict = {"mergekit": version[0], "torch": version[1], "merges": {}, "values": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folders = make_inputs(Path(tmp) / "in")
        for method, dtype in merges:
            key = f"{method}-{dtype}"
            path = Path(tmp) / f"{key}.yaml"
            path.write_text(yaml.safe_dump(recipe(method, dtype, folders)))
            subprocess.run([mergekit_yaml, str(path), str(Path(tmp) / key)], check=True, capture_output=True)
            result["merges"][key] = tensor_hashes(Path(tmp) / key)
            if method in values:
                result["values"][key] = tensor_values(Path(tmp) / key)
            print(key, len(result["merges"][key]), "tensors")
    if not result["values"]:
        del result["values"]
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    record(sys.argv[1] if len(sys.argv) > 1 else "mergekit-yaml",
           [(m, d) for d in DTYPES for m in METHODS], DATA / "mergekit_lowprec.json")
