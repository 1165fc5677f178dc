"""basin.merging: checkpoints in and out, the streaming merge engine, recipes and merge methods."""

from merging.api import MergeReport, load_recipe, merge
from merging.checkpoint import Checkpoint, StateDictCheckpoint, TensorMeta, open_checkpoint
from merging.plan import MergePlan, TensorPlan, build_plan
from merging.recipe import Recipe
from merging.tensor_merge import merge_state_dicts
from merging.writer import ShardWriter
from taxonomy.errors import BasinError

__all__ = [
    "BasinError", "Checkpoint", "MergePlan", "MergeReport", "Recipe", "ShardWriter", "StateDictCheckpoint",
    "TensorMeta", "TensorPlan", "build_plan", "load_recipe", "merge", "merge_state_dicts", "open_checkpoint",
]
