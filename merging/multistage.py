"""`merge_stages(recipe_file, out_dir)`: a multi-stage recipe (mergekit-multi) run stage by stage, each through
`merging.pipeline.merge`, in dependency order.

Every named stage is written to `intermediate_dir/<name>` (default: `<OUT>.stages` beside OUT); the output stage (the
unnamed document, else `stage`, else the last document) to OUT. With `stage`, only it and what it needs run. Each
stage's key is a sha256 of its recipe (stage names replaced by the content hash of that stage's output), the merge
options, basin's version and a fingerprint of every external input (size, safetensors header and sampled bytes of
each weights file; the whole of every other file of its folder: config, tokenizer). The keys, content hashes and
output fingerprints are recorded in `intermediate_dir/stages.json`; a stage runs again only when its key changed or
its output is missing or was changed on disk (mergekit-multi's `--lazy` looks only at whether the output exists).
A stage that reruns to the same bytes leaves its dependants' keys unchanged. OUT is replaced only when this record
says this recipe wrote it and it is unchanged since, or with `overwrite`. Every error in the file (names, cycles,
models that are neither a stage nor a path nor a Hub id) is raised before any model is opened.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merging.io.atomic import atomic_write_text
from merging.io.guard import check_output, protected_paths, refuse_existing
from merging.io.references import is_hub_id, parts
from merging.io.writer import output_path
from merging.pipeline import merge
from merging.recipe.stages import Stage, all_refs, load_stages, order, output_stage, with_models
from taxonomy.errors import BasinError, RecipeError

STATE_NAME = "stages.json"
OUTPUT_KEY = "<output>"
SAMPLES = 16  # 4 KiB samples per weights file, evenly spaced, besides its header
SAMPLE = 4096
WHOLE_LIMIT = 64 << 20  # other files up to this size are hashed whole


@dataclass
class StagesReport:
    """Per stage in the order run: name, folder, whether it ran (else it was up to date), content hash."""

    out_dir: str | None
    intermediate_dir: str
    stages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ran(self) -> list[str]:
        return [s["name"] for s in self.stages if s["ran"]]

    def to_json(self) -> dict[str, Any]:
        return {"out_dir": self.out_dir, "intermediate_dir": self.intermediate_dir, "stages": self.stages}


def default_intermediate_dir(out: Path) -> Path:
    return out.parent / f"{out.name}.stages"


def file_fingerprint(path: Path) -> str:
    """sha256 of a file's size and, for weights, its safetensors header and 16 sampled 4 KiB blocks; else its bytes
    (a file over 64 MiB: sampled too)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(f"{path.name}\0{size}\0".encode())
    with open(path, "rb") as f:
        if size <= WHOLE_LIMIT and path.suffix != ".safetensors":
            h.update(f.read())
            return h.hexdigest()
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 and path.suffix == ".safetensors" else 0
        h.update(head + (f.read(n) if n <= WHOLE_LIMIT else b""))
        for k in range(SAMPLES):
            h.update(os.pread(f.fileno(), SAMPLE, (size - SAMPLE) * k // max(SAMPLES - 1, 1) if size > SAMPLE else 0))
    return h.hexdigest()


def folder_fingerprint(path: Path) -> str | None:
    """A fingerprint of every regular file of a folder (or of one file); None if it does not exist."""
    if path.is_file():
        return file_fingerprint(path)
    if not path.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")):
        h.update(file_fingerprint(f).encode())
    return h.hexdigest()


def _check_models(stages: list[Stage], where: str) -> None:
    """Every model a stage names is a stage, an existing path, or a Hub id: else an error, before any read."""
    names = sorted(s.name for s in stages if s.name)
    for s in stages:
        for ref in all_refs(s.recipe):
            for part in parts(ref):
                if part in names or Path(os.path.expanduser(part)).exists() or is_hub_id(part):
                    continue
                raise RecipeError(f"{where}: stage {s.label}: model {part!r} is neither a stage of this file "
                                  f"(stages: {', '.join(names) or 'none'}) nor a model folder or Hub id")


def _read_state(folder: Path) -> dict[str, Any]:
    try:
        state = json.loads((folder / STATE_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _write_state(folder: Path, state: dict[str, Any]) -> None:
    atomic_write_text(folder / STATE_NAME, json.dumps(state, indent=2, sort_keys=True) + "\n")


def _external_fingerprint(part: str) -> str | None:
    """The fingerprint of the files one external model (or adapter) reads (a Hub id: as resolved in the cache)."""
    path = Path(os.path.expanduser(part))
    if not path.exists() and is_hub_id(part):
        from merging.io.hub import resolve

        path = resolve(part).path
    return folder_fingerprint(path)


def stage_key(stage: Stage, hashes: dict[str, str], options: dict[str, Any]) -> str:
    """See the module docstring: recipe (stages by content hash), options, version, external inputs."""
    from taxonomy.version import versions

    recipe = with_models(stage.recipe, lambda ref: f"stage:{ref}:{hashes[ref]}" if ref in hashes else ref)
    external = {part: _external_fingerprint(part) for ref in all_refs(stage.recipe) for part in parts(ref)
                if part not in hashes}
    blob = {"recipe": recipe.to_json(), "options": options, "versions": versions(), "inputs": external}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def merge_stages(recipe_file: str | Path, out_dir: str | Path | None, *, intermediate_dir: str | Path | None = None,
                 stage: str | None = None, overwrite: bool = False, dry_run: bool = False,
                 **options: Any) -> StagesReport:
    """Run a multi-stage recipe (see the module docstring); `options` go to every `merging.pipeline.merge` call
    (dtype, shard_size, device, compute_dtype, allow_pickle, allow_mixed_architectures, progress)."""
    path = Path(recipe_file)
    stages = load_stages(path)
    run = order(stages, stage)
    final = output_stage(stages, stage)
    _check_models(stages, str(path))
    if out_dir is None and not dry_run:
        raise BasinError("an output folder is required unless dry_run")
    out = output_path(out_dir) if out_dir is not None else None
    inter = output_path(intermediate_dir) if intermediate_dir else default_intermediate_dir(out or Path("out"))
    folders = {s.name: (out if s is final else inter / str(s.name)) for s in run}
    for folder in folders.values():
        if folder is not None:
            check_output(folder, protected_paths([path]))
    report = StagesReport(None if out is None else str(out), str(inter))
    if dry_run:
        report.stages = [{"name": s.label, "folder": str(folders[s.name]), "ran": False, "depends": s.depends}
                         for s in run]
        return report
    inter.mkdir(parents=True, exist_ok=True)
    state = _read_state(inter)
    ours = state.get(OUTPUT_KEY, {}).get("path") == str(out) and folder_fingerprint(out) == state.get(
        OUTPUT_KEY, {}).get("fingerprint")
    if not (ours or overwrite):
        refuse_existing(out, overwrite)
    hashes: dict[str, str] = {}
    merge_options = {k: v for k, v in options.items() if k not in ("progress", "resume")}
    for s in run:
        entry = _run_stage(s, folders[s.name], s is final, hashes, state, merge_options, options)
        report.stages.append(entry)
        _write_state(inter, state)
    return report


def _run_stage(s: Stage, folder: Path, is_final: bool, hashes: dict[str, str], state: dict[str, Any],
               merge_options: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """Merge one stage unless its recorded key and output fingerprint still hold; record what it wrote."""
    record_name = OUTPUT_KEY if is_final else str(s.name)
    key = stage_key(s, hashes, merge_options)
    record = state.get(record_name) or {}
    fresh = (record.get("key") == key and record.get("path") == str(folder)
             and record.get("fingerprint") is not None and folder_fingerprint(folder) == record["fingerprint"])
    if not fresh:
        recipe = with_models(s.recipe, lambda ref: str(state[ref]["path"]) if ref in hashes else ref)
        result = merge(recipe, folder, overwrite=True, **options)
        record = {"key": key, "path": str(folder), "content_hash": result.content_hash,
                  "fingerprint": folder_fingerprint(folder)}
        state[record_name] = record
    if s.name is not None:
        hashes[s.name] = record["content_hash"]
        state[s.name] = record
    return {"name": s.label, "folder": str(folder), "ran": not fresh, "content_hash": record["content_hash"],
            "depends": s.depends}
