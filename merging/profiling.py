"""Where a merge's time goes: seconds and bytes per phase, gathered only inside `profiling()`.

The phases (`PHASES`) are those of a task-arithmetic merge: the engine's reads (mapping the inputs; the page
faults that bring their bytes in land in the first phase that touches them) and writes, and per tensor the
threshold scan (bracket sample, scan, selection), DARE's mask draws and L1 sums, and the merge pass (`apply`: task
vectors, trim or mask, election, sum, base, in one pass where the kernel is built), and the per-task side outputs of
TALL masks and EMR (`side`: their pass over the inputs; `side_write`: their writer thread). Seconds are summed over the
threads a phase runs on (thread-seconds, which may exceed the wall time), CPU seconds likewise (those threads' own
user + system time: on a shared machine, what the phase cost without the waits for a core), bytes are those the
phase reads or writes. Outside `profiling()` a call costs one global lookup.

    with profiling() as profile:
        merge(...)
    profile.to_json()
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

PHASES = ("read", "sample", "scan", "select", "masks", "apply", "side", "write", "side_write")


@dataclass
class Profile:
    """Per phase: thread-seconds, CPU seconds, bytes moved, calls."""

    seconds: dict[str, float] = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, phase: str, seconds: float, nbytes: int, cpu_seconds: float = 0.0) -> None:
        with self._lock:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds
            self.cpu_seconds[phase] = self.cpu_seconds.get(phase, 0.0) + cpu_seconds
            self.bytes[phase] = self.bytes.get(phase, 0) + nbytes
            self.calls[phase] = self.calls.get(phase, 0) + 1

    def to_json(self) -> dict[str, dict[str, float | int]]:
        return {p: {"thread_seconds": round(self.seconds[p], 4), "cpu_seconds": round(self.cpu_seconds[p], 4),
                    "bytes": self.bytes[p], "calls": self.calls[p]}
                for p in sorted(self.seconds, key=lambda p: PHASES.index(p) if p in PHASES else len(PHASES))}


_active: Profile | None = None


@contextmanager
def profiling() -> Iterator[Profile]:
    """Gather the phases of everything run inside (all threads) into the yielded `Profile`."""
    global _active
    previous, _active = _active, Profile()
    try:
        yield _active
    finally:
        _active = previous


_charged = threading.local()  # per thread: CPU seconds its pool tasks spent on its behalf (`charge`)


def _charged_seconds() -> float:
    return getattr(_charged, "seconds", 0.0)


def start() -> tuple[float, float, float] | None:
    """A phase's start (wall time, this thread's CPU time and charged CPU time), or None outside `profiling()`."""
    return None if _active is None else (time.perf_counter(), time.thread_time(), _charged_seconds())


def stop(phase: str, started: tuple[float, float, float] | None, nbytes: int = 0) -> None:
    """Count the time since `started` (from `start()`, on this thread) and `nbytes` against `phase`; its CPU
    seconds are this thread's plus what `charge` added for the pool tasks it waited on."""
    profile = _active
    if started is not None and profile is not None:
        cpu = time.thread_time() - started[1] + _charged_seconds() - started[2]
        profile.add(phase, time.perf_counter() - started[0], nbytes, cpu)


def active() -> bool:
    """Whether a `profiling()` block is gathering."""
    return _active is not None


def charge(cpu_seconds: float) -> None:
    """Add CPU seconds spent by other threads on this thread's behalf (a pool's tasks) to its open phases."""
    _charged.seconds = _charged_seconds() + cpu_seconds


def process_counters() -> dict[str, float | int]:
    """This process so far: CPU seconds (user, system), page faults, and /proc/self/io's byte counters (Linux)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    out: dict[str, float | int] = {"user_seconds": usage.ru_utime, "system_seconds": usage.ru_stime,
                                   "minor_faults": usage.ru_minflt, "major_faults": usage.ru_majflt}
    try:
        with open("/proc/self/io") as f:
            for line in f:
                key, value = line.split(":")
                if key in ("rchar", "wchar", "read_bytes", "write_bytes"):
                    out[key] = int(value)
    except OSError:
        pass
    return out


def counters_since(before: dict[str, float | int]) -> dict[str, float | int]:
    """`process_counters()` now minus `before`."""
    now = process_counters()
    return {k: round(v - before[k], 4) if isinstance(v, float) else v - before[k] for k, v in now.items()
            if k in before}


def simd_level(flags: set[str]) -> str:
    """The widest x86 vector extension among /proc/cpuinfo's `flags` (what the kernel's clones can use)."""
    for level in ("avx512f", "avx2", "avx", "sse4_2", "sse2"):
        if level in flags:
            return level
    return "asimd" if "asimd" in flags else "none"


def machine() -> dict[str, object]:
    """The machine a figure came from: CPU model, cores (all and usable), SIMD level, OS, Python, numpy, torch, GPU."""
    import os
    import platform

    import numpy as np
    import torch

    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("", platform.processor() or platform.machine()):
                    model = value.strip()
                elif key.strip() in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu_model": model, "cpus": os.cpu_count(), "usable_cpus": usable, "simd": simd_level(flags),
            "platform": platform.platform(), "python": platform.python_version(), "numpy": np.__version__,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
