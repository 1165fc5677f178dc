"""Router weights: one row per expert and per layer, as mergekit-moe computes them (`mergekit/moe/router.py`).

- `hidden` (and `hidden_last`): per prompt, the base model's hidden state at the last token at the input of
  each decoder layer (`hidden_states[:-1]` of transformers' `output_hidden_states`: the embeddings for layer 0,
  layer i-1's output for layer i); averaged over the prompts; the negative prompts' average subtracted; each
  row scaled to unit L2 norm (norms under 1e-8 clamped). `hidden_avg`: the same with the mean over the tokens.
- `cheap_embed`: the token embeddings summed over every token of every prompt, unit-normalised; negatives'
  (normalised likewise) subtracted, normalised again; the same row for every layer.
- `random`: standard normal; `uniform_random`: U(-1/sqrt(h), 1/sqrt(h)) (torch.nn.Linear's initialisation);
  both from a generator seeded with the config's `seed` (mergekit draws from torch's global generator).

Prompts are tokenised as mergekit does: the tokenizer's BOS text prepended, no other special tokens. The
forward pass is basin's own (`merging.moe.decoder`: Llama, Mistral, Qwen2, Qwen3, no transformers import) where
it covers the base's config.json, else transformers' model class (`base_model`). Each distinct prompt is its own
forward pass (mergekit pads a batch on the left: the same positions relative to each other,
so the same values up to rounding). The forward pass runs in float32 by default (mergekit: bfloat16; pass
`dtype="bfloat16"` to reproduce it); sums over prompts accumulate in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from merging.io.checkpoint import Checkpoint, read_config
from merging.moe.config import Expert
from taxonomy.errors import BasinError

EPS = 1e-8
# (token ids of each prompt, average over the tokens?) -> each prompt's (layers, hidden) decoder-layer inputs
States = Callable[[list[torch.Tensor], bool], list[torch.Tensor]]


def tokenizer_of(folder: Path | None, where: str) -> Any:
    """The base's tokenizer (local files only, no remote code): read with the `tokenizers` library where
    transformers would use tokenizer.json as it is (`Tokenizer`), else by transformers' AutoTokenizer."""
    if folder is None:
        raise BasinError(f"{where}: no folder with tokenizer files: gate_mode hidden/cheap_embed tokenise prompts")
    plain = Tokenizer.of(folder)
    if plain is not None:
        return plain
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as err:
        raise BasinError(f"{folder}: cannot load the tokenizer ({str(err).splitlines()[0]}); gate_mode "
                         "hidden/cheap_embed tokenise the prompts with it") from None


SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
# config.json model_types for which AutoTokenizer keeps a generic tokenizer_class (qwen2 is on its list of Hub
# classes it replaces: Qwen2Tokenizer, rebuilt from the vocabulary)
PLAIN_TYPES = ("llama", "mistral", "qwen3")


class Tokenizer:
    """tokenizer.json through the `tokenizers` library, for a folder that transformers 5's AutoTokenizer reads
    into its generic `TokenizersBackend` without changing it: tokenizer_class `TokenizersBackend` /
    `PreTrainedTokenizerFast` and a config.json model_type of `PLAIN_TYPES`, every special token and every
    `added_tokens_decoder` entry already in tokenizer.json, no truncation or padding, no `split_special_tokens`,
    `add_prefix_space`, tekken.json or special_tokens_map.json, no vocabulary over 100000 tokens for a Mistral
    (transformers patches its regex). Encodes as `tokenizer(text, add_special_tokens=False)` does there; any
    other folder is left to transformers (`of` returns None)."""

    def __init__(self, backend: Any, bos_token: str | None):
        self.backend = backend
        self.bos_token = bos_token

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": self.backend.encode(text, add_special_tokens=add_special_tokens).ids}

    @classmethod
    def of(cls, folder: Path) -> Tokenizer | None:
        import json

        try:
            tok_json = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
            config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
            model = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
        except (OSError, ValueError):
            return None
        if (not isinstance(config, dict) or not isinstance(tok_json, dict) or not isinstance(model, dict)
                or model.get("model_type") not in PLAIN_TYPES
                or any((folder / f).exists() for f in ("special_tokens_map.json", "tekken.json"))
                or config.get("tokenizer_class") not in ("TokenizersBackend", "PreTrainedTokenizerFast")
                or any(config.get(k) for k in ("split_special_tokens", "add_prefix_space", "auto_map"))
                or tok_json.get("truncation") is not None or tok_json.get("padding") is not None):
            return None
        added = {str(t.get("id")): {k: v for k, v in t.items() if k != "id"} for t in tok_json.get("added_tokens", [])}
        contents = {t.get("content") for t in added.values()}
        decoder = config.get("added_tokens_decoder") or {}
        if not isinstance(decoder, dict) or any(
                added.get(str(i)) != {k: v for k, v in t.items() if k != "__type"} for i, t in decoder.items()):
            return None
        named = [config.get(k) for k in SPECIAL] + list(config.get("extra_special_tokens") or [])
        named += list(config.get("additional_special_tokens") or [])
        names = [t.get("content") if isinstance(t, dict) else t for t in named if t is not None]
        if not all(isinstance(t, str) and t in contents for t in names):
            return None
        from tokenizers import Tokenizer as Backend

        try:
            backend = Backend.from_file(str(folder / "tokenizer.json"))
        except Exception:  # noqa: BLE001 (tokenizers raises its own Exception): let transformers say why
            return None
        if backend.get_vocab_size() > 100000 and model["model_type"] == "mistral":
            return None
        bos = config.get("bos_token")
        return cls(backend, bos.get("content") if isinstance(bos, dict) else bos)


