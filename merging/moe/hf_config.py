"""The MoE output's config.json without importing transformers (its import is most of a `basin moe` process).

transformers reads a config.json into its config class (dataclass fields with defaults, `__post_init__` filling
the derived ones, RoPE parameters standardised, unknown keys kept as attributes) and writes `to_dict()`;
`merging.moe.arch.moe_config` does that twice (the dense base's class, then the MoE class). This module does the
same steps on plain dicts for the classes basin reads and writes, with the defaults of transformers 5's
`LlamaConfig`, `MistralConfig`, `Qwen2Config`, `Qwen3Config`, `MixtralConfig`, `Qwen2MoeConfig` and
`Qwen3MoeConfig` (tests hold these tables, and every config written, against transformers' own). Anything
outside what it reproduces (a RoPE type other than default/linear/dynamic/llama3, a key it does not know, a
value of an unexpected type) returns None, and the caller asks transformers instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# the fields of transformers' `PreTrainedConfig`, in order, with their defaults
BASE_FIELDS: tuple[tuple[str, Any], ...] = (
    ("transformers_version", None), ("architectures", None), ("output_hidden_states", False),
    ("return_dict", True), ("dtype", None), ("chunk_size_feed_forward", 0), ("is_encoder_decoder", False),
    ("id2label", None), ("label2id", None), ("problem_type", None))
# what a config.json may hold besides the fields, that is read here as transformers reads it
ACCEPTED = frozenset({"model_type", "torch_dtype", "rope_theta", "rope_scaling", "_name_or_path"})
FREE = frozenset({"rope_parameters", "architectures", "dtype", "transformers_version"})  # checked elsewhere
DTYPES = frozenset({"float32", "float16", "bfloat16", "float64"})


def _head_dim(c: dict) -> None:
    if c["head_dim"] is None:
        c["head_dim"] = c["hidden_size"] // c["num_attention_heads"]


def _kv_heads(c: dict) -> None:
    if c["num_key_value_heads"] is None:
        c["num_key_value_heads"] = c["num_attention_heads"]


def _llama(c: dict) -> None:
    _head_dim(c)
    _kv_heads(c)


def _qwen_dense(c: dict) -> None:
    c["sliding_window"] = c["sliding_window"] if c["use_sliding_window"] else None
    _kv_heads(c)
    if c["layer_types"] is None:
        c["layer_types"] = ["sliding_attention" if c["sliding_window"] is not None and i >= c["max_window_layers"]
                            else "full_attention" for i in range(c["num_hidden_layers"])]


def _qwen2_moe(c: dict) -> None:
    c["mlp_only_layers"] = [] if c["mlp_only_layers"] is None else c["mlp_only_layers"]
    c["sliding_window"] = c["sliding_window"] if c["use_sliding_window"] else 0
    if c["layer_types"] is None:
        c["layer_types"] = ["sliding_attention" if (i + 1) % 2 and i < c["max_window_layers"]
                            and c["use_sliding_window"] else "full_attention" for i in range(c["num_hidden_layers"])]


def _qwen3_moe(c: dict) -> None:
    c["sliding_window"] = c["sliding_window"] if c["use_sliding_window"] else None
    c["mlp_only_layers"] = [] if c["mlp_only_layers"] is None else c["mlp_only_layers"]


@dataclass(frozen=True)
class ConfigClass:
    name: str
    model_type: str
    fields: tuple[tuple[str, Any], ...]  # after BASE_FIELDS, in declaration order
    post_init: Callable[[dict], None]
    default_theta: float = 10000.0
    attribute_map: tuple[tuple[str, str], ...] = ()

    def key(self, name: str) -> str:
        return dict(self.attribute_map).get(name, name)


_EXPERTS = (("num_experts", "num_local_experts"),)
CLASSES = {c.model_type: c for c in (
    ConfigClass("LlamaConfig", "llama", (
        ("vocab_size", 32000), ("hidden_size", 4096), ("intermediate_size", 11008), ("num_hidden_layers", 32),
        ("num_attention_heads", 32), ("num_key_value_heads", None), ("hidden_act", "silu"),
        ("max_position_embeddings", 2048), ("initializer_range", 0.02), ("rms_norm_eps", 1e-06), ("use_cache", True),
        ("pad_token_id", None), ("bos_token_id", 1), ("eos_token_id", 2), ("pretraining_tp", 1),
        ("tie_word_embeddings", False), ("rope_parameters", None), ("attention_bias", False),
        ("attention_dropout", 0.0), ("mlp_bias", False), ("head_dim", None)), _llama),
    ConfigClass("MistralConfig", "mistral", (
        ("vocab_size", 32000), ("hidden_size", 4096), ("intermediate_size", 14336), ("num_hidden_layers", 32),
        ("num_attention_heads", 32), ("num_key_value_heads", 8), ("head_dim", None), ("hidden_act", "silu"),
        ("max_position_embeddings", 131072), ("initializer_range", 0.02), ("rms_norm_eps", 1e-06), ("use_cache", True),
        ("pad_token_id", None), ("bos_token_id", 1), ("eos_token_id", 2), ("tie_word_embeddings", False),
        ("rope_parameters", None), ("sliding_window", 4096), ("attention_dropout", 0.0)), _llama),
    ConfigClass("Qwen2Config", "qwen2", (
        ("vocab_size", 151936), ("hidden_size", 4096), ("intermediate_size", 22016), ("num_hidden_layers", 32),
        ("num_attention_heads", 32), ("num_key_value_heads", 32), ("hidden_act", "silu"),
        ("max_position_embeddings", 32768), ("initializer_range", 0.02), ("rms_norm_eps", 1e-06), ("use_cache", True),
        ("tie_word_embeddings", False), ("rope_parameters", None), ("use_sliding_window", False),
        ("sliding_window", 4096), ("max_window_layers", 28), ("layer_types", None), ("attention_dropout", 0.0),
        ("pad_token_id", None), ("bos_token_id", None), ("eos_token_id", None)), _qwen_dense),
    ConfigClass("Qwen3Config", "qwen3", (
        ("vocab_size", 151936), ("hidden_size", 4096), ("intermediate_size", 22016), ("num_hidden_layers", 32),
        ("num_attention_heads", 32), ("num_key_value_heads", 32), ("head_dim", 128), ("hidden_act", "silu"),
        ("max_position_embeddings", 32768), ("initializer_range", 0.02), ("rms_norm_eps", 1e-06), ("use_cache", True),
        ("tie_word_embeddings", False), ("rope_parameters", None), ("attention_bias", False),
        ("use_sliding_window", False), ("sliding_window", 4096), ("max_window_layers", 28), ("layer_types", None),
        ("attention_dropout", 0.0), ("pad_token_id", None), ("bos_token_id", None), ("eos_token_id", None)),
        _qwen_dense),
    ConfigClass("MixtralConfig", "mixtral", (
        ("vocab_size", 32000), ("hidden_size", 4096), ("intermediate_size", 14336), ("num_hidden_layers", 32),
        ("num_attention_heads", 32), ("num_key_value_heads", 8), ("head_dim", None), ("hidden_act", "silu"),
        ("max_position_embeddings", 131072), ("initializer_range", 0.02), ("rms_norm_eps", 1e-05), ("use_cache", True),
        ("pad_token_id", None), ("bos_token_id", 1), ("eos_token_id", 2), ("tie_word_embeddings", False),
        ("sliding_window", None), ("attention_dropout", 0.0), ("num_experts_per_tok", 2), ("num_local_experts", 8),
        ("output_router_logits", False), ("router_aux_loss_coef", 0.001), ("router_jitter_noise", 0.0),
        ("rope_parameters", None)), _kv_heads, 1000000.0, _EXPERTS),
    ConfigClass("Qwen2MoeConfig", "qwen2_moe", (
        ("vocab_size", 151936), ("hidden_size", 2048), ("intermediate_size", 5632), ("num_hidden_layers", 24),
        ("num_attention_heads", 16), ("num_key_value_heads", 16), ("hidden_act", "silu"),
        ("max_position_embeddings", 32768), ("initializer_range", 0.02), ("rms_norm_eps", 1e-06), ("use_cache", True),
        ("tie_word_embeddings", False), ("rope_parameters", None), ("use_sliding_window", False),
        ("sliding_window", 4096), ("max_window_layers", 28), ("attention_dropout", 0.0), ("decoder_sparse_step", 1),
        ("moe_intermediate_size", 1408), ("shared_expert_intermediate_size", 5632), ("num_experts_per_tok", 4),
        ("num_experts", 60), ("norm_topk_prob", False), ("output_router_logits", False),
        ("router_aux_loss_coef", 0.001), ("mlp_only_layers", None), ("qkv_bias", True), ("layer_types", None),
        ("pad_token_id", None), ("bos_token_id", None), ("eos_token_id", None)), _qwen2_moe),
    ConfigClass("Qwen3MoeConfig", "qwen3_moe", (
        ("vocab_size", 151936), ("hidden_size", 2048), ("intermediate_size", 6144), ("num_hidden_layers", 24),
        ("num_attention_heads", 32), ("num_key_value_heads", 4), ("hidden_act", "silu"),
        ("max_position_embeddings", 32768), ("initializer_range", 0.02), ("rms_norm_eps", 1e-06), ("use_cache", True),
        ("tie_word_embeddings", False), ("rope_parameters", None), ("attention_bias", False),
        ("use_sliding_window", False), ("sliding_window", 4096), ("attention_dropout", 0.0),
        ("decoder_sparse_step", 1), ("moe_intermediate_size", 768), ("num_experts_per_tok", 8),
        ("num_experts", 128), ("norm_topk_prob", False), ("output_router_logits", False),
        ("router_aux_loss_coef", 0.001), ("mlp_only_layers", None), ("pad_token_id", None), ("bos_token_id", None),
        ("eos_token_id", None)), _qwen3_moe, attribute_map=_EXPERTS),
)}
MOE_TYPES = {"MixtralConfig": "mixtral", "Qwen2MoeConfig": "qwen2_moe", "Qwen3MoeConfig": "qwen3_moe"}


class Fields(dict):
    """A config as a dict whose keys read as attributes too (what `merging.moe.arch` reads of a config)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to_dict(self) -> dict[str, Any]:
        return dict(self)


