"""benchmarks/_peer.timed: one child's own wall time, CPU time and peak RSS (os.wait4), and its failure; the
forward passes benchmarks/measure_cost.py counts in a report."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("_peer", Path(__file__).resolve().parents[2] / "benchmarks" / "_peer.py")
peer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(peer)

HOLD = "b = bytearray({mb} << 20); b[::4096] = b'x' * len(b[::4096]); import time; t = time.process_time()\n" \
       "while time.process_time() - t < 0.2: pass"


def test_peak_rss_and_cpu_are_the_childs_own():
    big = peer.timed([sys.executable, "-c", HOLD.format(mb=160)])
    small = peer.timed([sys.executable, "-c", HOLD.format(mb=8)])  # after the big one: not its maximum
    assert big["peak_rss_mb"] >= 160 > small["peak_rss_mb"] + 100
    assert big["cpu_seconds"] >= 0.2 and big["seconds"] >= big["cpu_seconds"] - 0.05


def test_failure_raises_with_stderr():
    with pytest.raises(RuntimeError, match="boom"):
        peer.timed([sys.executable, "-c", "import sys; sys.exit('boom')"])


def test_measure_cost_counts_every_forward_pass():
    spec = importlib.util.spec_from_file_location("measure_cost", peer.__file__.replace("_peer.py", "measure_cost.py"))
    mc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mc)
    path = {"alphas": [0.0, 0.5, 1.0]}
    report = {"losses": {"a": {}, "b": {}, "merge": {}}, "models": ["a", "b", "merge"],
              "paths": [dict(path), dict(path)], "barriers": [{"path": {"alphas": [0.0, 1.0]}}]}
    assert mc.forwards_every_point(report) == 3 + 6 + 2
    assert mc.forwards(report) == 3 + 2  # each model once, then only the paths' interior points
    assert mc.forwards_every_point({"losses": {"merge": {}}}) == 1
    assert mc.forwards({"models": ["merge"]}) == 1
