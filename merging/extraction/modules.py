"""Which module each checkpoint tensor belongs to, and of what kind, as PEFT will see it.

PEFT wraps modules by type: `nn.Linear` (weight out x in), transformers' `Conv1D` (GPT-2: weight in x out, PEFT's
`fan_in_fan_out`), `nn.Embedding` (`lora_embedding_A/B`, Delta W = (B A)^T). The types come from the checkpoint's
architecture built on the meta device (transformers' own class named in config.json, never remote code: no memory,
no weights). A checkpoint without a config.json, or of an architecture transformers does not ship, falls back to
tensor names: input embeddings by name, every other 2-D `.weight` taken for a Linear (a Conv1D cannot be told
from its shape, so such a checkpoint needs its config.json).

The Llama-shaped decoders (`DECODERS`: Llama, Mistral, Qwen2, Qwen3 causal LMs) skip the build when every tensor
name is one of theirs (`_decoder_kinds`): their module types follow from the names (importing transformers'
modeling code costs seconds, more than the rest of a small extraction); a test checks the two agree.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from merging.architectures import INPUT_EMBED

LINEAR, CONV1D, EMBEDDING = "linear", "conv1d", "embedding"


@dataclass
class ModuleKinds:
    """module name -> kind (LINEAR, CONV1D, EMBEDDING, or the class name of anything else); `source` says how."""

    kinds: dict[str, str]
    source: str  # "transformers <Class>" or "tensor names"
    output_embedding: str | None = None  # the module get_output_embeddings() returns, if known
    causal_lm: str | None = None  # PEFT task_type the architecture fits, if known

    def kind(self, module: str, tensor_name: str, shape: tuple[int, ...]) -> str:
        if self.source != "tensor names":
            return self.kinds.get(module, "unknown")
        if len(shape) == 2 and tensor_name.endswith(".weight"):
            return EMBEDDING if INPUT_EMBED.search(tensor_name) else LINEAR
        return "unknown"


DECODERS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
DECODER_MODULE = re.compile(r"^(?:(lm_head)|(model\.embed_tokens)|model\.(norm)|model\.layers\.(\d+)\.(?:"
                            r"(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)|"
                            r"(input_layernorm|post_attention_layernorm|self_attn\.[qk]_norm)))$")


def module_kinds(config: dict | None, names: Iterable[str] = ()) -> ModuleKinds:
    """The kinds of the modules of the architecture `config` names (tensor names when it cannot be built);
    `names`: the checkpoint's tensor names (for the decoders' shortcut, see the module docstring)."""
    fast = _decoder_kinds(config, names) if config else None
    if fast is not None:
        return fast
    model = _meta_model(config) if config else None
    if model is None:
        return ModuleKinds({}, "tensor names")
    from transformers.pytorch_utils import Conv1D

    kinds: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            kinds[name] = LINEAR
        elif isinstance(module, Conv1D):
            kinds[name] = CONV1D
        elif isinstance(module, torch.nn.Embedding):
            kinds[name] = EMBEDDING
        else:
            kinds[name] = type(module).__name__
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_name = next((n for n, m in model.named_modules() if head is not None and m is head), None)
    return ModuleKinds(kinds, f"transformers {type(model).__name__}", head_name, _task_type(type(model).__name__))


def _decoder_kinds(config: dict, names: Iterable[str]) -> ModuleKinds | None:
    """A DECODERS class's module kinds from its tensor names; None (build the model) for anything else: another
    class, a name that is not one of its modules, a layer beyond num_hidden_layers, q/k norms outside Qwen3."""
    from merging.output.config import _class_name

    cls = _class_name(config)
    layers = config.get("num_hidden_layers")
    if cls not in DECODERS or not isinstance(layers, int):
        return None
    norm = cls.removesuffix("ForCausalLM") + "RMSNorm"
    kinds: dict[str, str] = {}
    for name in names:
        module, _, param = name.rpartition(".")
        m = DECODER_MODULE.match(module)
        if m is None or param not in ("weight", "bias") or (m[4] is not None and int(m[4]) >= layers):
            return None
        if m[6] is not None and m[6].startswith("self_attn.") and cls != "Qwen3ForCausalLM":
            return None
        kinds[module] = EMBEDDING if m[2] else norm if (m[3] or m[6]) else LINEAR
    if not kinds:
        return None
    return ModuleKinds(kinds, f"transformers {cls}", "lm_head", "CAUSAL_LM")


def _task_type(class_name: str) -> str | None:
    if class_name.endswith(("ForCausalLM", "LMHeadModel")):
        return "CAUSAL_LM"
    if class_name.endswith(("ForConditionalGeneration", "ForSeq2SeqLM")):
        return "SEQ_2_SEQ_LM"
    return None


def _meta_model(config: dict):
    """transformers' own class named by `config` built on the meta device, or None when it cannot be (the
    extraction then falls back to tensor names)."""
    from merging.output.config import _class_name, _model_class, meta_model
    from taxonomy.errors import BasinError

    cls = _model_class(_class_name(config))
    if cls is None:
        return None
    try:
        return meta_model(cls, config)
    except BasinError:
        return None
