"""Benchmarking merge methods (FusionBench-like): pools, method grids, a cached harness, executors, suites."""

from evaluations.bench.executors import Local, Ray
from evaluations.bench.grid import MethodEntry, MethodGrid
from evaluations.bench.harness import BenchmarkResult, Row, Suite, run_benchmark
from evaluations.bench.pools import ModelPool, Task, TaskPool
from evaluations.bench.suites import load_suite

__all__ = ["BenchmarkResult", "Local", "MethodEntry", "MethodGrid", "ModelPool", "Ray", "Row", "Suite", "Task",
           "TaskPool", "load_suite", "run_benchmark"]
