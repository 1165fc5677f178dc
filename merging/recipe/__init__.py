"""Stage 2, the recipe: mergekit's YAML schema parsed and validated (no checkpoint is opened here)."""
