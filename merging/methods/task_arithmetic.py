"""Task arithmetic family (filled in by the task-arithmetic issue)."""
