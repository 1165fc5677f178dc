"""`basin extract-lora` side by side with mergekit-extract-lora 0.1.5 (its own venv, a subprocess; skipped without
it), on a realistic-size Llama-shaped random model (default hidden 768, 12 layers, vocab 32000: ~125M parameters,
bfloat16 on disk) so that start-up does not dominate, and a fine-tune of it (every tensor moved by seeded noise).

Measured: wall time and peak RSS of each whole process (GNU time's %M, else rusage of the children), run back to
back under the same conditions. Compared per LoRA module: the products B @ A (the factors themselves differ by the
SVD's sign choice: basin fixes each singular vector's sign, mergekit keeps LAPACK's), as the relative Frobenius
difference of basin's from mergekit's; the modules each tool saves whole; rank and alpha.

    python benchmarks/extract_lora_vs_mergekit.py [--mergekit /work/peers/mk/bin/mergekit-extract-lora]
        [--hidden 768 --layers 12 --vocab 32000 --rank 32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _models(root: Path, hidden: int, layers: int, vocab: int) -> tuple[Path, Path]:
    """base and fine-tune folders: safetensors written straight from seeded tensors (no model built)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 192,
                      tie_word_embeddings=False, dtype="bfloat16", architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in LlamaForCausalLM(cfg).state_dict().items()}
    folders = []
    for k, name in enumerate(("base", "ft")):
        g = torch.Generator().manual_seed(0)
        state = {n: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for n, s in sorted(shapes.items())}
        if k:
            g = torch.Generator().manual_seed(1)
            state = {n: (t.float() + 0.002 * torch.randn(t.shape, generator=g)).to(torch.bfloat16)
                     for n, t in state.items()}
        folder = root / name
        folder.mkdir()
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        cfg.save_pretrained(folder)
        folders.append(folder)
    return folders[0], folders[1]


def _timed(cmd: list[str], env: dict[str, str]) -> dict:
    """Wall seconds and peak RSS (MB) of one whole process."""
    gnu = Path("/usr/bin/time").exists()
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd] if gnu else cmd, capture_output=True, text=True,
                          env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {proc.stderr[-2000:]}")
    rss = (int(proc.stderr.strip().splitlines()[-1]) / 1024 if gnu
           else resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    return {"seconds": round(seconds, 3), "peak_rss_mb": round(rss, 1)}


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


def _compare(basin: Path, mk: Path) -> dict:
    (bt, bc), (mt, mc) = _adapter(basin), _adapter(mk)
    bp, mp = _products(bt), _products(mt)
    rel = {m: float((bp[m] - mp[m]).norm() / mp[m].norm().clamp_min(1e-30)) for m in sorted(set(bp) & set(mp))}
    whole = [sorted(k for k in t if ".lora_" not in k) for t in (bt, mt)]
    return {"lora_modules": [len(bp), len(mp)], "modules_only_in_one": sorted(set(bp) ^ set(mp)),
            "product_rel_fro_max": max(rel.values(), default=0.0),
            "product_rel_fro_median": sorted(rel.values())[len(rel) // 2] if rel else 0.0,
            "saved_whole basin / mergekit": whole, "r, lora_alpha": [[bc["r"], bc["lora_alpha"]],
                                                                       [mc["r"], mc["lora_alpha"]]]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit", default="/work/peers/mk/bin/mergekit-extract-lora")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if not Path(args.mergekit).exists():
        print(f"skipped: {args.mergekit} not found", file=sys.stderr)
        return {}
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with tempfile.TemporaryDirectory(prefix="basin-extract-") as tmp:
        root = Path(tmp)
        base, ft = _models(root, args.hidden, args.layers, args.vocab)
        params = _parameters(base)
        runs = {"mergekit": _timed([args.mergekit, "--model", str(ft), "--base-model", str(base), "--out-path",
                                    str(root / "mk"), "--max-rank", str(args.rank), "--device", "cpu"], env),
                "basin": _timed([sys.executable, "-m", "evaluations.cli", "extract-lora", str(ft), str(base),
                                 str(root / "basin"), "--rank", str(args.rank), "--no-progress"], env)}
        result = {"benchmark": "extract_lora_vs_mergekit",
                  "model": f"llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
                           f"{params / 1e6:.0f}M parameters, bfloat16; rank {args.rank}",
                  "machine": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
                  "torch": torch.__version__, "runs": runs,
                  "speedup": round(runs["mergekit"]["seconds"] / runs["basin"]["seconds"], 2),
                  "rss_ratio basin / mergekit": round(runs["basin"]["peak_rss_mb"] / runs["mergekit"]["peak_rss_mb"],
                                                      3),
                  "basin vs mergekit": _compare(root / "basin", root / "mk")}
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
