"""Architecture knowledge from tensor names and `config.json`: embeddings, tied `lm_head`, mixed architectures.

No per-architecture files: the vocabulary-indexed tensors are found by name (`embed_tokens`, `wte`,
`word_embeddings`, `embed_in`, `shared`, `lm_head`, `embed_out`, BERT's `predictions` head) and by their
first dimension equal to the model's vocabulary rows (config.json `vocab_size` when an embedding has
it, else the input embedding's row count).

Tied embeddings (rule): a model whose config.json says `tie_word_embeddings: true` and whose
checkpoint has no output embedding (`lm_head.weight`, `embed_out.weight`) while another input has
one, takes its input embedding matrix as its output embedding. The output therefore has an
`lm_head` unless every input lacks one, and its config.json then says `tie_word_embeddings: false`
(`merging.output.config.output_config` patches it). A model without such a config line is never guessed to be tied.

Mixed architectures: inputs whose config.json `architectures` or `model_type` differ are refused
unless the user allows it (`allow_mixed_architectures`).

Recomputed buffers (rule): a tensor transformers rebuilds itself and save_pretrained drops
(`architectures.RECOMPUTED_BUFFER`: `embeddings.position_ids`, `token_type_ids`, `inv_freq`, ...) that some
inputs hold and others lack is left out of the merge (`drop_recomputed`, noted in the plan): a base saved by an
older transformers and its fine-tunes saved with save_pretrained then merge, and the output loads as both do.
"""

from __future__ import annotations

from typing import Any

from merging.architectures import (
    INPUT_EMBED,
    OUTPUT_EMBED,
    RECOMPUTED_BUFFER,
    VOCAB_TENSOR,
    config_vocab_size,
    is_tied,
)
from merging.io.checkpoint import Checkpoint, TensorMeta, read_config
from taxonomy.errors import BasinError


def vocab_rows(ckpt: Checkpoint) -> int | None:
    """The model's number of vocabulary rows: config `vocab_size` if an embedding has it, else the
    first input (then output) embedding's row count; None if no embedding is found by name."""
    candidates = [n for n in ckpt.names() if INPUT_EMBED.search(n)] + [n for n in ckpt.names()
                                                                       if OUTPUT_EMBED.search(n)]
    shapes = [ckpt.meta(n).shape for n in candidates]
    shapes = [s for s in shapes if len(s) == 2]
    if not shapes:
        return None
    size = config_vocab_size(read_config(ckpt))
    if size is not None and any(s[0] == size for s in shapes):
        return size
    return shapes[0][0]


def vocab_tensors(ckpt: Checkpoint) -> list[str]:
    """Names of the tensors indexed by token (embedding and output rows), in checkpoint order."""
    rows = vocab_rows(ckpt)
    if rows is None:
        return []
    return [n for n in ckpt.names() if VOCAB_TENSOR.search(n) and ckpt.meta(n).shape[:1] == (rows,)]


class HiddenView(Checkpoint):
    """A checkpoint with some names left out (recomputed buffers that other inputs lack)."""

    def __init__(self, inner: Checkpoint, hidden: set[str]):
        self.inner, self.hidden = inner, set(hidden)
        self.label, self.folder = inner.label, inner.folder
        self.revision, self.repo_id = inner.revision, inner.repo_id

    def names(self) -> list[str]:
        return [n for n in self.inner.names() if n not in self.hidden]

    def meta(self, name: str) -> TensorMeta:
        if name in self.hidden:
            raise self._missing(name)
        return self.inner.meta(name)

    def get(self, name: str):
        if name in self.hidden:
            raise self._missing(name)
        return self.inner.get(name)


def drop_recomputed(ckpts: dict[str, Checkpoint]) -> tuple[dict[str, Checkpoint], list[str]]:
    """Hide the recomputed buffers (see the module docstring) that some inputs have and others lack; returns
    the views and one note per buffer left out."""
    names = {ref: set(c.names()) for ref, c in ckpts.items()}
    buffers = sorted({n for s in names.values() for n in s if RECOMPUTED_BUFFER.search(n)})
    uneven = [n for n in buffers if not all(n in s for s in names.values())]
    if not uneven:
        return dict(ckpts), []
    notes = [f"left out {n}: a buffer transformers recomputes (not saved by save_pretrained), absent from "
             f"{', '.join(ref for ref, s in names.items() if n not in s)}" for n in uneven]
    out = {ref: HiddenView(c, set(uneven) & names[ref]) if set(uneven) & names[ref] else c
           for ref, c in ckpts.items()}
    return out, notes


