"""`basin moe` side by side with mergekit-moe 0.1.5 (its own venv, called as a subprocess; skipped without it).

A Llama base (bfloat16 on disk, as real checkpoints are) and three MLP fine-tunes, with a word tokenizer; the same
YAML is given to both tools for gate_mode hidden, cheap_embed and random. Compared: every tensor (mergekit
writes transformers 5's fused `mlp.experts.gate_up_proj` / `down_proj`; basin the per-expert Hub layout, fused
here the way transformers fuses it on load), the router rows, wall time, CPU time and peak RSS of each whole
process, both with `--threads` intra-op threads (default 1, as `extract_lora_vs_mergekit.py`: on a shared machine
multithreaded BLAS/LAPACK calls wait on descheduled threads; the number is in the JSON); each tool `--repeats`
times, the two alternating, best wall and best CPU time kept (the largest peak RSS). Also the import floor: CPU
seconds of processes that only import what each tool must (basin: torch for `random`, + the tokenizers library
for `cheap_embed` and for `hidden`, whose forward passes are basin's own `merging.moe.decoder`; + the base's
transformers modeling module for the transformers forward `hidden` falls back to on other architectures;
mergekit: its moe script): at this size most of both tools' time.

    python benchmarks/moe_vs_mergekit.py [--mergekit /work/peers/mk/bin/mergekit-moe] [--hidden 768 --layers 12]
        [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
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


FLOOR = {"torch (random)": "import torch", "+ tokenizers (cheap_embed, hidden)": "import torch, tokenizers",
         "+ the base's transformers modeling module (hidden's fallback forward)":
             "import torch, tokenizers, transformers.models.llama.modeling_llama"}
NOTE = ("No basin process here imports transformers: config.json written by merging.moe.hf_config, the loadability "
        "check structural, tokenizer.json read by the tokenizers library, and hidden's forward passes run by basin's "
        "own decoder (merging.moe.decoder: plain torch, layer by layer, the last layer not read; equal to "
        "transformers' in tests, bit for bit in float32), so torch's import is most of what is left in every mode. "
        "The third import floor is what the transformers forward (kept for architectures the decoder does not "
        "cover) would add.")


def load_note(loads: list[float], cpus: int) -> str:
    """Whether the machine was loaded while the runs were timed (1-minute load averages, one per gate mode)."""
    top = max(loads)
    state = "loaded" if top > 0.75 * cpus else "quiet"
    return (f" Timed {state}: 1-minute load average {min(loads):.1f}-{top:.1f} on {cpus} CPUs (other sessions' "
            "jobs share the machine); CPU-second ratios are the headline figures.")


def _import_profile(cmd: list[str], env: dict[str, str]) -> dict:
    """One `python -X importtime` run of a whole process: seconds spent importing torch, transformers, tokenizers
    (each with what it imports) and everything else (wall, from the interpreter's own import timer), next to the
    process's wall time."""
    import subprocess
    import time

    start = time.perf_counter()
    done = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], env=env, capture_output=True, text=True,
                          check=True)
    wall = time.perf_counter() - start
    return {"process_seconds": round(wall, 3), "import_seconds": import_split(done.stderr)}


