"""`basin moe` side by side with mergekit-moe 0.1.5 (its own venv, called as a subprocess; skipped without it).

A Llama base (bfloat16 on disk, as real checkpoints are) and three MLP fine-tunes, with a word tokenizer; the same
YAML is given to both tools for gate_mode hidden, cheap_embed and random. Compared: every tensor (mergekit
writes transformers 5's fused `mlp.experts.gate_up_proj` / `down_proj`; basin the per-expert Hub layout, fused
here the way transformers fuses it on load), the router rows, wall time, CPU time and peak RSS of each whole
process, both with `--threads` intra-op threads (default 1, as `extract_lora_vs_mergekit.py`: on a shared machine
multithreaded BLAS/LAPACK calls wait on descheduled threads; the number is in the JSON). Also the import floor:
CPU seconds of processes that only import what each tool must (torch; + transformers' config classes, which write
the output's config.json; + the MoE modeling class, which checks the output loads and runs the `hidden` forward
passes; mergekit's moe script): at this size nearly all of both tools' time.

    python benchmarks/moe_vs_mergekit.py [--mergekit /work/peers/mk/bin/mergekit-moe] [--hidden 768 --layers 12]
        [--threads 1]
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
WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(253)]
PROMPTS = [(["w1 w2 w3", "w4 w5"], []), (["w10 w11", "w12"], ["w30 w31"]), (["w20 w21 w22"], ["w40"]),
           (["w50", "w51 w52"], [])]


def _models(root: Path, hidden: int, layers: int) -> list[Path]:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, dtype="bfloat16")
    folders = []
    for k in range(5):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        if k:
            g = torch.Generator().manual_seed(k)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if ".mlp." in name:
                        p.add_(0.02 * torch.randn(p.shape, generator=g).to(p.dtype))
        folders.append(root / f"m{k}")
        model.save_pretrained(folders[-1])
        tokenizer.save_pretrained(folders[-1])
    return folders


def _yaml(folders: list[Path], mode: str) -> str:
    import yaml

    experts = [{"source_model": str(f), "positive_prompts": p, **({"negative_prompts": n} if n else {})}
               for f, (p, n) in zip(folders[1:], PROMPTS)]
    return yaml.safe_dump({"base_model": str(folders[0]), "gate_mode": mode, "dtype": "bfloat16",
                           "experts_per_token": 2, "experts": experts})


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _fused(basin: dict[str, torch.Tensor], experts: int, layers: int) -> dict[str, torch.Tensor]:
    """basin's per-expert Mixtral tensors fused as transformers 5 fuses them on load (mergekit writes these)."""
    out = {n.replace(".block_sparse_moe.", ".mlp."): t for n, t in basin.items() if ".experts." not in n}
    for i in range(layers):
        p = f"model.layers.{i}.block_sparse_moe.experts"
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([basin[f"{p}.{k}.w1.weight"], basin[f"{p}.{k}.w3.weight"]]) for k in range(experts)])
        out[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack([basin[f"{p}.{k}.w2.weight"]
                                                                       for k in range(experts)])
    return out


def _compare(basin: dict[str, torch.Tensor], mk: dict[str, torch.Tensor]) -> dict:
    fused = _fused(basin, len(PROMPTS), 1 + max(int(n.split(".")[2]) for n in basin if n.startswith("model.layers")))
    names = sorted(set(fused) | set(mk))
    only = sorted(set(fused) ^ set(mk))
    differ = {}
    for n in names:
        if n in fused and n in mk and not torch.equal(fused[n], mk[n]):
            a, b = fused[n].double(), mk[n].double()
            differ[n] = round(float((a - b).norm() / b.norm().clamp(min=1e-30)), 6)
    routers = [n for n in differ if n.endswith("mlp.gate.weight")]
    return {"tensors": len(names), "only_in_one": only, "identical": len(names) - len(only) - len(differ),
            "differ_rel_fro": differ, "differing_are_routers_only": sorted(routers) == sorted(differ)}


CONFIG_IMPORT = "import torch, transformers.models.llama.configuration_llama"
FLOOR = {"torch": "import torch", "+ transformers config": CONFIG_IMPORT,
         "+ modeling (loadability check, hidden forward)":
             CONFIG_IMPORT + ", transformers.models.mixtral.modeling_mixtral"}


def _import_floor(mergekit: str, env: dict[str, str]) -> dict:
    """CPU seconds (and wall, RSS) of processes that only import (see the module docstring)."""
    out = {f"basin: {k}": timed([sys.executable, "-c", code], env) for k, code in FLOOR.items()}
    out["mergekit: import mergekit.scripts.moe"] = timed([str(Path(mergekit).parent / "python"), "-c",
                                                          "import mergekit.scripts.moe"], env)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit", default="/work/peers/mk/bin/mergekit-moe")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of both tools (see the docstring)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if not Path(args.mergekit).exists():
        print(f"skipped: {args.mergekit} not found", file=sys.stderr)
        return {}
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    basin = [sys.executable, "-m", "evaluations.cli", "moe"]
    runs = []
    with tempfile.TemporaryDirectory(prefix="basin-moe-") as tmp:
        root = Path(tmp)
        folders = _models(root, args.hidden, args.layers)
        for mode in ("hidden", "cheap_embed", "random"):
            (root / f"{mode}.yml").write_text(_yaml(folders, mode))
            row: dict = {"gate_mode": mode}
            row["mergekit"] = timed([args.mergekit, str(root / f"{mode}.yml"), str(root / f"mk-{mode}"),
                                      "--device", "cpu"], env)
            for dtype in (["float32", "bfloat16"] if mode == "hidden" else ["float32"]):
                out = root / f"basin-{mode}-{dtype}"
                key = "basin" if dtype == "float32" else f"basin --hidden-dtype {dtype}"
                row[key] = timed([*basin, str(root / f"{mode}.yml"), str(out), "--no-progress",
                                   "--hidden-dtype", dtype], env)
                row[f"{key} vs mergekit"] = _compare(_tensors(out), _tensors(root / f"mk-{mode}"))
            row["speedup"] = round(row["mergekit"]["seconds"] / row["basin"]["seconds"], 2)
            row["cpu speedup"] = round(row["mergekit"]["cpu_seconds"] / row["basin"]["cpu_seconds"], 2)
            row["rss_ratio basin / mergekit"] = round(row["basin"]["peak_rss_mb"] / row["mergekit"]["peak_rss_mb"], 3)
            row["load_average"] = os.getloadavg()
            runs.append(row)
            print(json.dumps(row, indent=1)[:1500], file=sys.stderr)
    result = {"benchmark": "moe_vs_mergekit", "model": f"llama hidden {args.hidden}, {args.layers} layers, "
              f"4 experts, bfloat16", "threads": args.threads, "machine": platform.platform(), "cpus": os.cpu_count(),
              "torch": torch.__version__, "import_floor": _import_floor(args.mergekit, env), "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "moe.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
