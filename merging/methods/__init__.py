"""Tensorwise merge methods, one module per family; `merging.methods.catalog` lists them by name."""