def import_split(importtime: str) -> dict[str, float]:
    """Seconds of `-X importtime` output spent importing torch, transformers and tokenizers (each with what it
    imports: torch.distributed pulled in by transformers counts as transformers) and everything else."""
    rows = []
    for line in importtime.splitlines():
        if line.startswith("import time:") and "self [us]" not in line:
            _, cumulative, name = line[len("import time:"):].split("|")
            rows.append(((len(name) - len(name.lstrip())) // 2, name.strip().split(".")[0], int(cumulative) / 1e6))
    spent = {"torch": 0.0, "transformers": 0.0, "tokenizers": 0.0}
    total, stack = 0.0, []  # importtime lists children before parents: read backwards, parents first
    for depth, package, seconds in reversed(rows):
        while stack and stack[-1][0] >= depth:
            stack.pop()
        inside = bool(stack) and stack[-1][1]  # under an import of torch, transformers or tokenizers
        if package in spent and not inside:
            spent[package] += seconds
        total += seconds if depth == 0 else 0.0
        stack.append((depth, inside or package in spent))
    spent["other"] = total - sum(spent.values())
    return {k: round(v, 3) for k, v in sorted(spent.items())}


def _best(cmd_runs: list[dict]) -> dict:
    """Best wall and best CPU time of the repeats, largest peak RSS."""
    return {"seconds": min(r["seconds"] for r in cmd_runs), "cpu_seconds": min(r["cpu_seconds"] for r in cmd_runs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in cmd_runs), "repeats": len(cmd_runs)}


def _import_floor(mergekit: str, env: dict[str, str], repeats: int) -> dict:
    """CPU seconds (and wall, RSS) of processes that only import (see the module docstring), best of `repeats`."""
    cmds = {f"basin: {k}": [sys.executable, "-P", "-c", code] for k, code in FLOOR.items()}
    cmds["mergekit: import mergekit.scripts.moe"] = [str(Path(mergekit).parent / "python"), "-c",
                                                     "import mergekit.scripts.moe"]
    return {k: _best([timed(cmd, env) for _ in range(repeats)]) for k, cmd in cmds.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit", default="/work/peers/mk/bin/mergekit-moe")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of both tools (see the docstring)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each tool, alternating (best kept)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if not Path(args.mergekit).exists():
        print(f"skipped: {args.mergekit} not found", file=sys.stderr)
        return {}
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    basin = [sys.executable, "-P", "-m", "evaluations.cli", "moe"]  # -P: this tree (PYTHONPATH), whatever the cwd
    runs = []
    with tempfile.TemporaryDirectory(prefix="basin-moe-") as tmp:
        root = Path(tmp)
        folders = _models(root, args.hidden, args.layers)
        for mode in ("hidden", "cheap_embed", "random"):
            (root / f"{mode}.yml").write_text(_yaml(folders, mode))
            row: dict = {"gate_mode": mode}
            variants = ["float32", "bfloat16"] if mode == "hidden" else ["float32"]
            times: dict[str, list[dict]] = {}
            for rep in range(args.repeats):
                mk_out = root / f"mk-{mode}-{rep}"
                times.setdefault("mergekit", []).append(timed(
                    [args.mergekit, str(root / f"{mode}.yml"), str(mk_out), "--device", "cpu"], env))
                for dtype in variants:
                    out = root / f"basin-{mode}-{dtype}-{rep}"
                    key = "basin" if dtype == "float32" else f"basin --hidden-dtype {dtype}"
                    times.setdefault(key, []).append(timed(
                        [*basin, str(root / f"{mode}.yml"), str(out), "--no-progress", "--hidden-dtype", dtype], env))
                    if rep == 0:
                        row[f"{key} vs mergekit"] = _compare(_tensors(out), _tensors(mk_out))
                    shutil.rmtree(out)
                if rep:
                    shutil.rmtree(mk_out)
            for key, runs_of in times.items():
                row[key] = _best(runs_of)
            out = root / f"basin-{mode}-profile"
            row["basin import profile"] = _import_profile([*basin, str(root / f"{mode}.yml"), str(out),
                                                           "--no-progress"], env)
            shutil.rmtree(out)
            row["speedup"] = round(row["mergekit"]["seconds"] / row["basin"]["seconds"], 2)
            row["cpu speedup"] = round(row["mergekit"]["cpu_seconds"] / row["basin"]["cpu_seconds"], 2)
            row["rss_ratio basin / mergekit"] = round(row["basin"]["peak_rss_mb"] / row["mergekit"]["peak_rss_mb"], 3)
            row["load_average"] = os.getloadavg()
            runs.append(row)
            print(json.dumps(row, indent=1)[:1500], file=sys.stderr)
    result = {"benchmark": "moe_vs_mergekit", "model": f"llama hidden {args.hidden}, {args.layers} layers, "
              f"4 experts, bfloat16", "threads": args.threads, "machine": platform.platform(), "cpus": os.cpu_count(),
              "torch": torch.__version__, "repeats": args.repeats,
              "note": NOTE + load_note([r["load_average"][0] for r in runs], os.cpu_count() or 1),
              "import_floor": _import_floor(args.mergekit, env, args.repeats), "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "moe.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
