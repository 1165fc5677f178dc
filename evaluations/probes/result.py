"""The base type of the probes' results (`Eigen`, `Estimate`, `Density`, `DiagonalEstimate`, `Sharpness`,
`NTKResult`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from evaluations.results import as_float64, fields_json, jsonable

__all__ = ["ProbeResult", "jsonable"]


@dataclass
class ProbeResult:
    """A probe's result: `converged` (whether its stopping criterion was met, as each subclass documents),
    `iterations` (operator applications, or ascent steps for sharpness) and `to_json()`.

    Each subclass declares `converged` and `iterations` (a field or a property) where its own field order
    puts them, and names its array fields in `ARRAYS`: they are stored as numpy float64 (`as_float64`, the
    convention of `evaluations.results`), whatever the algorithm built them as; None stays None.
    `to_json()` defaults to the fields, arrays as lists."""

    ARRAYS: ClassVar[tuple[str, ...]] = ()
    if TYPE_CHECKING:  # declared by each subclass (a base field would come first in every constructor)
        converged: bool | None
        iterations: int

    def __post_init__(self) -> None:
        for name in self.ARRAYS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, as_float64(value))

    def to_json(self) -> dict:
        return fields_json(self)
