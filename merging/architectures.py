"""Per-architecture data: which tensors sit before the layers and which after them, and the per-layer
config fields that follow a frankenmerge's slices.

Roles (learnt from mergekit's architecture definitions, written here as basin's own table): a tensor
outside the layers is `pre` (embeddings: taken from the first output slice's sources) or `post` (final
norm, output head, pooler: from the last slice's). A family is found by config.json `model_type`; a
checkpoint without one, or of a family not in the table, falls back to names: an output head
(`lm_head`, `embed_out`) is post, an embedding (`embed*`, `wte`, `wpe`, T5's `shared`) pre, the rest post.

Per-layer config fields (transformers' configs): lists with one entry per layer (`layer_types`, ...)
are rebuilt so that output layer i takes the entry of the source layer it came from; lists of layer
indices (`mlp_only_layers`, Llama 4's `moe_layers`) keep the output layers whose source layer was listed;
layer counts (`num_hidden_layers`, `n_layer`, T5's `num_layers` and `num_decoder_layers`) become the
output's. A list a config.json leaves to transformers' index rule (older Qwen2/Qwen3 `max_window_layers`,
Gemma2's alternation, `no_rope_layer_interval`, `interleave_moe_layer_step`, Qwen-MoE's
`decoder_sparse_step`) is written out explicitly when that rule would give an output layer another value
than its source layer had.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

# Tensor names: the vocabulary-indexed tensors (embeddings, output heads, BERT's MLM head) and the layer index.
INPUT_EMBED = re.compile(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|embed_in|shared)\.weight$")
OUTPUT_EMBED = re.compile(r"(?:^|\.)(?:lm_head|embed_out)\.weight$")
VOCAB_TENSOR = re.compile(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|embed_in|shared|lm_head|embed_out)"
                          r"\.weight$|(?:^|\.)(?:lm_head|embed_out)\.bias$"
                          r"|(?:^|\.)predictions\.(?:bias|decoder\.weight|decoder\.bias)$")  # BERT's MLM head
# Buffers transformers recomputes when it builds a model and never saves with save_pretrained: its
# non-persistent buffers (`nn.Buffer(..., persistent=False)`: BERT's `embeddings.position_ids` and
# `token_type_ids`, rotary `inv_freq` / `original_inv_freq`) and the `_keys_to_ignore_on_load_unexpected` of
# older checkpoints (GPT-2's `attn.bias` / `attn.masked_bias` causal masks, `relative_position_index`). Older
# files (e.g. sentence-transformers' all-MiniLM-L6-v2) still hold some, so a fine-tune saved with save_pretrained
# lacks tensors its base has.
RECOMPUTED_BUFFER = re.compile(r"(?:^|\.)(?:position_ids|token_type_ids|inv_freq|original_inv_freq|masked_bias"
                               r"|relative_position_index)$|(?:^|\.)attn\.bias$")
LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?=\.|$)")


# transformers' Conv1D modules (weight stored in x out), by family (config.json model_type). PEFT decides
# fan_in_fan_out per wrapped module from its type (True for a Conv1D, False for an nn.Linear), whatever
# adapter_config.json says; tests/merging/test_lora_fan_in_fan_out.py checks this table against transformers.
_GPT2_CONV1D = r"(?:^|\.)h\.\d+\.(?:(?:attn|crossattention)\.(?:c_attn|c_proj|q_attn)|mlp\.(?:c_fc|c_proj))$"
CONV1D_MODULES = {**{t: re.compile(_GPT2_CONV1D) for t in ("gpt2", "openai-gpt", "imagegpt", "decision_transformer")},
                  "clvp": re.compile(r"(?:^|\.)decoder\.layers\.\d+\.mlp\.(?:c_fc|c_proj)$")}


def is_conv1d(module: str, config: dict[str, Any] | None) -> bool | None:
    """Whether `module` of a checkpoint with this config.json is a transformers Conv1D (None: no model_type)."""
    model_type = (config or {}).get("model_type")
    if not isinstance(model_type, str):
        return None
    pattern = CONV1D_MODULES.get(model_type)
    return bool(pattern and pattern.search(module))


def layer_index(name: str) -> int | None:
    m = LAYER.search(name)
    return int(m.group(1)) if m else None


def with_layer(name: str, index: int) -> str:
    m = LAYER.search(name)
    assert m is not None
    return name[: m.start(1)] + str(index) + name[m.end(1):]


def config_vocab_size(config: dict[str, Any] | None) -> int | None:
    if not config:
        return None
    for c in (config, config.get("text_config") or {}):
        if isinstance(c.get("vocab_size"), int):
            return c["vocab_size"]
    return None


def is_tied(config: dict[str, Any] | None) -> bool:
    """Whether config.json says the output embedding is the input embedding (explicit `true` only)."""
    if not config:
        return False
    return config.get("tie_word_embeddings") is True or (config.get("text_config") or {}).get(
        "tie_word_embeddings") is True


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
LAYER_INDEX_LISTS = ("mlp_only_layers", "moe_layers")
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

    `origins[i]` is (source layer, that source's config.json) of output layer i. A per-layer list a source's
    config.json lacks is the one transformers derives from it (older Qwen2/Qwen3 configs: sliding attention from
    `max_window_layers`; Gemma2's alternation; SmolLM3's `no_rope_layer_interval`), else the config source's at
    the same layer. The output gets an explicit list wherever the rule transformers would apply to it gives a
    different entry than its source layer had; likewise for MoE sparse layers (`_patch_sparse`)."""
    target = layer_config(config)
    sparse = [_is_sparse(layer_config(src or config), layer) for layer, src in origins]
    per_layer = {key: _per_layer(key, config, origins) for key in PER_LAYER_LISTS}
    per_index = {key: _per_index(key, config, origins) for key in LAYER_INDEX_LISTS}
    n_in = next((target[k] for k in LAYER_COUNTS if isinstance(target.get(k), int)), None)
    for key in LAYER_COUNTS:
        if isinstance(target.get(key), int) and target[key] == n_in:
            target[key] = len(origins)
    for key, values in per_layer.items():
        if values is not None and (isinstance(target.get(key), list) or values != derived_list(config, key)):
            target[key] = values
    for key, values in per_index.items():
        if values is not None and (isinstance(target.get(key), list) or values != derived_list(config, key)):
            target[key] = values
    _patch_sparse(target, sparse)


