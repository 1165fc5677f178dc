"""The MoE architectures basin writes, which dense inputs each takes, its config.json and its tensor names.

| output | inputs (config.json model_type) | shared experts |
|---|---|---|
| Mixtral (`MixtralForCausalLM`) | llama, mistral | none |
| Qwen2-MoE (`Qwen2MoeForCausalLM`) | llama, mistral, qwen2 | exactly one |
| Qwen3-MoE (`Qwen3MoeForCausalLM`) | qwen3 | none |

As mergekit-moe chooses: Mixtral when it fits, else the one class that does (`architecture:` picks one). Tensors
are written in the per-expert layout the Hub's MoE checkpoints use (Mixtral's `block_sparse_moe.experts.K.w1`,
the Qwen-MoEs' `mlp.experts.K.gate_proj`), which every transformers version loads (5.x fuses them on load) and
which lets each expert tensor be copied on its own. The config is the base's, read by its transformers config
class (so its defaults, e.g. `tie_word_embeddings`, are the base's), with the MoE fields set; both steps are done
by `merging.moe.hf_config` without importing transformers where it reproduces the classes (then the output's
tensors are checked against `expected_tensors`), else by transformers. A base whose attention the MoE class
cannot reproduce (biases it lacks, sliding windows on some layers only) is refused, naming the field, rather
than written as another model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from taxonomy.errors import BasinError

MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
DROPPED = ("architectures", "model_type", "_name_or_path", "transformers_version", "auto_map", "layer_types",
           "max_window_layers", "use_sliding_window", "sliding_window", "torch_dtype", "dtype")


@dataclass(frozen=True)
class MoEArch:
    name: str
    key: str  # the `architecture:` value that selects it
    class_name: str
    config_class: str
    inputs: tuple[str, ...]
    shared: bool  # exactly one shared expert (Qwen2-MoE), else none
    block: str  # the MoE block's module name in a decoder layer
    expert_proj: dict[str, str]  # dense MLP projection -> expert tensor's name

    def router(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.block}.gate.weight"

    def expert(self, layer: int, k: int, proj: str) -> str:
        return f"model.layers.{layer}.{self.block}.experts.{k}.{self.expert_proj[proj]}.weight"

    def shared_expert(self, layer: int, proj: str) -> str:
        return f"model.layers.{layer}.{self.block}.shared_expert.{proj}.weight"

    def shared_gate(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.block}.shared_expert_gate.weight"


_SAME = {p: p for p in MLP_PROJ}
MIXTRAL = MoEArch("Mixtral", "mixtral", "MixtralForCausalLM", "MixtralConfig", ("llama", "mistral"), False,
                  "block_sparse_moe", {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"})
QWEN2_MOE = MoEArch("Qwen2-MoE", "qwen", "Qwen2MoeForCausalLM", "Qwen2MoeConfig", ("llama", "mistral", "qwen2"),
                    True, "mlp", _SAME)
QWEN3_MOE = MoEArch("Qwen3-MoE", "qwen3", "Qwen3MoeForCausalLM", "Qwen3MoeConfig", ("qwen3",), False, "mlp", _SAME)
ARCHS = (MIXTRAL, QWEN2_MOE, QWEN3_MOE)


def choose(model_types: dict[str, str | None], shared: int, wanted: str | None) -> MoEArch:
    """The output architecture for inputs of these model_types (ref -> type) and `shared` shared experts."""
    for ref, model_type in model_types.items():
        if not any(model_type in a.inputs for a in ARCHS):
            raise BasinError(f"{ref}: model_type {model_type!r} has no MoE counterpart basin can build (inputs: "
                             f"{', '.join(sorted({t for a in ARCHS for t in a.inputs}))})")
    types = set(model_types.values())
    candidates = [a for a in ARCHS if (wanted is None or a.key == wanted.lower()) and types <= set(a.inputs)]
    fits = [a for a in candidates if a.shared == (shared > 0)]
    if fits:
        return fits[0]
    if not candidates:
        target = f"architecture {wanted!r}" if wanted else "one MoE architecture"
        raise BasinError(f"inputs of model_type {', '.join(sorted(map(str, types)))} do not fit {target} "
                         f"(Mixtral: llama/mistral; Qwen2-MoE: llama/mistral/qwen2; Qwen3-MoE: qwen3)")
    arch = candidates[0]
    if arch.shared:
        raise BasinError(f"{arch.name} has one shared expert per layer: give `shared_experts:` with exactly one "
                         f"entry (got {shared})")
    raise BasinError(f"{arch.name} has no shared experts: remove `shared_experts:` (got {shared})")


def dense_config(raw: dict[str, Any], where: str, use_transformers: bool = False) -> Any:
    """The base's config.json read by its transformers config class (defaults filled in): by
    `merging.moe.hf_config` where it reproduces that class (a `Fields` dict), else by transformers."""
    from merging.moe.hf_config import read_dense

    dense = None if use_transformers else read_dense(raw)
    if dense is not None:
        return dense
    from transformers import CONFIG_MAPPING

    try:
        return CONFIG_MAPPING[raw["model_type"]](**{k: v for k, v in raw.items() if k != "model_type"})
    except (KeyError, TypeError, ValueError) as err:
        raise BasinError(f"{where}: transformers cannot read this config.json ({str(err).splitlines()[0]})") from None


def _sliding(dense: Any) -> tuple[list[bool], int | None]:
    """Per layer, whether the dense model's attention is windowed; and the window."""
    n = dense.num_hidden_layers
    window = getattr(dense, "sliding_window", None)
    types = getattr(dense, "layer_types", None)
    if types is not None:
        return [t == "sliding_attention" for t in types], window
    if dense.model_type == "mistral":
        return [window is not None] * n, window
    return [False] * n, None


