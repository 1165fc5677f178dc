"""Per-architecture data: which tensors sit before the layers and which after them, and the per-layer
config fields that follow a frankenmerge's slices.

Roles (learnt from mergekit's architecture definitions, written here as basin's own table): a tensor
outside the layers is `pre` (embeddings: taken from the first output slice's sources) or `post` (final
norm, output head, pooler: from the last slice's). A family is found by config.json `model_type`; a
checkpoint without one, or of a family not in the table, falls back to names: an output head
(`lm_head`, `embed_out`) is post, an embedding (`embed*`, `wte`, `wpe`, T5's `shared`) pre, the rest post.

Per-layer config fields (transformers' configs): lists with one entry per layer (`layer_types`, ...)
are rebuilt so that output layer i takes the entry of the source layer it came from; lists of layer
indices (`mlp_only_layers`) keep the output layers whose source layer was listed; layer counts
(`num_hidden_layers`, `n_layer`, T5's `num_layers` and `num_decoder_layers`) become the output's.
"""

from __future__ import annotations

import re
from typing import Any

_DECODER = {"pre": [r"model\.embed_tokens\.weight"], "post": [r"model\.norm\.(weight|bias)", r"lm_head\.(weight|bias)"]}
_BERT = {"pre": [r"(bert\.)?embeddings\..*"], "post": [r"(bert\.)?pooler\..*", r"cls\..*", r"classifier\..*"]}

# family (config.json model_type) -> regexes (full match) of its pre- and post-layer tensors
FAMILIES: dict[str, dict[str, list[str]]] = {
    **{m: _DECODER for m in ("llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "gemma", "gemma2",
                             "phi3", "mixtral", "olmo2", "granite", "starcoder2", "cohere", "exaone")},
    "gpt2": {"pre": [r"(transformer\.)?(wte|wpe)\.weight"], "post": [r"(transformer\.)?ln_f\..*", r"lm_head\..*"]},
    "gpt_neox": {"pre": [r"gpt_neox\.embed_in\.weight"],
                 "post": [r"gpt_neox\.final_layer_norm\..*", r"(embed_out|lm_head)\.weight"]},
    "bert": _BERT,
    "roberta": {"pre": [r"(roberta\.)?embeddings\..*"], "post": [r"(roberta\.)?pooler\..*", r"lm_head\..*",
                                                                   r"classifier\..*"]},
    "t5": {"pre": [r"shared\.weight", r"(encoder|decoder)\.embed_tokens\.weight"],
           "post": [r"(encoder|decoder)\.final_layer_norm\.weight", r"lm_head\.weight"]},
}

_OUTPUT_HEAD = re.compile(r"(?:^|\.)(?:lm_head|embed_out)\.(?:weight|bias)$")
_EMBEDDING = re.compile(r"embed|(?:^|\.)(?:wte|wpe)(?:\.|$)|^shared\.weight$")

PER_LAYER_LISTS = ("layer_types", "mlp_layer_types", "no_rope_layers", "layers_block_type")
LAYER_INDEX_LISTS = ("mlp_only_layers",)
LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers", "num_decoder_layers")


def family(config: dict[str, Any] | None) -> str | None:
    """The table's family for a config.json (its `model_type`), None when absent or not in the table."""
    model_type = (config or {}).get("model_type")
    return model_type if model_type in FAMILIES else None


def is_post(name: str, config: dict[str, Any] | None) -> bool:
    """Whether a tensor outside the layers comes after them (final norm, output head, pooler)."""
    fam = family(config)
    if fam is not None:
        roles = FAMILIES[fam]
        if any(re.fullmatch(p, name) for p in roles["post"]):
            return True
        if any(re.fullmatch(p, name) for p in roles["pre"]):
            return False
    return bool(_OUTPUT_HEAD.search(name)) or not _EMBEDDING.search(name)


def layer_config(config: dict[str, Any]) -> dict[str, Any]:
    """The (sub-)config that holds the layer count: the config itself, or its `text_config`."""
    sub = config.get("text_config")
    if isinstance(sub, dict) and not any(k in config for k in LAYER_COUNTS):
        return sub
    return config


def patch_layers(config: dict[str, Any], origins: list[tuple[int, dict[str, Any] | None]]) -> None:
    """Make `config`'s per-layer fields follow the output layers, in place.

    `origins[i]` is (source layer, that source's config.json) of output layer i; a list missing from
    that source's config is read from `config` (the config source's) at the same layer."""
    target = layer_config(config)
    n_in = next((target[k] for k in LAYER_COUNTS if isinstance(target.get(k), int)), None)
    for key in LAYER_COUNTS:
        if isinstance(target.get(key), int) and target[key] == n_in:
            target[key] = len(origins)
    for key in PER_LAYER_LISTS:
        if isinstance(target.get(key), list):
            target[key] = [_entry(key, target[key], layer, src) for layer, src in origins]
    for key in LAYER_INDEX_LISTS:
        if isinstance(target.get(key), list):
            target[key] = [i for i, (layer, src) in enumerate(origins) if layer in _index_list(key, target, src)]


def _entry(key: str, default: list[Any], layer: int, source: dict[str, Any] | None) -> Any:
    own = layer_config(source).get(key) if source else None
    values = own if isinstance(own, list) and layer < len(own) else default
    if layer >= len(values):
        raise _short(key, values, layer)
    return values[layer]


def _index_list(key: str, default: dict[str, Any], source: dict[str, Any] | None) -> list[Any]:
    own = layer_config(source).get(key) if source else None
    return own if isinstance(own, list) else default[key]


def _short(key: str, values: list[Any], layer: int):
    from taxonomy.errors import BasinError

    return BasinError(f"config.json: {key} has {len(values)} entries, but the merge takes layer {layer}")


def config_source(recipe) -> str:
    """The model whose config.json the output takes: the base model, else the first model named."""
    if recipe.base_model:
        return recipe.base_model
    if recipe.slices is not None:
        return recipe.slices[0].sources[0].model
    return recipe.models[0].model
