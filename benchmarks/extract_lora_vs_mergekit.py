"""`basin extract-lora` side by side with mergekit-extract-lora 0.1.5 (its own venv, a subprocess; skipped without
it), on a realistic-size Llama-shaped random model (default hidden 768, 12 layers, vocab 32000: ~125M parameters,
bfloat16 on disk) so that start-up does not dominate, and a fine-tune of it (every tensor moved by seeded noise).

Measured: wall time, CPU time and peak RSS of each whole process (`benchmarks/_peer.timed`: os.wait4's rusage of
that child), run back to back under the same conditions, both with `--threads` intra-op threads (default 1: on a
machine shared with other work, 2-thread LAPACK calls were 20-40x slower than 1-thread ones for both tools, from
OpenMP barriers waiting on descheduled threads; the number used is in the JSON). Compared per LoRA module: the
products B @ A (the factors themselves differ by the SVD's sign choice: basin fixes each singular vector's sign,
mergekit keeps LAPACK's), as the relative Frobenius difference of basin's from mergekit's, and each tool's error
against the exact delta; the tensors each tool saves whole; rank and alpha.

Where the tensors are the same and where not: basin's `extraction.json` says per module which SVD it used.
- exact (`svd`: small matrices, ranks above a quarter of the short side less 10): the same float32 LAPACK SVD as
  mergekit, so in float32 the products are bit-identical or within float32 rounding (the small float32 pair at
  rank 64, every module exact); in bfloat16 they differ by ~bf16 rounding because mergekit subtracts
  `model - base` in the checkpoint's dtype (the task vector rounded to bf16 before its SVD) while basin subtracts
  in float32 (exact);
- randomised (`svd_lowrank`: the 125M pair at rank 32): another rank-r approximation, not mergekit's; both
  tools' errors against the exact delta are reported per module (the exact SVD's is the Eckart-Young optimum,
  so basin's excess over mergekit's is the price of the randomised SVD).

    python benchmarks/extract_lora_vs_mergekit.py [--mergekit /work/peers/mk/bin/mergekit-extract-lora]
        [--hidden 768 --layers 12 --vocab 32000 --rank 32 --threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _peer import timed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _models(root: Path, hidden: int, layers: int, vocab: int, dtype: torch.dtype) -> tuple[Path, Path]:
    """base and fine-tune folders: safetensors written straight from seeded tensors (no model built)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 192,
                      tie_word_embeddings=False, dtype=str(dtype).removeprefix("torch."),
                      architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in LlamaForCausalLM(cfg).state_dict().items()}
    folders = []
    for k, name in enumerate(("base", "ft")):
        g = torch.Generator().manual_seed(0)
        state = {n: (torch.randn(s, generator=g) * 0.02).to(dtype) for n, s in sorted(shapes.items())}
        if k:
            g = torch.Generator().manual_seed(1)
            state = {n: (t.float() + 0.002 * torch.randn(t.shape, generator=g)).to(dtype) for n, t in state.items()}
        folder = root / name
        folder.mkdir()
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        cfg.save_pretrained(folder)
        folders.append(folder)
    return folders[0], folders[1]