class TiedView(Checkpoint):
    """A checkpoint with extra names that read other tensors (a tied model's `lm_head` = its embedding)."""

    def __init__(self, inner: Checkpoint, aliases: dict[str, str]):
        self.inner = inner
        self.aliases = dict(aliases)
        self.label, self.folder = inner.label, inner.folder
        self.revision, self.repo_id = inner.revision, inner.repo_id
        self._names = inner.names() + [a for a in aliases if a not in set(inner.names())]

    def names(self) -> list[str]:
        return list(self._names)

    def real_name(self, name: str) -> str:
        return self.aliases.get(name, name)

    def meta(self, name: str) -> TensorMeta:
        return self.inner.meta(self.real_name(name))

    def get(self, name: str):
        return self.inner.get(self.real_name(name))


def tie_inputs(ckpts: dict[str, Checkpoint]) -> dict[str, Checkpoint]:
    """Apply the tied-embedding rule: inputs that lack an output embedding another input has, and whose
    config says `tie_word_embeddings: true`, get a `TiedView` aliasing it to their input embedding."""
    heads = list(dict.fromkeys(n for c in ckpts.values() for n in c.names() if OUTPUT_EMBED.search(n)))
    if not heads:
        return dict(ckpts)
    out: dict[str, Checkpoint] = {}
    for ref, ckpt in ckpts.items():
        names = set(ckpt.names())
        missing = [h for h in heads if h not in names]
        embeds = [n for n in ckpt.names() if INPUT_EMBED.search(n)]
        if missing and len(embeds) == 1 and is_tied(read_config(ckpt)):
            out[ref] = TiedView(ckpt, {h: embeds[0] for h in missing})
        else:
            out[ref] = ckpt
    return out


def real_name(ckpt: Checkpoint, name: str) -> str:
    """The stored tensor a (possibly aliased) name reads."""
    return ckpt.real_name(name) if isinstance(ckpt, TiedView) else name


def tie_hint(ckpt: Checkpoint, missing: list[str]) -> str:
    """A hint for an error about missing output embeddings."""
    if not any(OUTPUT_EMBED.search(n) for n in missing):
        return ""
    return (f" ({ckpt.label} has no output embedding and its config.json does not say tie_word_embeddings: true, "
            "so its input embedding is not used in its place)")


def check_architectures(ckpts: dict[str, Checkpoint], allow: bool) -> None:
    """Refuse inputs whose config.json `architectures` or `model_type` differ, unless `allow`."""
    seen: dict[tuple, list[str]] = {}
    for ref, ckpt in ckpts.items():
        config = read_config(ckpt)
        if config is None:
            continue
        arch = config.get("architectures")
        key = (tuple(arch) if isinstance(arch, list) else arch, config.get("model_type"))
        seen.setdefault(key, []).append(ref)
    if len(seen) > 1 and not allow:
        kinds = "; ".join(f"{', '.join(refs)}: {_arch_text(k[0])} ({k[1]})" for k, refs in seen.items())
        raise BasinError(f"the models mix architectures ({kinds}); merging them is refused. Pass "
                         "--allow-mixed-architectures (recipe: allow_mixed_architectures: true) to merge anyway")


def _arch_text(arch: Any) -> str:
    if isinstance(arch, tuple):
        return "/".join(map(str, arch)) or "?"
    return "?" if arch is None else str(arch)


def check_lora_inputs(method: str, refs: list[str], base_ref: str | None, ckpts: dict[str, Checkpoint]) -> None:
    """For a method that merges LoRA factors (KnOTS): every model besides the base is a `base+lora` reference
    whose base is the recipe's base_model (the same folder and revision)."""
    from pathlib import Path

    from merging.io.lora import LoraCheckpoint

    if base_ref is None:
        raise BasinError(f"merge_method {method!r} needs a base_model (the base the LoRA adapters were trained on)")
    base = ckpts[base_ref]

    def where(c: Checkpoint) -> tuple[str | None, str | None]:
        return (None if c.folder is None else str(Path(c.folder).resolve()), c.revision)

    for ref in refs:
        if ref == base_ref:
            continue
        ckpt = ckpts[ref]
        if not isinstance(ckpt, LoraCheckpoint):
            raise BasinError(f"model {ref!r} is not a base+lora reference: merge_method {method!r} merges LoRA "
                             f"adapters of the base_model ({base_ref}+ADAPTER_DIR)")
        if where(ckpt.base) != where(base):
            raise BasinError(f"model {ref!r}: its base {ckpt.base.label} is not the recipe's base_model {base_ref}; "
                             f"{method!r} merges adapters of one base")
