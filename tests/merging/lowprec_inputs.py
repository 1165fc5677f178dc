"""Tiny Llama-layout checkpoints (float32, from fixed seeds) for the mergekit low-precision fixture.

Shared by benchmarks/mergekit_lowprec_fixture.py, which records mergekit's outputs on them, and
tests/merging/test_mergekit_lowprec.py, which checks basin's `compute_dtype` against that record.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

HIDDEN, INTER, LAYERS, VOCAB, KV = 16, 32, 2, 32, 8
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
    "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": 2, "num_key_value_heads": 1,
    "vocab_size": VOCAB, "max_position_embeddings": 32, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "torch_dtype": "float32",
}
METHODS = ("linear", "task_arithmetic", "ties", "slerp")
DTYPES = ("float16", "bfloat16")


def shapes() -> dict[str, tuple[int, ...]]:
    out = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
           "lm_head.weight": (VOCAB, HIDDEN)}
    per_layer = {"self_attn.q_proj.weight": (HIDDEN, HIDDEN), "self_attn.k_proj.weight": (KV, HIDDEN),
                 "self_attn.v_proj.weight": (KV, HIDDEN), "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                 "mlp.gate_proj.weight": (INTER, HIDDEN), "mlp.up_proj.weight": (INTER, HIDDEN),
                 "mlp.down_proj.weight": (HIDDEN, INTER), "input_layernorm.weight": (HIDDEN,),
                 "post_attention_layernorm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        out.update({f"model.layers.{i}.{k}": v for k, v in per_layer.items()})
    return out


def make_inputs(root: Path) -> dict[str, Path]:
    """base, ft1, ft2 under `root`: the fine-tunes are base + 0.02 * N(0, 1) noise (seeds 1, 2)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes().items()}
    states = {"base": base}
    for k in (1, 2):
        g = torch.Generator().manual_seed(k)
        states[f"ft{k}"] = {n: t + 0.02 * torch.randn(t.shape, generator=g) for n, t in base.items()}
    folders = {}
    for name, state in states.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(CONFIG, indent=2))
        folders[name] = folder
    return folders


def recipe(method: str, dtype: str, folders: dict[str, Path]) -> dict[str, Any]:
    b, a, c = (str(folders[k]) for k in ("base", "ft1", "ft2"))
    two = [{"model": a, "parameters": {"weight": 0.6}}, {"model": c, "parameters": {"weight": 0.5}}]
    if method == "linear":
        return {"merge_method": "linear", "dtype": dtype, "models": two}
    if method == "slerp":
        return {"merge_method": "slerp", "dtype": dtype, "base_model": a, "parameters": {"t": 0.3},
                "models": [{"model": a}, {"model": c}]}
    params = {"density": 0.5} if method == "ties" else {}
    return {"merge_method": method, "dtype": dtype, "base_model": b, "parameters": params, "models": two}


def tensor_hashes(folder: Path) -> dict[str, str]:
    """sha256 of each output tensor's dtype and bytes, by name."""
    from safetensors.torch import load_file

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        for name, t in load_file(path).items():
            raw = t.contiguous().view(torch.uint8).numpy().tobytes()
            out[name] = hashlib.sha256(str(t.dtype).encode() + b"\0" + raw).hexdigest()
    return dict(sorted(out.items()))
