"""The last stage of a merge: side files, the check that transformers loads what was written, the model card
(which records the content hash) and the rename of the finished folder into place (`ShardWriter.close`)."""

from __future__ import annotations

from merging.io.checkpoint import Checkpoint
from merging.io.writer import ShardWriter
from merging.output.config import check_written, reference_of
from merging.output.model_card import InputRecord, model_card
from merging.output.side_files import copy_side_files
from merging.plan.tensors import MergePlan
from merging.recipe.schema import Recipe
from taxonomy.version import versions


def finish_output(writer: ShardWriter, recipe: Recipe, ckpts: dict[str, Checkpoint], plan: MergePlan,
                  inputs: list[InputRecord], out_dtype: str | None) -> str:
    """Config and tokenizer files, model card, index; check that transformers loads the written config and
    tensors (`merging.output.config`); rename into place. Returns the content hash."""
    copy_side_files(recipe, ckpts, writer, plan, out_dtype)
    check_written(writer.tmp, {tp.name: tp.shape for tp in plan.tensors}, reference_of(recipe, ckpts))
    digest = writer.content_hash()
    writer.write_text("README.md", model_card(recipe, inputs, digest, versions(), card_title(recipe)))
    writer.close()
    return digest


def card_title(recipe: Recipe) -> str:
    """The model card's title: the recipe's `name`, else the method (never the output path: reruns into
    another folder write the same card)."""
    return recipe.name or f"{recipe.merge_method} merge"
