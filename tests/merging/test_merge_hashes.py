"""Every tensorwise method keeps its bits: the content hashes of benchmarks/merge_hashes.py's merges equal the
recorded ones (recorded before the pipeline reshape, on the same seeded inputs)."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "merge_hashes.py"


def test_content_hashes_equal_the_recorded_ones():
    spec = importlib.util.spec_from_file_location("merge_hashes", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    recorded = json.loads(module.RESULT.read_text())
    assert module.hashes() == recorded
