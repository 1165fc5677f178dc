"""`extract_lora(finetuned, base, out_dir)`: a PEFT LoRA adapter approximating finetuned - base (mergekit-extract-lora).

Order of work, so that mistakes cost seconds: open both checkpoints lazily; refuse an output that exists (without
`overwrite`) or would replace an input; plan from headers and config.json (`merging.extraction.plan`); then stream
one tensor pair at a time: difference, SVD (`merging.extraction.factorize`), factors appended to the adapter file
(`merging.io.adapter_writer`); last, adapter_config.json (ranks known only now), extraction.json and the model card
(README.md, `merging.extraction.card`), and the folder
renamed into place. The adapter loads with `peft.PeftModel.from_pretrained(base, out_dir)` and as `base+out_dir`
in a basin recipe.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from merging.extraction.factorize import EXACT_LIMIT, Factors, factorize
from merging.extraction.modules import EMBEDDING, module_kinds
from merging.extraction.plan import EXCLUDED, FULL, LORA, ExtractionPlan, Job, build_plan
from merging.io.checkpoint import Checkpoint, open_checkpoint, read_config
from merging.io.guard import guard_output, planned_output
from merging.io.lora import CONFIG_NAME, WEIGHTS_NAME
from taxonomy.errors import BasinError

PREFIX = "base_model.model."
REPORT_NAME = "extraction.json"
CARD_NAME = "README.md"


@dataclass
class ExtractionReport:
    """What was extracted: per LoRA module its rank and errors; the tensors saved whole, unchanged, excluded."""

    finetuned: str
    base: str
    out_dir: str | None
    settings: dict[str, Any]
    module_types: str
    modules: list[dict[str, Any]] = field(default_factory=list)
    full: list[dict[str, Any]] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    bytes_written: int = 0
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    content_hash: str | None = None
    dry_run: bool = False

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}

    def table(self) -> str:
        """One line per LoRA module (rank, relative error, kept energy), then the other lists."""
        lines = [f"{'module':48} {'kind':9} {'shape':>12} {'rank':>5} {'rel.err':>9} {'energy':>7}"]
        for m in self.modules:
            shape = "x".join(map(str, m["shape"]))
            err = "-" if m.get("relative_error") is None else f"{m['relative_error']:.2e}"
            kept = "-" if m.get("kept_energy") is None else f"{m['kept_energy']:.4f}"
            rank = m.get("rank") or "-"
            lines.append(f"{m['module'][:48]:48} {m['kind']:9} {shape:>12} {rank:>5} {err:>9} {kept:>7}")
        lines += [f"saved whole: {f['tensor']} ({f['reason']})" for f in self.full]
        lines += [f"not stored: {d['tensor']} ({d['reason']})" for d in self.dropped]
        if self.unchanged:
            lines.append(f"unchanged (equal in both, not stored): {len(self.unchanged)} tensor(s), e.g. "
                         f"{', '.join(self.unchanged[:3])}")
        if self.excluded:
            lines.append(f"excluded by --include/--exclude: {len(self.excluded)} tensor(s), e.g. "
                         f"{', '.join(self.excluded[:3])}")
        return "\n".join(lines)


def _check_settings(rank: int | str, energy: float | None, sv_epsilon: float) -> tuple[int | str, float]:
    if rank != "auto" and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise BasinError(f"--rank must be a positive integer or 'auto', got {rank!r}")
    if energy is not None and rank != "auto":
        raise BasinError("--energy is the target of --rank auto; pass --rank auto with it")
    energy = 0.9 if energy is None else float(energy)
    if not 0.0 < energy <= 1.0:
        raise BasinError(f"--energy must be in (0, 1], got {energy}")
    if not 0.0 <= float(sv_epsilon) < float("inf"):
        raise BasinError(f"--sv-epsilon must be a finite number >= 0, got {sv_epsilon}")
    return rank, energy


def extract_lora(finetuned: Any, base: Any, out_dir: str | Path | None, *, rank: int | str = 128,
                 energy: float | None = None, sv_epsilon: float = 0.0, embed_lora: bool = False,
                 include: list[str] | tuple[str, ...] = (), exclude: list[str] | tuple[str, ...] = (),
                 dry_run: bool = False, overwrite: bool = False, progress: bool = True, allow_pickle: bool = False,
                 exact_limit: int = EXACT_LIMIT) -> ExtractionReport:
    """Extract a PEFT LoRA adapter of `finetuned` - `base` into `out_dir` (see the module docstring).

    `rank`: an int (every module; larger than a matrix is an error) or "auto" (per module, the smallest rank whose
    kept energy reaches `energy`, default 0.9); `sv_epsilon`: singular values at or below it are dropped;
    `embed_lora`: embeddings and output heads as LoRA (else saved whole); `include` / `exclude`: regexes on module
    names. Returns the report (also written as OUT/extraction.json).
    """
    start = time.perf_counter()
    rank, energy = _check_settings(rank, energy, sv_epsilon)
    out = planned_output(out_dir, overwrite, dry_run)
    ft = open_checkpoint(finetuned, allow_pickle=allow_pickle, label=str(finetuned))
    bs = open_checkpoint(base, allow_pickle=allow_pickle, label=str(base))
    guard = guard_output(out, [finetuned, base], [ft, bs])
    kinds = module_kinds(read_config(bs) or read_config(ft), [*ft.names(), *bs.names()])
    plan = build_plan(ft, bs, kinds, rank=rank, embed_lora=embed_lora, include=include, exclude=exclude)
    settings = {"rank": rank, "energy": energy if rank == "auto" else None, "sv_epsilon": sv_epsilon,
                "embed_lora": embed_lora, "include": list(include), "exclude": list(exclude)}
    report = ExtractionReport(str(finetuned), str(base), None if out is None else str(out), settings, kinds.source)
    report.excluded = [j.name for j in plan.by_action(EXCLUDED)]
    if out is None:
        report.modules = [_module_entry(j, None) for j in plan.by_action(LORA)]
        report.full = [_full_entry(j) for j in plan.by_action(FULL)]
        report.dry_run, report.seconds = True, time.perf_counter() - start
        return report
    _write(plan, ft, bs, out, report, rank=rank, energy=energy, sv_epsilon=sv_epsilon, overwrite=overwrite,
           progress=progress, exact_limit=exact_limit, protect=guard)
    report.seconds = time.perf_counter() - start
    return report


def _write(plan: ExtractionPlan, ft: Checkpoint, bs: Checkpoint, out: Path, report: ExtractionReport, *,
           overwrite: bool, progress: bool, protect: set[Path], **svd: Any) -> None:
    """Stream every job into the adapter, then its config and the report; rename into place."""
    from merging.io.adapter_writer import SpoolWriter
    from merging.pipeline import _peak_rss_mb

    work = [j for j in plan.jobs if j.action != EXCLUDED]
    bar = _bar(len(work)) if progress else None
    with SpoolWriter(out, WEIGHTS_NAME, overwrite=overwrite, protect=protect) as writer:
        for job in work:
            if bar is not None:
                bar.set_postfix_str(job.name[-40:], refresh=False)
            _run_job(job, ft, bs, writer, report, **svd)
            if bar is not None:
                bar.update()
        if bar is not None:
            bar.close()
        if not report.modules and not report.full:
            raise BasinError(f"the fine-tune {ft.label} equals the base {bs.label} in every extracted tensor: "
                             "nothing to extract")
        writer.write_text(CONFIG_NAME, json.dumps(adapter_config(plan, report, bs), indent=2) + "\n")
        report.bytes_written, report.content_hash = writer.nbytes, writer.content_hash()
        report.peak_rss_mb = _peak_rss_mb()
        writer.write_text(REPORT_NAME, json.dumps(report.to_json(), indent=2) + "\n")
        writer.write_text(CARD_NAME, _card(report, ft, bs))
        writer.close()


def _card(report: ExtractionReport, ft: Checkpoint, bs: Checkpoint) -> str:
    from merging.extraction.card import adapter_card
    from merging.output.model_card import InputRecord
    from taxonomy.version import versions

    inputs = [InputRecord(ref, c.repo_id, c.revision) for ref, c in ((report.finetuned, ft), (report.base, bs))]
    return adapter_card(report, inputs, versions())


def _bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tensor", desc="extract-lora", file=sys.stderr, leave=False)


def _run_job(job: Job, ft: Checkpoint, bs: Checkpoint, writer: Any, report: ExtractionReport, *, rank: int | str,
             energy: float, sv_epsilon: float, exact_limit: int) -> None:
    """One tensor pair: factors for a LoRA job, the fine-tuned tensor for a full one; nothing if unchanged."""
    tuned, original = ft.get(job.name), bs.get(job.base_name)
    if torch.equal(tuned, original):
        report.unchanged.append(job.name if job.key in ("", job.name) else f"{job.name} (as {job.key})")
        return
    if job.action == FULL:
        writer.add(PREFIX + job.key, tuned.contiguous())
        report.full.append(_full_entry(job))
        return
    delta = tuned.to(torch.float32) - original.to(torch.float32)
    del tuned, original
    factors = factorize(delta.T if job.transpose else delta, rank, energy=energy, sv_epsilon=sv_epsilon,
                        out_dtype=ft.meta(job.name).dtype, seed_name=job.name, exact_limit=exact_limit)
    if factors.rank == 0:
        report.dropped.append({"tensor": job.name, "reason": f"every singular value <= --sv-epsilon {sv_epsilon}"})
        return
    kind = "lora_embedding" if job.kind == EMBEDDING else "lora"
    suffix = "" if job.kind == EMBEDDING else ".weight"
    writer.add(f"{PREFIX}{job.module}.{kind}_A{suffix}", factors.a)
    writer.add(f"{PREFIX}{job.module}.{kind}_B{suffix}", factors.b)
    report.modules.append(_module_entry(job, factors))


def _module_entry(job: Job, factors: Factors | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"module": job.module, "tensor": job.name, "kind": job.kind, "shape": list(job.shape)}
    if factors is not None:
        entry.update(rank=factors.rank, relative_error=factors.relative_error,
                     frobenius_error=factors.frobenius_error, kept_energy=factors.kept_energy, svd=factors.method)
    return entry


def _full_entry(job: Job) -> dict[str, Any]:
    return {"tensor": job.name, "key": job.key, "module": job.module, "reason": job.reason}


def adapter_config(plan: ExtractionPlan, report: ExtractionReport, base: Checkpoint) -> dict[str, Any]:
    """PEFT's LoraConfig as JSON: r = the largest rank, lora_alpha = r (scale 1), other ranks in rank_pattern and
    alpha_pattern (keys: escaped full module names, as PEFT's patterns are regexes), target_modules and
    modules_to_save by full module name (nothing else matches)."""
    ranks = {m["module"]: m["rank"] for m in report.modules}
    r = max(ranks.values(), default=1)
    pattern = {re.escape(m): k for m, k in ranks.items() if k != r}
    targets = set(ranks)
    to_save = sorted({f["module"] for f in report.full if f["module"] and f["module"] not in targets})
    config: dict[str, Any] = {
        "peft_type": "LORA", "base_model_name_or_path": report.base, "r": r, "lora_alpha": r,
        "rank_pattern": pattern, "alpha_pattern": dict(pattern), "target_modules": sorted(targets),
        "modules_to_save": to_save or None, "fan_in_fan_out": plan.fan_in_fan_out, "use_rslora": False,
        "use_dora": False, "lora_dropout": 0.0, "bias": "none", "inference_mode": True, "init_lora_weights": True,
    }
    if plan.kinds.causal_lm:
        config["task_type"] = plan.kinds.causal_lm
    if base.revision:
        config["revision"] = base.revision
    return config