def _per_layer(key: str, config: dict[str, Any], origins: list[tuple[int, dict[str, Any] | None]]) -> list | None:
    """Output layer i's entry of `key`: its source layer's (explicit or derived), None where no source has one."""
    fallback = source_list(config, key)
    if fallback is None and not any(src and source_list(src, key) for _, src in origins):
        return None
    out = []
    for layer, src in origins:
        own = source_list(src, key) if src else None
        values = own if own is not None and layer < len(own) else fallback
        if values is None or layer >= len(values):
            raise _short(key, values or [], layer)
        out.append(values[layer])
    return out


def source_list(config: dict[str, Any], key: str) -> list | None:
    """A config.json's per-layer list `key`: as written, else as transformers derives it."""
    own = layer_config(config).get(key)
    return own if isinstance(own, list) else derived_list(config, key)


def derived_list(config: dict[str, Any], key: str) -> list | None:
    """The list `key` transformers' config class derives for `config` when the list is not given (None where it
    derives none): the installed transformers' own rule, else basin's copy of Qwen's (`_qwen_layer_types`)."""
    text = json.dumps({k: v for k, v in config.items() if k != "auto_map"}, sort_keys=True)
    derived = _derived_cached(text, key)
    return None if derived is None else list(derived)


@functools.lru_cache(maxsize=256)
def _derived_cached(config_text: str, key: str) -> tuple | None:
    config = json.loads(config_text)
    layer_config(config).pop(key, None)
    try:
        values = _transformers_list(config, key)
    except ImportError:
        values = _qwen_layer_types(config) if key == "layer_types" else None
    return tuple(values) if isinstance(values, (list, tuple)) else None


