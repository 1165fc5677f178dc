"""The Ray executor: the tiny suite on a local Ray instance gives the in-process results exactly."""

from __future__ import annotations

import pytest

from evaluations.bench import Local, Ray, run_benchmark
from tests.evaluations.test_bench import shared_tiny_suite, strip_seconds

ray = pytest.importorskip("ray", reason="the ray extra is not installed")


def test_ray_executor_matches_local(tmp_path, tmp_path_factory):
    suite = shared_tiny_suite(tmp_path_factory)
    local = run_benchmark(suite, executor=Local(), progress=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = run_benchmark(suite, executor=Ray(), cache_dir=tmp_path / "cells", progress=False)
    finally:
        ray.shutdown()
    assert remote.executor == "ray" and local.executor == "local"
    assert [r.label for r in remote.rows] == [r.label for r in local.rows]
    assert strip_seconds(remote) == strip_seconds(local)
    assert remote.geometry == local.geometry
    assert len(list((tmp_path / "cells").glob("*.json"))) == len(local.rows) + 1
