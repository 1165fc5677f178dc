"""Merge methods, one module per family. Importing this package registers them all."""

from merging.methods.registry import MergeFn, RegisteredMethod, get_method, merge_method, registered_names


def load_all() -> None:
    """Import every method module (registration happens on import)."""
    from merging.methods import interpolation, ram, task_arithmetic  # noqa: F401


__all__ = ["MergeFn", "RegisteredMethod", "get_method", "load_all", "merge_method", "registered_names"]