def _adapter(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors"), json.loads((folder / "adapter_config.json").read_text())


def _products(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            out[key.split(".lora_A.")[0].removeprefix("base_model.model.")] = b.double() @ a.double()
    return out


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] if values else 0.0


def _exact_errors(products: dict[str, torch.Tensor], base: Path, ft: Path) -> dict[str, float]:
    """Per module ||delta - B A|| / ||delta||, delta = ft - base exactly (float64)."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(base / "model.safetensors"), "pt") as b, safe_open(str(ft / "model.safetensors"), "pt") as f:
        for module, product in products.items():
            delta = f.get_tensor(module + ".weight").double() - b.get_tensor(module + ".weight").double()
            out[module] = float((delta - product).norm() / delta.norm())
    return out


def _by_method(bp: dict, mp: dict, errors: tuple[dict, dict], methods: dict[str, str]) -> dict:
    """Per SVD basin used: modules, products' relative difference from mergekit's, and (randomised) basin's error
    over mergekit's (exact, the optimum) against the exact delta."""
    out = {}
    for method in sorted(set(methods.values())):
        modules = sorted(m for m in set(bp) & set(mp) if methods.get(m) == method)
        rel = [float((bp[m] - mp[m]).norm() / mp[m].norm().clamp_min(1e-30)) for m in modules]
        ratio = [errors[0][m] / errors[1][m] for m in modules]
        out[method] = {"modules": len(modules), "products bit-identical": sum(torch.equal(bp[m], mp[m])
                                                                              for m in modules),
                       "product_rel_fro basin vs mergekit: max": max(rel, default=0.0), "median": _median(rel),
                       "error vs the exact delta, median: basin / mergekit": [
                           _median([errors[0][m] for m in modules]), _median([errors[1][m] for m in modules])],
                       "basin error / mergekit error: median, max": [_median(ratio), max(ratio, default=0.0)]}
    return out


def _compare(basin: Path, mk: Path, base: Path, ft: Path) -> dict:
    (bt, bc), (mt, mc) = _adapter(basin), _adapter(mk)
    bp, mp = _products(bt), _products(mt)
    methods = {m["module"]: m["svd"] for m in json.loads((basin / "extraction.json").read_text())["modules"]}
    errors = (_exact_errors(bp, base, ft), _exact_errors(mp, base, ft))
    whole = [sorted(k for k in t if ".lora_" not in k) for t in (bt, mt)]
    equal_whole = all(torch.equal(bt[k], mt[k]) for k in set(whole[0]) & set(whole[1]))
    return {"lora_modules": [len(bp), len(mp)], "modules_only_in_one": sorted(set(bp) ^ set(mp)),
            "by basin's SVD": _by_method(bp, mp, errors, methods),
            "whole tensors bit-identical": equal_whole,
            "saved_whole basin / mergekit": whole, "r, lora_alpha": [[bc["r"], bc["lora_alpha"]],
                                                                       [mc["r"], mc["lora_alpha"]]]}


def _run(args: argparse.Namespace, root: Path, hidden: int, layers: int, vocab: int, dtype: torch.dtype,
         rank: int) -> dict:
    """One model pair: both tools back to back, timed, then compared."""
    threads = str(args.threads)
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    root.mkdir()
    base, ft = _models(root, hidden, layers, vocab, dtype)
    runs = {"mergekit": timed([args.mergekit, "--model", str(ft), "--base-model", str(base), "--out-path",
                                str(root / "mk"), "--max-rank", str(rank), "--device", "cpu"], env),
            "basin": timed([sys.executable, "-m", "evaluations.cli", "extract-lora", str(ft), str(base),
                             str(root / "basin"), "--rank", str(rank), "--no-progress"], env)}
    return {"model": f"llama hidden {hidden}, {layers} layers, vocab {vocab}, {_parameters(base) / 1e6:.0f}M "
                     f"parameters, {str(dtype).removeprefix('torch.')}; rank {rank}",
            "threads": args.threads, "load_average": os.getloadavg(), "runs": runs,
            "speedup": round(runs["mergekit"]["seconds"] / runs["basin"]["seconds"], 2),
            "cpu speedup": round(runs["mergekit"]["cpu_seconds"] / runs["basin"]["cpu_seconds"], 2),
            "rss_ratio basin / mergekit": round(runs["basin"]["peak_rss_mb"] / runs["mergekit"]["peak_rss_mb"], 3),
            "basin vs mergekit": _compare(root / "basin", root / "mk", base, ft)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit", default="/work/peers/mk/bin/mergekit-extract-lora")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of both tools (see the docstring)")
    parser.add_argument("--no-float32-check", action="store_true",
                        help="skip the small float32 pair (where both tools' task vectors are exact)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if not Path(args.mergekit).exists():
        print(f"skipped: {args.mergekit} not found", file=sys.stderr)
        return {}
    result = {"benchmark": "extract_lora_vs_mergekit", "machine": platform.platform(), "cpus": os.cpu_count(),
              "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="basin-extract-") as tmp:
        result["bfloat16"] = _run(args, Path(tmp) / "bf16", args.hidden, args.layers, args.vocab, torch.bfloat16,
                                  args.rank)
        print(json.dumps(result, indent=1), file=sys.stderr)
        if not args.no_float32_check:
            result["float32"] = _run(args, Path(tmp) / "f32", 256, 2, 1000, torch.float32, 64)  # exact path
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "extract_lora.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=1))
    return result


def _parameters(folder: Path) -> int:
    import math

    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


if __name__ == "__main__":
    main()
