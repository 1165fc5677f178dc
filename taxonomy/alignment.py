"""Taxonomy entries: alignment (filled in by the issue that implements these methods)."""
