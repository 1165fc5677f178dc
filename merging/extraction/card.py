"""README.md of an extracted adapter: its base and fine-tune, the settings, and per module the rank and errors.

Deterministic: a function of the report's extracted content only (no time, memory, host or output path), written
with the errors rounded to 4 significant digits, so a rerun of one extraction writes the same bytes.
"""

from __future__ import annotations

import statistics
from typing import Any

from merging.output.model_card import InputRecord, card_text, front_matter


def _settings(settings: dict[str, Any]) -> list[str]:
    rank = settings["rank"]
    lines = [f"- rank: {rank}" + (f" (per module: the smallest keeping {settings['energy']} of the energy)"
                                  if rank == "auto" else " (every module)"),
             f"- singular values dropped at or below: {settings['sv_epsilon']}",
             f"- embeddings and output heads: {'LoRA' if settings['embed_lora'] else 'saved whole'}"]
    for key in ("include", "exclude"):
        if settings[key]:
            lines.append(f"- {key}: " + ", ".join(f"`{p}`" for p in settings[key]))
    return lines


def _modules(modules: list[dict[str, Any]]) -> list[str]:
    if not modules:
        return ["No LoRA module (every changed tensor is saved whole)."]
    errors = [m["relative_error"] for m in modules]
    lines = [f"{len(modules)} modules; relative Frobenius error ||delta - B A|| / ||delta||: min {min(errors):.4g}, "
             f"median {statistics.median(errors):.4g}, max {max(errors):.4g}.", "",
             "| module | kind | shape | rank | relative error | kept energy |", "|---|---|---|---|---|---|"]
    for m in modules:
        shape = "x".join(map(str, m["shape"]))
        lines.append(f"| `{m['module']}` | {m['kind']} | {shape} | {m['rank']} | {m['relative_error']:.4g} | "
                     f"{m['kept_energy']:.4g} |")
    return lines


def _other(report: Any) -> list[str]:
    lines = [f"- saved whole: `{f['tensor']}` ({f['reason']})" for f in report.full]
    lines += [f"- not stored: `{d['tensor']}` ({d['reason']})" for d in report.dropped]
    if report.unchanged:
        lines.append(f"- unchanged (equal in both, not stored): {len(report.unchanged)} tensor(s)")
    if report.excluded:
        lines.append(f"- excluded by include / exclude: {len(report.excluded)} tensor(s)")
    return lines or ["- none"]


def adapter_card(report: Any, inputs: list[InputRecord], versions: dict[str, str]) -> str:
    """The card of an `ExtractionReport` (after extraction: ranks and errors known); `inputs`: fine-tune, base."""
    intro = (f"A PEFT LoRA adapter approximating `{report.finetuned}` minus `{report.base}` (truncated SVD per "
             f"module), extracted with basin {versions.get('basin', '')} (`basin extract-lora`). Load it with "
             f"`PeftModel.from_pretrained(base, folder)`, or as `base+folder` in a basin recipe.")
    front = front_matter(None, inputs[1:], library="peft", tags=("lora", "extract-lora", "basin"))
    sections = [("Settings", _settings(report.settings)), ("Modules", _modules(report.modules)),
                ("Other tensors", _other(report))]
    return card_text(front, f"LoRA of {report.finetuned} - {report.base}", intro, inputs, sections,
                     report.content_hash or "", versions)
