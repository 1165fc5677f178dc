"""merging.profiling: the phases a merge reports (seconds and bytes), nothing gathered outside `profiling()`,
and the machine block the benchmarks record."""

from __future__ import annotations

import torch

from merging import profiling


def _merge(tmp_path, method: str, name: str):
    from merging import merge
    from tests.merging.conftest import write_safetensors

    g = torch.Generator().manual_seed(3)
    base = {"w": (torch.randn(600, 500, generator=g) * 0.02).to(torch.bfloat16), "v": torch.ones(500)}
    base_dir = write_safetensors(base, tmp_path / "base")
    models = [str(write_safetensors({n: (t.float() + 0.001 * torch.randn(t.shape, generator=g)).to(t.dtype)
                                     for n, t in base.items()}, tmp_path / f"m{k}")) for k in range(2)]
    recipe = {"merge_method": method, "base_model": str(base_dir), "seed": 1,
              "models": [{"model": m, "parameters": {"weight": 0.5, "density": 0.5}} for m in models]}
    return merge(recipe, tmp_path / name, progress=False)


def test_a_profiled_merge_reports_its_phases_and_the_bytes_they_move(tmp_path):
    with profiling.profiling() as ties:
        report = _merge(tmp_path, "ties", "ties")
    phases = ties.to_json()
    inputs = 3 * (600 * 500 * 2 + 500 * 4)  # two models and the base, each read once by the engine
    assert phases["read"]["bytes"] == inputs and phases["read"]["calls"] == 2
    assert phases["write"]["bytes"] == report.bytes_written == 600 * 500 * 2 + 500 * 4
    assert phases["scan"]["bytes"] == 3 * 600 * 500 * 2 + 3 * 500 * 4  # both tensors, every input once
    assert phases["apply"]["bytes"] == inputs + (600 * 500 * 2 + 500 * 4)  # and the merged tensors written
    assert {"sample", "select"} <= set(phases) and "masks" not in phases
    assert list(phases) == [p for p in profiling.PHASES if p in phases]  # in pipeline order
    assert all(p["thread_seconds"] >= 0 for p in phases.values())
    with profiling.profiling() as dare:
        again = _merge(tmp_path, "dare_ties", "dare")
    assert "masks" in dare.to_json() and "scan" not in dare.to_json()
    assert dare.to_json()["masks"]["bytes"] == inputs  # rescale (the default): the L1 sums read every input
    plain = _merge(tmp_path, "dare_ties", "plain")  # unprofiled: nothing gathered, the same bits
    assert plain.content_hash == again.content_hash
    assert dare.calls["read"] == 2


def test_process_counters_and_the_machine_block():
    before = profiling.process_counters()
    sum(i * i for i in range(200_000))
    spent = profiling.counters_since(before)
    assert spent["user_seconds"] + spent["system_seconds"] >= 0 and "minor_faults" in spent
    machine = profiling.machine()
    assert machine["cpus"] >= 1 and machine["usable_cpus"] >= 1 and machine["cpu_model"]
    assert machine["simd"] in ("avx512f", "avx2", "avx", "sse4_2", "sse2", "asimd", "none")
    assert profiling.simd_level({"sse2", "avx", "avx2", "fma"}) == "avx2"
    assert profiling.simd_level({"sse2", "avx512f", "avx2"}) == "avx512f"


def test_outside_profiling_nothing_is_gathered():
    assert profiling.start() is None
    profiling.stop("scan", None, 10)  # a no-op
    with profiling.profiling() as outer:
        with profiling.profiling() as inner:
            profiling.stop("scan", profiling.start(), 5)
        profiling.stop("apply", profiling.start(), 7)
    assert inner.bytes == {"scan": 5} and outer.bytes == {"apply": 7}


def test_cpu_seconds_count_the_pool_threads_work_for_the_phase_that_waited_on_it():
    """A phase that spreads work over the chunk pool is charged its tasks' CPU time (they run on other threads),
    and only once: busy tasks of known CPU cost on 2 workers give the phase about their sum."""
    import time

    from merging.methods.chunking import map_threads

    def busy(_: int) -> None:
        end = time.thread_time() + 0.05
        while time.thread_time() < end:
            pass

    with profiling.profiling() as profile:
        started = profiling.start()
        map_threads(busy, 4, 2)
        profiling.stop("apply", started)
        started = profiling.start()
        profiling.stop("write", started)  # nothing charged to a later phase
    assert 0.2 <= profile.cpu_seconds["apply"] < 0.3
    assert profile.cpu_seconds["write"] < 0.01
    assert profile.to_json()["apply"]["cpu_seconds"] == round(profile.cpu_seconds["apply"], 4)
