"""basin.merging: checkpoints in and out, the streaming merge engine, recipes and merge methods."""

from merging.io.checkpoint import Checkpoint, StateDictCheckpoint, TensorMeta, open_checkpoint
from merging.io.writer import ShardWriter
from merging.modelwise.state_dicts import merge_state_dicts
from merging.pipeline import MergeReport, load_recipe, merge
from merging.plan.tensors import MergePlan, TensorPlan, build_plan
from merging.recipe.schema import Recipe
from taxonomy.errors import BasinError

__all__ = [
    "BasinError", "Checkpoint", "MergePlan", "MergeReport", "Recipe", "ShardWriter", "StateDictCheckpoint",
    "TensorMeta", "TensorPlan", "build_plan", "load_recipe", "merge", "merge_state_dicts", "open_checkpoint",
]
