"""Taxonomy entries: importance (filled in by the issue that implements these methods)."""
