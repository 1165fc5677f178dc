"""basin.merging: checkpoints in and out, the streaming merge engine, recipes and merge methods.

The names below are imported on first use (PEP 562), so that `from merging.dtypes import ...` (the CLI's
argument parsers) does not import torch and the whole pipeline."""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "BasinError": "taxonomy.errors", "Checkpoint": "merging.io.checkpoint", "MergePlan": "merging.plan.tensors",
    "MergeReport": "merging.pipeline", "Recipe": "merging.recipe.schema", "ShardWriter": "merging.io.writer",
    "StateDictCheckpoint": "merging.io.checkpoint", "TensorMeta": "merging.io.checkpoint",
    "TensorPlan": "merging.plan.tensors", "build_plan": "merging.plan.tensors", "load_recipe": "merging.pipeline",
    "merge": "merging.pipeline", "merge_state_dicts": "merging.modelwise.state_dicts",
    "open_checkpoint": "merging.io.checkpoint",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'merging' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
