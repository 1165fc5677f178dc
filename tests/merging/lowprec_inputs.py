"""Tiny Llama-layout checkpoints (float32, from fixed seeds) for the mergekit fixtures.

Shared by benchmarks/mergekit_lowprec_fixture.py and benchmarks/mergekit_fp32_fixture.py, which record
mergekit's outputs on them, and tests/merging/test_mergekit_lowprec.py / test_mergekit_fp32.py, which
check basin's merges (`compute_dtype` float16/bfloat16; float32) against those records.
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
# mergekit 0.1.5's deterministic methods (dare_* and della* draw random masks), merged in float32
FP32_METHODS = ("linear", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "sce", "ram", "ramplus_tl",
                "model_stock", "nearswap", "arcee_fusion", "slerp", "nuslerp", "multislerp", "karcher")
# where basin's float32 merge is not mergekit's bit for bit (float64 norms, dots and sums; lerp in nearswap):
# the fp32 fixture records their values, and the test bounds the relative difference
FP32_APPROX = ("sce", "model_stock", "nearswap", "arcee_fusion", "slerp", "nuslerp", "multislerp", "karcher")
# (base_model, models, parameters) per method: "two" = ft1 and ft2 weighted 0.6 and 0.5, "pair" = unweighted
_FORMS: dict[str, tuple[str | None, str, dict[str, Any]]] = {
    "linear": (None, "two", {}), "task_arithmetic": ("base", "two", {}), "ties": ("base", "two", {"density": 0.5}),
    "breadcrumbs": ("base", "two", {"density": 0.8, "gamma": 0.05}),
    "breadcrumbs_ties": ("base", "two", {"density": 0.8, "gamma": 0.05}),
    "sce": ("base", "pair", {"select_topk": 0.5}), "ram": ("base", "pair", {}), "ramplus_tl": ("base", "pair", {}),
    "model_stock": ("base", "pair", {}), "nearswap": ("ft1", "pair", {"t": 0.01}),
    "arcee_fusion": ("ft1", "pair", {}), "slerp": ("ft1", "pair", {"t": 0.3}), "nuslerp": (None, "two", {}),
    "multislerp": ("base", "two", {}), "karcher": (None, "pair", {}),
}


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
    """The mergekit recipe of `method` (a key of _FORMS) on the inputs, output in `dtype`."""
    base, models, params = _FORMS[method]
    a, c = str(folders["ft1"]), str(folders["ft2"])
    if models == "two":
        listed = [{"model": a, "parameters": {"weight": 0.6}}, {"model": c, "parameters": {"weight": 0.5}}]
    else:
        listed = [{"model": a}, {"model": c}]
    out: dict[str, Any] = {"merge_method": method, "dtype": dtype, "models": listed}
    if base is not None:
        out["base_model"] = str(folders[base])
    if params or base == "base":
        out["parameters"] = dict(params)
    return out


def tensor_hashes(folder: Path) -> dict[str, str]:
    """sha256 of each output tensor's dtype and bytes, by name."""
    from safetensors.torch import load_file

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        for name, t in load_file(path).items():
            raw = t.contiguous().view(torch.uint8).numpy().tobytes()
            out[name] = hashlib.sha256(str(t.dtype).encode() + b"\0" + raw).hexdigest()
    return dict(sorted(out.items()))


def tensor_values(folder: Path) -> dict[str, str]:
    """Each output tensor's float32 bytes (little-endian), base64, by name: where a fixture records values."""
    import base64

    from safetensors.torch import load_file

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        for name, t in load_file(path).items():
            out[name] = base64.b64encode(t.float().contiguous().numpy().astype("<f4").tobytes()).decode()
    return dict(sorted(out.items()))
