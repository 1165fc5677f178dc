"""Taxonomy entries: task_arithmetic (filled in by the issue that implements these methods)."""
