"""The output folder's side files: config.json (patched, `merging.output.config`), generation_config.json,
the tokenizer (built by the tokenizer rule, else copied) and the recipe's chat template."""

from __future__ import annotations

import json
from pathlib import Path

from merging.architectures import config_source
from merging.io.checkpoint import Checkpoint
from merging.io.hf_files import CONFIG_FILES, TOKENIZER_FILES
from merging.io.writer import ShardWriter
from merging.plan.tensors import MergePlan
from merging.recipe.schema import Recipe


def _tokenizer_source_folder(recipe: Recipe, ckpts: dict[str, Checkpoint], plan: MergePlan) -> Path | None:
    """Where the output's tokenizer files come from: the tokenizer rule's, the tokenizer source's, the config
    source's."""
    if plan.vocab is not None:
        return plan.vocab.tokenizer_folder
    if recipe.tokenizer_ref in ckpts:
        return ckpts[recipe.tokenizer_ref].folder
    if recipe.tokenizer_ref:
        from merging.io.hub import resolve

        folder = resolve(recipe.tokenizer_ref, weights=False).path
        return folder if folder.is_dir() else folder.parent
    return ckpts[config_source(recipe)].folder


def copy_side_files(recipe: Recipe, ckpts: dict[str, Checkpoint], writer: ShardWriter, plan: MergePlan,
                     dtype: str | None) -> None:
    """config.json (`merging.output.config.output_config`: dtype, layer count and per-layer fields, vocab_size,
    tie_word_embeddings patched) and generation_config.json from the config source; the output tokenizer
    (built by the tokenizer rule, else copied from the tokenizer source or the config source), with the recipe's
    chat template. In-memory inputs have none."""
    from merging.output.config import output_config

    cfg_folder = ckpts[config_source(recipe)].folder
    if cfg_folder is not None:
        config = output_config(recipe, ckpts, plan, dtype)
        if config is not None:
            writer.write_text("config.json", json.dumps(config, indent=2) + "\n")
        for name in CONFIG_FILES:
            if name != "config.json" and (cfg_folder / name).is_file():
                writer.copy_file(cfg_folder / name)
    tok_folder = _tokenizer_source_folder(recipe, ckpts, plan)
    template = _chat_template(recipe, ckpts)
    if plan.vocab is not None and plan.vocab.tokenizer is not None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="basin-tokenizer-") as tmp:
            plan.vocab.tokenizer.save_pretrained(tmp)
            _write_tokenizer(writer, [p for p in sorted(Path(tmp).iterdir()) if p.is_file()], template)
    elif tok_folder is not None:
        _write_tokenizer(writer, [tok_folder / n for n in TOKENIZER_FILES if (tok_folder / n).is_file()], template)
    elif template is not None:
        _no_tokenizer_warning()


def _chat_template(recipe: Recipe, ckpts: dict[str, Checkpoint]) -> str | None:
    """The recipe's chat_template resolved ('auto': the merged models' most common one), or None."""
    from merging.output.chat_templates import resolve_chat_template

    return resolve_chat_template(recipe.chat_template, [ckpts[r].folder for r in recipe.model_refs()])


def _no_tokenizer_warning() -> None:
    import warnings

    from taxonomy.errors import BasinWarning

    warnings.warn("chat_template: the output has no tokenizer files, so the chat template is not written",
                  BasinWarning, stacklevel=3)


def _write_tokenizer(writer: ShardWriter, files: list[Path], template: str | None) -> None:
    """Copy the tokenizer files; with a chat template, set it in tokenizer_config.json (mergekit's place for it)
    and drop chat_template.jinja / .json, which transformers would read first."""
    from merging.output.chat_templates import DROPPED_FILES, with_chat_template

    if template is None:
        for path in files:
            writer.copy_file(path)
        return
    config = None
    for path in files:
        if path.name == "tokenizer_config.json":
            config = path.read_text(encoding="utf-8")
        elif path.name not in DROPPED_FILES:
            writer.copy_file(path)
    if config is None and not files:
        _no_tokenizer_warning()
        return
    writer.write_text("tokenizer_config.json", with_chat_template(config, template))