class Unsupported(Exception):
    """A config this module does not reproduce (the caller asks transformers)."""


# fields whose type admits null though their default is not (the others: null means ask transformers)
NULLABLE = frozenset({"sliding_window", "num_key_value_heads", "pretraining_tp", "attention_dropout",
                      "output_hidden_states", "return_dict"})
POSITIVE = frozenset({"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "head_dim"})


def _plain(name: str, value: Any, default: Any) -> bool:
    """Whether `value` is of the simple JSON kind that the field's default suggests (else: ask transformers)."""
    if value is None:
        return default is None or name in NULLABLE
    if name in POSITIVE and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        return False
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    return isinstance(value, (int, list)) and not isinstance(value, bool)


ROPE_KEYS = {"default": set(), "linear": {"factor"}, "dynamic": {"factor"},
             "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}}


def _rope(rope: Any, kwargs: dict, theta: float, max_positions: Any) -> dict:
    """transformers' `convert_rope_params_to_dict` + `standardize_rope_params` for the RoPE types of `ROPE_KEYS`."""
    scaling = kwargs.pop("rope_scaling", None)
    rope = dict(scaling or rope or {})
    rope.setdefault("rope_theta", kwargs.pop("rope_theta", theta))
    kwargs.pop("rope_theta", None)
    rope.setdefault("rope_type", "default")
    kind = rope["rope_type"]
    if kind == "llama3":
        rope.setdefault("original_max_position_embeddings", max_positions)
    if kind not in ROPE_KEYS or set(rope) != {"rope_type", "rope_theta"} | ROPE_KEYS[kind] or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in rope.items() if k != "rope_type"):
        raise Unsupported("rope")
    return rope


def build(cls: ConfigClass, kwargs: dict[str, Any]) -> Fields:
    """`cls(**kwargs).to_dict()` as transformers computes it (without transformers_version)."""
    kwargs = dict(kwargs)
    out: dict[str, Any] = {}
    for name, default in BASE_FIELDS + cls.fields:
        out[cls.key(name)] = kwargs.pop(name) if name in kwargs else default
    cls.post_init(out)
    torch_dtype = kwargs.pop("torch_dtype", None)
    if torch_dtype is not None and out["dtype"] is None:
        out["dtype"] = torch_dtype
    if out["dtype"] is not None and out["dtype"] not in DTYPES:
        raise Unsupported("dtype")
    if out["problem_type"] is not None or "num_labels" in kwargs:
        raise Unsupported("labels")
    if out["id2label"] is None:
        out["id2label"] = {0: "LABEL_0", 1: "LABEL_1"}
        out["label2id"] = {"LABEL_0": 0, "LABEL_1": 1}
    else:
        out["id2label"] = {int(k): v for k, v in out["id2label"].items()}
    out["rope_parameters"] = _rope(out["rope_parameters"], kwargs, cls.default_theta, out["max_position_embeddings"])
    out["_name_or_path"] = str(kwargs.pop("name_or_path", ""))
    output_attentions = kwargs.pop("output_attentions", False)
    for key, value in kwargs.items():
        out[cls.key(key)] = value
    if isinstance(out.get("layer_types"), list):
        out["layer_types"] = ["full_attention" if t == "attention" else t for t in out["layer_types"]]
    out.pop("transformers_version")
    out["model_type"] = cls.model_type
    out["output_attentions"] = output_attentions
    return Fields(out)


def read_dense(raw: dict[str, Any]) -> Fields | None:
    """The base's config.json as its transformers class reads it (`merging.moe.arch.dense_config`), or None when
    this module does not reproduce that class on this config."""
    cls = CLASSES.get(raw.get("model_type"))
    if cls is None or cls.model_type in MOE_TYPES.values():
        return None
    defaults = dict(BASE_FIELDS + cls.fields)
    for key, value in raw.items():
        if key.endswith("_token_id"):
            ids = value if isinstance(value, list) else [value]
            if not all(i is None or (isinstance(i, int) and not isinstance(i, bool)) for i in ids):
                return None
        elif key in defaults:
            if key not in FREE and not _plain(key, value, defaults[key]):
                return None
        elif key not in ACCEPTED or (key == "rope_scaling" and value is not None and not isinstance(value, dict)):
            return None
    types = raw.get("layer_types")
    if raw.get("id2label") is not None or (types is not None and not all(isinstance(t, str) for t in types)):
        return None
    try:
        dense = build(cls, {k: v for k, v in raw.items() if k != "model_type"})
    except Unsupported:
        return None
    if cls.model_type == "llama" and dense["hidden_size"] % dense["num_attention_heads"]:
        return None  # transformers refuses it: let it say why
    return dense
