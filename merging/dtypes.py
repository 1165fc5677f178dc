"""Dtype names as users write them, in one place (no torch at import).

A recipe's `dtype`, `out_dtype` and `compute_dtype`, `basin merge --dtype` and the evaluators' `--dtype` take
mergekit's spellings (`float32`/`fp32`, `float16`/`fp16`/`half`, `bfloat16`/`bf16`); the evaluators also take
`float64`. The safetensors format's own codes (`F32`, `BF16`, ...) live with the format
(`merging.io.safetensors_format`).
"""

from __future__ import annotations

from typing import Any

ALIASES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16"}
MERGE_DTYPES = ("float32", "float16", "bfloat16")
LOW_PRECISION = ("float16", "bfloat16")
EVAL_DTYPES = ("bfloat16", "float16", "float32", "float64")


def canonical(name: object, allowed: tuple[str, ...] = MERGE_DTYPES) -> str | None:
    """The canonical name of `name` if it is one of `allowed` (aliases accepted), else None."""
    if not isinstance(name, str):
        return None
    value = ALIASES.get(name, name if name == "float64" else None)
    return value if value in allowed else None


def torch_dtype(name: str) -> Any:
    """The torch dtype of a canonical name (`canonical` first for user input)."""
    import torch

    return getattr(torch, name)