def token_ids(tokenizer: Any, prompt: str) -> torch.Tensor:
    """mergekit's tokenisation: BOS text + prompt, no added special tokens; (1, T) ids."""
    ids = tokenizer((tokenizer.bos_token or "") + prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise BasinError(f"prompt {prompt!r} tokenises to no tokens")
    return torch.tensor([ids])


def _unit(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.norm(p=2, dim=-1, keepdim=True).clamp(min=EPS)


def gate_vectors(mode: str, experts: list[Expert], layers: int, hidden: int, *, seed: int = 0,
                 embed: Callable[[], torch.Tensor] | None = None, states: States | None = None,
                 tokenizer: Any = None) -> torch.Tensor:
    """(layers, len(experts), hidden) router rows in float32 (see the module docstring). `states` gives the
    hidden modes each prompt's layer inputs (`hidden_states`)."""
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
        assert states is not None
        texts = list(dict.fromkeys(p for e in experts for p in e.positive_prompts + e.negative_prompts))
        per_prompt = dict(zip(texts, states([token_ids(tokenizer, p) for p in texts], mode == "hidden_avg")))

        def one(prompts: list[str]) -> torch.Tensor:
            total = torch.zeros(layers, hidden, dtype=torch.float64)
            for p in prompts:
                total += per_prompt[p].double().cpu()
            return (total / len(prompts)).float()
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


def hidden_states(ckpt: Checkpoint, dtype: torch.dtype, device: str) -> States:
    """The base's layer inputs: by basin's own forward pass (`merging.moe.decoder`, no transformers import) where
    it covers the config.json, else through transformers (`base_model`, `layer_inputs`)."""
    from merging.moe import decoder
    from merging.moe.hf_config import read_dense

    def run(prompts: list[torch.Tensor], average: bool) -> list[torch.Tensor]:
        spec = decoder.spec_of(read_dense(read_config(ckpt) or {}), max(ids.shape[1] for ids in prompts))
        if spec is not None:
            return decoder.layer_inputs(ckpt.get, spec, prompts, dtype, device, average)
        model = base_model(ckpt, dtype, device)
        try:
            return layer_inputs(model, prompts, average)
        finally:
            del model
    return run


def layer_inputs(model: Any, prompts: list[torch.Tensor], average: bool = False) -> list[torch.Tensor]:
    """Per prompt, (layers, hidden): each decoder layer's input at the last token (or averaged over the tokens),
    captured by forward pre-hooks on a transformers model's decoder layers."""
    layers = decoder_layers(model)
    captured: list[torch.Tensor | None] = [None] * len(layers)

    def hook(index: int):
        def pre(module, args, kwargs):  # noqa: ANN001, ARG001
            states = args[0] if args else kwargs["hidden_states"]
            captured[index] = states[0].mean(dim=0) if average else states[0, -1]
        return pre

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    out = []
    try:
        with torch.no_grad():
            for ids in prompts:
                model(input_ids=ids.to(device), use_cache=False)
                out.append(torch.stack([c for c in captured if c is not None]))
    finally:
        for h in handles:
            h.remove()
    return out


def decoder_layers(model: Any) -> list[Any]:
    inner = getattr(model, "model", model)
    return list(inner.layers)


# the dense classes whose decoder basin runs: model_type -> transformers module (configuration_X, modeling_X)
DENSE_MODULES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}


def _decoder_class(ckpt: Checkpoint) -> tuple[Any, Any]:
    """(config, base model class) of the checkpoint's config.json, importing only that model's transformers
    modules (not transformers' Auto* machinery); other model types through AutoConfig."""
    import importlib

    import transformers

    raw = read_config(ckpt) or {}
    name = DENSE_MODULES.get(raw.get("model_type"))
    if name is not None:
        package = f"transformers.models.{raw['model_type']}"
        config_class = getattr(importlib.import_module(f"{package}.configuration_{raw['model_type']}"),
                               f"{name}Config")
        modeling = importlib.import_module(f"{package}.modeling_{raw['model_type']}")
        config = config_class.from_pretrained(str(ckpt.folder), local_files_only=True)
        return config, getattr(modeling, f"{name}Model")
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    config = transformers.AutoConfig.from_pretrained(str(ckpt.folder), local_files_only=True, trust_remote_code=False)
    cls = getattr(transformers, (config.architectures or ["AutoModelForCausalLM"])[0], None)
    if cls is None or not hasattr(cls, "config_class") or type(config) not in MODEL_MAPPING:
        raise BasinError(f"{ckpt.folder}: config.json names no transformers class basin can run")
    return config, MODEL_MAPPING[type(config)]


def base_model(ckpt: Checkpoint, dtype: torch.dtype, device: str) -> Any:
    """The base's decoder stack (transformers' base model of its config.json's model_type, e.g. LlamaModel: no
    output head, so no vocabulary-sized weight copied nor logits computed; no remote code), weights streamed from
    the checkpoint one tensor at a time (so `base+lora` and Hub references work as everywhere else)."""
    from transformers.initialization import no_init_weights

    config, model_class = _decoder_class(ckpt)
    with no_init_weights(), torch.device(device):
        model = model_class(config)
    model = model.to(dtype).eval()
    prefix = f"{model_class.base_model_prefix}." if model_class.base_model_prefix else ""
    names = set(ckpt.names())
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if prefix + name not in names:
                raise BasinError(f"{ckpt.label}: tensor {prefix + name!r} of {model_class.__name__} is missing")
            t.copy_(ckpt.get(prefix + name))
    return model
