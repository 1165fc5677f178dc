"""Router weights: one row per expert and per layer, as mergekit-moe computes them (`mergekit/moe/router.py`).

- `hidden` (and `hidden_last`): per prompt, the base model's hidden state at the last token at the input of
  each decoder layer (`hidden_states[:-1]` of transformers' `output_hidden_states`: the embeddings for layer 0,
  layer i-1's output for layer i); averaged over the prompts; the negative prompts' average subtracted; each
  row scaled to unit L2 norm (norms under 1e-8 clamped). `hidden_avg`: the same with the mean over the tokens.
- `cheap_embed`: the token embeddings summed over every token of every prompt, unit-normalised; negatives'
  (normalised likewise) subtracted, normalised again; the same row for every layer.
- `random`: standard normal; `uniform_random`: U(-1/sqrt(h), 1/sqrt(h)) (torch.nn.Linear's initialisation);
  both from a generator seeded with the config's `seed` (mergekit draws from torch's global generator).

Prompts are tokenised as mergekit does: the tokenizer's BOS text prepended, no other special tokens. Each
prompt is its own forward pass (mergekit pads a batch on the left: the same positions relative to each other,
so the same values up to rounding). The forward pass runs in float32 by default (mergekit: bfloat16; pass
`dtype="bfloat16"` to reproduce it); sums over prompts accumulate in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from merging.io.checkpoint import Checkpoint
from merging.moe.config import Expert
from taxonomy.errors import BasinError

EPS = 1e-8


def tokenizer_of(folder: Path | None, where: str) -> Any:
    """The base's tokenizer (local files only, no remote code)."""
    from transformers import AutoTokenizer

    if folder is None:
        raise BasinError(f"{where}: no folder with tokenizer files: gate_mode hidden/cheap_embed tokenise prompts")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as err:
        raise BasinError(f"{folder}: cannot load the tokenizer ({str(err).splitlines()[0]}); gate_mode "
                         "hidden/cheap_embed tokenise the prompts with it") from None


def token_ids(tokenizer: Any, prompt: str) -> torch.Tensor:
    """mergekit's tokenisation: BOS text + prompt, no added special tokens; (1, T) ids."""
    ids = tokenizer((tokenizer.bos_token or "") + prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise BasinError(f"prompt {prompt!r} tokenises to no tokens")
    return torch.tensor([ids])


def _unit(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.norm(p=2, dim=-1, keepdim=True).clamp(min=EPS)


def gate_vectors(mode: str, experts: list[Expert], layers: int, hidden: int, *, seed: int = 0,
                 embed: Callable[[], torch.Tensor] | None = None, model: Any = None,
                 tokenizer: Any = None) -> torch.Tensor:
    """(layers, len(experts), hidden) router rows in float32 (see the module docstring)."""
    if mode in ("random", "uniform_random"):
        g = torch.Generator().manual_seed(seed)
        if mode == "random":
            return torch.randn((layers, len(experts), hidden), generator=g)
        scale = math.sqrt(1.0 / hidden)
        return torch.rand((layers, len(experts), hidden), generator=g) * 2 * scale - scale
    if mode == "cheap_embed":
        assert embed is not None
        table = embed()

        def one(prompts: list[str]) -> torch.Tensor:
            return _cheap_embed(table, [token_ids(tokenizer, p) for p in prompts], layers)
    else:
        def one(prompts: list[str]) -> torch.Tensor:
            return layer_inputs(model, [token_ids(tokenizer, p) for p in prompts], average=mode == "hidden_avg")
    rows = []
    for expert in experts:
        h = one(expert.positive_prompts)
        if expert.negative_prompts:
            h = h - one(expert.negative_prompts)
        rows.append(_unit(h))
    return torch.stack(rows, dim=1).float()


def _cheap_embed(table: torch.Tensor, prompts: list[torch.Tensor], layers: int) -> torch.Tensor:
    total = torch.zeros(table.shape[1], dtype=torch.float64)
    for ids in prompts:
        if int(ids.max()) >= table.shape[0]:
            raise BasinError(f"token id {int(ids.max())} is outside the embedding table ({table.shape[0]} rows)")
        total += table[ids[0]].double().sum(dim=0)
    return _unit(total.float()).repeat(layers, 1)


def layer_inputs(model: Any, prompts: list[torch.Tensor], average: bool = False) -> torch.Tensor:
    """(layers, hidden): the mean over prompts of each decoder layer's input at the last token (or averaged
    over the tokens), captured by forward pre-hooks on the decoder layers."""
    layers = decoder_layers(model)
    captured: list[torch.Tensor | None] = [None] * len(layers)

    def hook(index: int):
        def pre(module, args, kwargs):  # noqa: ANN001, ARG001
            states = args[0] if args else kwargs["hidden_states"]
            captured[index] = states[0].mean(dim=0) if average else states[0, -1]
        return pre

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    total = torch.zeros(len(layers), model.config.hidden_size, dtype=torch.float64)
    try:
        with torch.no_grad():
            for ids in prompts:
                model(input_ids=ids.to(device), use_cache=False)
                total += torch.stack([c.double().cpu() for c in captured if c is not None])
    finally:
        for h in handles:
            h.remove()
    return (total / len(prompts)).float()


def decoder_layers(model: Any) -> list[Any]:
    inner = getattr(model, "model", model)
    return list(inner.layers)


def base_model(ckpt: Checkpoint, dtype: torch.dtype, device: str) -> Any:
    """The base's decoder stack (transformers' base model of its config.json's class, e.g. LlamaModel: no output
    head, so no vocabulary-sized weight copied nor logits computed; no remote code), weights streamed from the
    checkpoint one tensor at a time (so `base+lora` and Hub references work as everywhere else)."""
    import transformers
    from transformers.initialization import no_init_weights
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    folder = ckpt.folder
    config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    cls = getattr(transformers, (config.architectures or ["AutoModelForCausalLM"])[0], None)
    if cls is None or not hasattr(cls, "config_class") or type(config) not in MODEL_MAPPING:
        raise BasinError(f"{folder}: config.json names no transformers class basin can run")
    with no_init_weights(), torch.device(device):
        model = MODEL_MAPPING[type(config)](config)
    model = model.to(dtype).eval()
    prefix = f"{cls.base_model_prefix}." if cls.base_model_prefix else ""
    names = set(ckpt.names())
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if prefix + name not in names:
                raise BasinError(f"{ckpt.label}: tensor {prefix + name!r} of {cls.__name__} is missing")
            t.copy_(ckpt.get(prefix + name))
    return model
