"""Imports every data module so that its entries are registered."""

from taxonomy import alignment, ensemble, importance, interpolation, task_arithmetic  # noqa: F401