def _check_attention(arch: MoEArch, dense: Any, where: str) -> dict[str, Any]:
    """The attention fields of the MoE config; a dense attention the MoE class cannot reproduce is an error."""
    for key in ("attention_bias", "mlp_bias"):
        if getattr(dense, key, False) and not (arch is QWEN3_MOE and key == "attention_bias"):
            raise BasinError(f"{where}: config.json {key}: true, but {arch.name} has no such biases")
    sliding, window = _sliding(dense)
    if arch is QWEN2_MOE:
        return {"layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
                "sliding_window": window, "use_sliding_window": any(sliding),
                "max_window_layers": getattr(dense, "max_window_layers", dense.num_hidden_layers)}
    if any(sliding) and not all(sliding):
        raise BasinError(f"{where}: config.json windows the attention of some layers only (layer_types / "
                         f"max_window_layers), which {arch.name} cannot reproduce (one window for every layer)")
    fields: dict[str, Any] = {"sliding_window": window if all(sliding) else None}
    if arch is QWEN3_MOE:
        fields["use_sliding_window"] = all(sliding)
    return fields


def moe_config(arch: MoEArch, dense: Any, experts: int, per_token: int, dtype: str | None,
               where: str) -> dict[str, Any]:
    """config.json of the output: the dense base's config with the MoE class's fields (the MoE class's
    `to_dict()`: by `merging.moe.hf_config` when `dense` came from it, else by transformers)."""
    from merging.moe import hf_config

    fields = {k: v for k, v in dense.to_dict().items() if k not in DROPPED}
    fields.update(_check_attention(arch, dense, where))
    moe: dict[str, Any] = {"num_experts_per_tok": per_token, "moe_intermediate_size": dense.intermediate_size}
    if arch is MIXTRAL:
        moe = {"num_local_experts": experts, "num_experts_per_tok": per_token}
    else:
        moe.update(num_experts=experts, decoder_sparse_step=1, norm_topk_prob=True, mlp_only_layers=[])
        if arch is QWEN2_MOE:
            moe.update(shared_expert_intermediate_size=dense.intermediate_size, qkv_bias=True)
    out = None
    if isinstance(dense, hf_config.Fields):
        try:
            out = dict(hf_config.build(hf_config.CLASSES[hf_config.MOE_TYPES[arch.config_class]], {**fields, **moe}))
        except hf_config.Unsupported:
            out = None
    if out is None:
        import transformers

        out = getattr(transformers, arch.config_class)(**fields, **moe).to_dict()
    out["architectures"] = [arch.class_name]
    if dtype is not None:
        out["dtype"] = dtype
    out.pop("transformers_version", None)
    return out


def expected_tensors(arch: MoEArch, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor (name -> shape) the MoE class builds from `config`, in the per-expert layout basin writes:
    what transformers' `check_loadable` would ask of the output, derived from the class's structure (tests hold
    it against transformers' meta-device model)."""
    h, heads, kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or h // heads
    inter = config["intermediate_size"] if arch is MIXTRAL else config["moe_intermediate_size"]
    n = config["num_local_experts"] if "num_local_experts" in config else config["num_experts"]
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config["vocab_size"], h),
                                       "model.norm.weight": (h,)}
    if not config.get("tie_word_embeddings"):
        out["lm_head.weight"] = (config["vocab_size"], h)
    bias = {"qwen": "qkv", "qwen3": "qkvo" if config.get("attention_bias") else ""}.get(arch.key, "")
    rows = {"q": heads * hd, "k": kv * hd, "v": kv * hd, "o": h}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = out[p + "post_attention_layernorm.weight"] = (h,)
        for proj in "qkvo":
            out[f"{p}self_attn.{proj}_proj.weight"] = (rows[proj], heads * hd if proj == "o" else h)
        for proj in bias:
            out[f"{p}self_attn.{proj}_proj.bias"] = (rows[proj],)
        if arch is QWEN3_MOE:
            out[p + "self_attn.q_norm.weight"] = out[p + "self_attn.k_norm.weight"] = (hd,)
        out[arch.router(i)] = (n, h)
        for k in range(n):
            out.update(_mlp(lambda proj, k=k, i=i: arch.expert(i, k, proj), h, inter))
        if arch.shared:
            shared = config["shared_expert_intermediate_size"]
            out.update(_mlp(lambda proj, i=i: arch.shared_expert(i, proj), h, shared))
            out[arch.shared_gate(i)] = (1, h)
    return out


def _mlp(name: Any, h: int, inter: int) -> dict[str, tuple[int, ...]]:
    return {name("gate_proj"): (inter, h), name("up_proj"): (inter, h), name("down_proj"): (h, inter)}
