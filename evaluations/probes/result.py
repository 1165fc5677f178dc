"""The base type of the iterative probes' results (`Eigen`, `Estimate`, `Density`, `Sharpness`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from evaluations.results import fields_json, jsonable

__all__ = ["ProbeResult", "jsonable"]


@dataclass
class ProbeResult:
    """An iterative probe's result: `converged` (whether its stopping criterion was met, as each subclass
    documents), `iterations` (operator applications, or ascent steps for sharpness) and `to_json()`.

    Each subclass declares `converged` and `iterations` (a field or a property) where its own field order
    puts them; `to_json()` defaults to the fields, tensors as lists."""

    if TYPE_CHECKING:  # declared by each subclass (a base field would come first in every constructor)
        converged: bool | None
        iterations: int

    def to_json(self) -> dict:
        return fields_json(self)
