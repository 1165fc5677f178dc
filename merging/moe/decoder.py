"""The dense base's decoder forward pass in plain torch, for `hidden` router weights without importing transformers.

For the inputs `basin moe` accepts (config.json model_type llama, mistral, qwen2, qwen3, as transformers 5's
modeling_llama / _mistral / _qwen2 / _qwen3 compute them, read for their semantics): token embeddings, then per
decoder layer `x + attn(rms(x))`, `x + mlp(rms(x))`, with RMSNorm (Zhang & Sennrich 2019; statistics in float32),
rotary position embeddings (Su et al. 2021, RoFormer; RoPE types default, linear, dynamic NTK below the trained
length, llama3), grouped-query attention (Ainslie et al. 2023), q/k/v(/o) biases (Qwen2, Llama's
`attention_bias`), per-head q/k RMSNorm (Qwen3), a causal mask with the layer's sliding window where the prompt
reaches it, and the SiLU-gated MLP (Shazeer 2020). The ops are transformers' sdpa path's, in its order, so in
float32 the result is that path's bit for bit (tests hold it against transformers); the RoPE frequencies stay
float32 whatever the dtype (as in a model loaded by `from_pretrained(dtype=...)`, which mergekit does).

`spec_of` reads a config (`merging.moe.hf_config.read_dense`'s) into a `Spec`, or None for anything outside this
(the caller then runs transformers). `layer_inputs` runs the prompts layer by layer: each layer's weights are read
from the checkpoint once, used for every prompt and dropped, and the last layer is never read (its output is not a
layer input), so memory is one layer's weights plus the prompts' hidden states.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from taxonomy.errors import BasinError

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclass(frozen=True)
class Spec:
    """What the forward pass needs of a config.json."""

    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    rope: Mapping[str, Any]  # rope_parameters as transformers standardises them
    rope_dim: int
    max_positions: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    windows: tuple[int | None, ...]  # per layer: its sliding window, or None for full causal attention


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def spec_of(config: Mapping[str, Any] | None, longest: int) -> Spec | None:
    """The forward pass of `config` (prompts up to `longest` tokens), or None where this module does not compute
    it as transformers does (another model_type or activation, a RoPE type outside `ROPE_TYPES`, dynamic RoPE on a
    prompt past max_position_embeddings, an unknown layer type...)."""
    if config is None or config.get("model_type") not in SUPPORTED:
        return None
    kind = config["model_type"]
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    layers = config.get("num_hidden_layers")
    kv_heads = config.get("num_key_value_heads") or heads
    if not all(_int(v) for v in (hidden, heads, layers, kv_heads)) or heads % kv_heads:
        return None
    head_dim = config.get("head_dim") or hidden // heads
    rope = config.get("rope_parameters")
    max_positions = config.get("max_position_embeddings")
    if (config.get("hidden_act") != "silu" or not _int(head_dim) or not _int(max_positions)
            or not isinstance(rope, Mapping) or rope.get("rope_type") not in ROPE_TYPES
            or config.get("partial_rotary_factor") is not None or "partial_rotary_factor" in rope
            or (rope["rope_type"] == "dynamic" and longest > max_positions)):
        return None
    eps = config.get("rms_norm_eps")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        return None
    windows = _windows(config, kind, layers)
    if windows is None:
        return None
    bias = bool(config.get("attention_bias", False))
    return Spec(kind, layers, hidden, heads, kv_heads, head_dim, eps, dict(rope), head_dim, max_positions,
                qkv_bias=kind == "qwen2" or bias, o_bias=bias and kind != "qwen2",
                mlp_bias=kind == "llama" and bool(config.get("mlp_bias", False)), qk_norm=kind == "qwen3",
                windows=windows)


def _windows(config: Mapping[str, Any], kind: str, layers: int) -> tuple[int | None, ...] | None:
    """Each layer's sliding window (Mistral: every layer's, when set; Qwen2/3: per `layer_types`)."""
    window = config.get("sliding_window")
    if window is not None and not _int(window):
        return None
    if kind == "mistral":
        return (window,) * layers
    if kind == "llama":
        return (None,) * layers
    types = config.get("layer_types")
    if not isinstance(types, list) or len(types) < layers:
        return None
    out: list[int | None] = []
    for t in types[:layers]:
        if t == "full_attention":
            out.append(None)
        elif t == "sliding_attention" and window is not None:
            out.append(window)
        else:
            return None
    return tuple(out)


def inv_freq(spec: Spec) -> torch.Tensor:
    """RoPE inverse frequencies (float32), as transformers' init functions of `ROPE_TYPES` compute them at the
    trained length."""
    rope, dim = spec.rope, spec.rope_dim
    base = rope["rope_theta"]
    kind = rope["rope_type"]
    if kind == "dynamic":  # NTK-aware base at seq_len = max_position_embeddings (the prompts are no longer)
        factor, seq_len = rope["factor"], spec.max_positions
        base = base * ((factor * seq_len / spec.max_positions) - (factor - 1)) ** (dim / (dim - 2))
    freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
    if kind == "linear":
        freq /= rope["factor"]
    elif kind == "llama3":  # Llama 3.1: long wavelengths divided by factor, a smooth ramp between the bands
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old = rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / freq
        scaled = torch.where(wavelen > old / low, freq / factor, freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) * ~(wavelen > old / low)
        freq = torch.where(medium, smoothed, scaled)
    return freq


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _repeat(x: torch.Tensor, n: int) -> torch.Tensor:
    b, kv, t, d = x.shape
    return x if n == 1 else x[:, :, None].expand(b, kv, n, t, d).reshape(b, kv * n, t, d)


def _attention(x: torch.Tensor, w: dict[str, torch.Tensor], spec: Spec, cos: torch.Tensor, sin: torch.Tensor,
               window: int | None) -> torch.Tensor:
    b, t, _ = x.shape
    shape = (b, t, -1, spec.head_dim)
    q = F.linear(x, w["q_proj.weight"], w.get("q_proj.bias")).view(shape)
    k = F.linear(x, w["k_proj.weight"], w.get("k_proj.bias")).view(shape)
    v = F.linear(x, w["v_proj.weight"], w.get("v_proj.bias")).view(shape).transpose(1, 2)
    if spec.qk_norm:
        q, k = _rms(q, w["q_norm.weight"], spec.eps), _rms(k, w["k_norm.weight"], spec.eps)
    q, k = _rotate(q.transpose(1, 2), cos, sin), _rotate(k.transpose(1, 2), cos, sin)
    groups = spec.heads // spec.kv_heads
    mask, extra = None, {}
    if window is not None and t >= window:  # transformers materialises the mask once the prompt reaches the window
        i = torch.arange(t, device=x.device)
        mask = ((i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window))[None, None]
    if groups > 1:
        if mask is None and spec.head_dim <= 256:
            extra["enable_gqa"] = True
        else:
            k, v = _repeat(k, groups), _repeat(v, groups)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=spec.head_dim ** -0.5,
                                         is_causal=t > 1 and mask is None, **extra)
    out = out.transpose(1, 2).contiguous().reshape(b, t, -1).contiguous()
    return F.linear(out, w["o_proj.weight"], w.get("o_proj.bias"))


def _mlp(x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    gate = F.silu(F.linear(x, w["gate_proj.weight"], w.get("gate_proj.bias")))
    return F.linear(gate * F.linear(x, w["up_proj.weight"], w.get("up_proj.bias")), w["down_proj.weight"],
                    w.get("down_proj.bias"))


def layer_names(spec: Spec, layer: int) -> dict[str, str]:
    """Short name -> checkpoint tensor name of one decoder layer's weights."""
    p = f"model.layers.{layer}."
    names = {"input_layernorm.weight": p + "input_layernorm.weight",
             "post_attention_layernorm.weight": p + "post_attention_layernorm.weight"}
    for proj in ("q", "k", "v", "o"):
        names[f"{proj}_proj.weight"] = f"{p}self_attn.{proj}_proj.weight"
        if spec.o_bias if proj == "o" else spec.qkv_bias:
            names[f"{proj}_proj.bias"] = f"{p}self_attn.{proj}_proj.bias"
    if spec.qk_norm:
        names.update({f"{n}_norm.weight": f"{p}self_attn.{n}_norm.weight" for n in ("q", "k")})
    for proj in ("gate", "up", "down"):
        names[f"{proj}_proj.weight"] = f"{p}mlp.{proj}_proj.weight"
        if spec.mlp_bias:
            names[f"{proj}_proj.bias"] = f"{p}mlp.{proj}_proj.bias"
    return names


