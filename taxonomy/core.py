"""The SoK taxonomy of model-merging methods, as plain data (no torch).

Families follow the SoK on model merging through loss-landscape geometry: interpolation
(weight averaging, spherical and importance-weighted averages), permutation alignment (neuron
alignment before averaging), task arithmetic (task vectors and their sparsified, sign-elected
and subspace variants), and output ensembling, the reference that merges are compared with.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from taxonomy.errors import BasinError, suggest


class Family(str, Enum):
    INTERPOLATION = "interpolation"
    PERMUTATION_ALIGNMENT = "permutation_alignment"
    TASK_ARITHMETIC = "task_arithmetic"
    ENSEMBLE = "ensemble"


class Kind(str, Enum):
    """How the method runs: per tensor in the streaming engine, or over whole models and data."""

    TENSORWISE = "tensorwise"  # a pure function over one tensor name's inputs; streams
    MODELWISE = "modelwise"  # needs whole models and/or data (alignment, Fisher, RegMean, soups)
    REFERENCE = "reference"  # not a merge: a baseline the benchmarks report (output ensemble)


@dataclass(frozen=True)
class Param:
    """One method parameter. `per_model` parameters are given per input model."""

    name: str
    default: Any
    help: str
    per_model: bool = False
    low: float | None = None  # inclusive bounds; None = unbounded
    high: float | None = None
    low_open: bool = False  # True makes `low` exclusive (e.g. density in (0, 1])
    choices: tuple[Any, ...] | None = None

    def check(self, value: Any, where: str) -> None:
        """Raise BasinError naming `where` if `value` is not finite or out of range for this parameter."""
        if value is None and self.default is None:
            raise BasinError(f"{where}: parameter {self.name!r} is required (it has no default): {self.help}")
        if self.choices is not None and value not in self.choices:
            raise BasinError(f"{where}: parameter {self.name!r} must be one of {list(self.choices)}, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if self.low is not None or self.high is not None:
                if isinstance(self.default, bool) and isinstance(value, bool):
                    return
                raise BasinError(f"{where}: parameter {self.name!r} must be a number, got {value!r}")
            return
        if not math.isfinite(value):  # NaN passes every < / > comparison: test it first
            raise BasinError(f"{where}: parameter {self.name!r} must be a finite number, got {value!r}")
        self._check_range(value, where)

    def _check_range(self, value: float, where: str) -> None:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            bracket = "(" if self.low_open else "["
            raise BasinError(
                f"{where}: parameter {self.name!r} = {value} is outside {bracket}{self.low}, {self.high}]"
            )
        if self.high is not None and value > self.high:
            raise BasinError(f"{where}: parameter {self.name!r} = {value} is above its maximum {self.high}")


@dataclass(frozen=True)
class MethodInfo:
    """A method's taxonomy entry: what it is, where it comes from, what it needs."""

    name: str
    family: Family
    category: str  # the SoK sub-category, e.g. "weight averaging", "sign election"
    paper: str  # "Authors Year, Title"
    year: int
    kind: Kind = Kind.TENSORWISE
    needs_base: bool = False
    needs_data: bool = False  # labeled or unlabeled examples beyond the weights (training sample, calibration)
    needs_test_inputs: bool = False  # unlabeled inputs of the test distribution (test-time adaptation)
    needs_task_identity: bool = False  # which task an input belongs to, at inference
    needs_lora: bool = False  # every model is a `base+lora` reference of the base: the method reads LoRA factors
    needs_shared_init: bool = True
    min_models: int = 1
    max_models: int | None = None
    params: tuple[Param, ...] = ()
    in_mergekit: bool = False
    summary: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        known = [p.name for p in self.params]
        raise BasinError(f"method {self.name!r} has no parameter {name!r}{suggest(name, known)} "
                         f"(known: {', '.join(known) or 'none'})")

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def model_count_problem(self, n: int) -> str | None:
        """Why `n` inputs (besides a needed base) do not suit this method, or None when they do."""
        if n < self.min_models:
            return f"{self.name!r} needs at least {self.min_models} models, got {n}"
        if self.max_models is not None and n > self.max_models:
            return f"{self.name!r} takes at most {self.max_models} models, got {n}"
        return None

    def resolve(self, params: dict[str, Any] | None, n_models: int) -> dict[str, Any]:
        """Defaults filled, names and ranges checked, per-model scalars broadcast to lists of `n_models`."""
        out = self.defaults()
        for key, value in (params or {}).items():
            self.param(key)  # raises BasinError for unknown parameter names
            out[key] = value
        for p in self.params:
            if p.per_model:
                out[p.name] = self._per_model(p, out[p.name], n_models)
            else:
                p.check(out[p.name], self.name)
        return out

    def _per_model(self, p: Param, value: Any, n_models: int) -> list[Any]:
        if not isinstance(value, (list, tuple)):
            value = [value] * n_models
        if len(value) != n_models:
            raise BasinError(f"{self.name}: parameter {p.name!r} has {len(value)} values for {n_models} models")
        for i, v in enumerate(value):
            p.check(v, f"{self.name}: model {i}")
        return list(value)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["family"] = self.family.value
        d["kind"] = self.kind.value
        return d
