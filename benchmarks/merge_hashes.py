"""Content hashes of one small merge per tensorwise method, on seeded inputs (float32 and bfloat16 mixed).

A refactoring that keeps every method's bits keeps this file's output: `python benchmarks/merge_hashes.py`
writes benchmarks/results/merge_hashes.json; `tests/merging/test_merge_hashes.py` recomputes it.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {"model.embed_tokens.weight": (64, 32), "model.layers.0.mlp.up_proj.weight": (300, 700),
          "model.layers.0.input_layernorm.weight": (32,), "model.layers.1.mlp.up_proj.weight": (64, 32),
          "lm_head.weight": (64, 32)}
SPARSE = ("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear")
ONE_OTHER = {"passthrough": 1, "nearswap": 1, "slerp": 1, "nuslerp": 2, "arcee_fusion": 1}
WITH_BASE_LISTED = ("slerp", "nearswap", "arcee_fusion")
RESULT = Path(__file__).resolve().parent / "results" / "merge_hashes.json"


def make_inputs(folder: Path) -> list[str]:
    g = torch.Generator().manual_seed(0)
    refs = []
    for k in range(4):
        d = folder / f"m{k}"
        d.mkdir()
        dtype = torch.bfloat16 if k % 2 else torch.float32
        save_file({n: torch.randn(s, generator=g).to(dtype) for n, s in SHAPES.items()}, str(d / "model.safetensors"))
        refs.append(str(d))
    return refs


def recipe(method: str, refs: list[str]) -> dict:
    if method == "passthrough":
        return {"merge_method": method, "models": [{"model": refs[1]}], "dtype": "bfloat16"}
    models = [{"model": r} for r in refs[1:]][: ONE_OTHER.get(method, 3)]
    if method in WITH_BASE_LISTED:
        models.append({"model": refs[0]})
    params = {"slerp": {"t": 0.3}, "nearswap": {"t": 0.01}, "nuslerp": {"weight": 0.5},
              "task_arithmetic": {"weight": 0.7}, "sce": {"select_topk": 0.5},
              "wudi": {"iterations": 20}}.get(method, {})
    if method in SPARSE:
        params = {"density": 0.5, "weight": 0.7}
    return {"merge_method": method, "base_model": refs[0], "models": models, "parameters": params,
            "dtype": "bfloat16", "seed": 3}


def hashes() -> dict[str, str]:
    from merging import merge
    from merging.methods.catalog import registered_names
    from taxonomy.registry import get

    names = [m for m in registered_names() if not get(m).needs_lora]  # LoRA methods: tests/merging/test_knots.py

    with tempfile.TemporaryDirectory() as tmp:
        refs = make_inputs(Path(tmp))
        return {m: merge(recipe(m, refs), Path(tmp) / f"out_{m}", progress=False).content_hash
                for m in names}


if __name__ == "__main__":
    out = hashes()
    RESULT.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"{len(out)} methods -> {RESULT}", file=sys.stderr)