def layer_inputs(get: Callable[[str], torch.Tensor], spec: Spec, prompts: list[torch.Tensor], dtype: torch.dtype,
                 device: str | torch.device = "cpu", average: bool = False) -> list[torch.Tensor]:
    """Per prompt ((1, T) token ids), the (layers, hidden) input of every decoder layer, in `dtype`: the hidden
    state at the last token, or its mean over the tokens with `average` (what `hidden_states[:-1]` of
    transformers' `output_hidden_states` holds). `get(name)` reads one checkpoint tensor."""
    table = get("model.embed_tokens.weight")  # only the prompts' rows are converted (the same values)
    for ids in prompts:
        if int(ids.max()) >= table.shape[0]:
            raise BasinError(f"token id {int(ids.max())} is outside the embedding table ({table.shape[0]} rows)")
    states = [F.embedding(ids.to(table.device), table).to(device=device, dtype=dtype) for ids in prompts]
    del table
    longest = max(ids.shape[1] for ids in prompts)
    freqs = torch.arange(longest, device=device)[None, :, None].float() * inv_freq(spec).to(device)
    angles = torch.cat((freqs, freqs), dim=-1)
    cos, sin = angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]  # (1, 1, T, head_dim)
    captured: list[list[torch.Tensor]] = [[] for _ in prompts]
    for layer in range(spec.layers):
        for rows, h in zip(captured, states):
            rows.append(h[0].mean(dim=0) if average else h[0, -1])
        if layer == spec.layers - 1:
            break
        w = {k: get(n).to(device=device, dtype=dtype) for k, n in layer_names(spec, layer).items()}
        for j, h in enumerate(states):
            t = h.shape[1]
            c, s = cos[:, :, :t], sin[:, :, :t]
            h = h + _attention(_rms(h, w["input_layernorm.weight"], spec.eps), w, spec, c, s, spec.windows[layer])
            states[j] = h + _mlp(_rms(h, w["post_attention_layernorm.weight"], spec.eps), w)
        del w
    return [torch.stack(rows) for rows in captured]