def _transformers_list(config: dict[str, Any], key: str) -> Any:
    """`key` of the config transformers builds from `config` (its own classes only; None if it cannot)."""
    import transformers
    from transformers import CONFIG_MAPPING

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        built = CONFIG_MAPPING[config.get("model_type")].from_dict(config)
        return getattr(built.get_text_config(), key, None)
    except Exception:  # noqa: BLE001  (an unknown model_type or a config the class refuses: nothing derived)
        return None
    finally:
        transformers.logging.set_verbosity(level)


def _qwen_layer_types(config: dict[str, Any]) -> list[str] | None:
    """Qwen2/Qwen3 (sliding from layer `max_window_layers` on) and Qwen2-MoE (sliding on even layers below it)
    attention types, as transformers' Qwen2Config / Qwen3Config / Qwen2MoeConfig derive them (defaults theirs)."""
    kind, cfg = config.get("model_type"), layer_config(config)
    n = next((cfg[k] for k in LAYER_COUNTS if isinstance(cfg.get(k), int)), None)
    if kind not in ("qwen2", "qwen3", "qwen2_moe") or n is None:
        return None
    on = bool(cfg.get("use_sliding_window", False)) and (kind == "qwen2_moe" or cfg.get("sliding_window", 4096)
                                                           is not None)
    limit = cfg.get("max_window_layers", 28)
    if kind == "qwen2_moe":
        return ["sliding_attention" if on and (i + 1) % 2 and i < limit else "full_attention" for i in range(n)]
    return ["sliding_attention" if on and i >= limit else "full_attention" for i in range(n)]


def _is_sparse(config: dict[str, Any], layer: int) -> bool | None:
    """Whether layer `layer` is a mixture of experts under the Qwen-MoE rule (Qwen2-MoE, Qwen3-MoE, Qwen3-Next,
    ...: not in `mlp_only_layers`, experts, (layer + 1) % decoder_sparse_step == 0); None where no such rule."""
    step = config.get("decoder_sparse_step")
    if not isinstance(step, int) or isinstance(step, bool) or "num_hidden_layers" not in config:
        return None
    experts = config.get("num_experts")
    only = config.get("mlp_only_layers") or []
    return layer not in only and (not isinstance(experts, int) or experts > 0) and step > 0 and (layer + 1) % step == 0


def _patch_sparse(target: dict[str, Any], sparse: list[bool | None]) -> None:
    """Where the output's decoder_sparse_step and mlp_only_layers would make a layer sparse or dense unlike its
    source layer, state the pattern explicitly: decoder_sparse_step 1, mlp_only_layers = the dense layers."""
    if None in sparse or _is_sparse(target, 0) is None:
        return
    if [_is_sparse(target, i) for i in range(len(sparse))] == sparse:
        return
    if any(sparse) and isinstance(target.get("num_experts"), int) and target["num_experts"] <= 0:
        from taxonomy.errors import BasinError

        raise BasinError("config.json: num_experts is 0 in the config source, but the merge takes sparse layers")
    target["decoder_sparse_step"] = 1
    target["mlp_only_layers"] = [i for i, s in enumerate(sparse) if not s]


def _per_index(key: str, config: dict[str, Any], origins: list[tuple[int, dict[str, Any] | None]]) -> list | None:
    """The output layers whose source layer is in its source's list `key` (explicit or derived), None where no
    source has such a list."""
    fallback = source_list(config, key)
    lists = [source_list(src, key) if src else None for _, src in origins]
    if fallback is None and all(v is None for v in lists):
        return None
    pairs = zip(origins, lists, strict=True)
    return [i for i, ((layer, _), own) in enumerate(pairs) if layer in (own or fallback or [])]


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
