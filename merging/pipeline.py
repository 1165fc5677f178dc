"""`merging.merge(recipe, out_dir)`: the Python API behind `basin merge`.

Order of work, so that mistakes cost seconds: parse and check the recipe (no I/O); refuse an
existing output; resolve every model reference (Hub ids first fetch only config, index and
tokenizer files); open checkpoints lazily and build the plan from headers, config.json and
tokenizer files (names, shapes, parameters, architectures, vocabularies);
only then stream tensors through the engine into the writer; write config.json (dtype, layer
count, vocab_size, tie_word_embeddings patched) and the output tokenizer (copied, or built by the
tokenizer rule, see `merging.plan.vocab`); write the model card; rename the output into place.
"""

from __future__ import annotations

import json
import resource
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merging.dtypes import MERGE_DTYPES, canonical
from merging.io.checkpoint import Checkpoint, open_checkpoint
from merging.io.guard import OutputLock, check_output, guard_output, planned_output
from merging.io.writer import (
    DEFAULT_SHARD_SIZE,
    ShardWriter,
    old_folder,
    output_path,
    parse_size,
    prepare_output,
    replace_output,
    temp_folder,
)
from merging.output.finish import finish_output
from merging.output.model_card import InputRecord
from merging.plan.tensors import MergePlan, build_plan
from merging.recipe.schema import Recipe
from taxonomy.errors import BasinError


@dataclass
class MergeReport:
    out_dir: str | None
    method: str
    tensors: int
    bytes_written: int
    seconds: float
    merge_seconds: float
    peak_rss_mb: float
    content_hash: str | None
    shards: list[str]
    inputs: list[InputRecord]
    dry_run: bool = False
    resumed_tensors: int = 0
    sweep: list[dict[str, Any]] | None = None  # per grid point: folder, values, content_hash (or plan)
    plan: MergePlan | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "out_dir": self.out_dir, "method": self.method, "tensors": self.tensors,
            "bytes_written": self.bytes_written, "seconds": round(self.seconds, 4),
            "merge_seconds": round(self.merge_seconds, 4), "peak_rss_mb": round(self.peak_rss_mb, 1),
            "content_hash": self.content_hash, "shards": self.shards, "inputs": [i.to_json() for i in self.inputs],
            "dry_run": self.dry_run, "resumed_tensors": self.resumed_tensors,
            "sweep": None if self.sweep is None else [{k: v for k, v in s.items() if k != "plan"} for s in self.sweep],
        } | ({"notes": self.notes} if self.notes else {})

    @property
    def notes(self) -> list[str]:
        """The planner's notes (tensors left out, and why)."""
        return list(self.plan.notes) if self.plan is not None else []


def load_recipe(recipe: Recipe | dict | str | Path) -> Recipe:
    if isinstance(recipe, Recipe):
        recipe.validate()
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    return Recipe.from_yaml(recipe)


def _peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 / 1024 if sys.platform == "darwin" else rss / 1024


def open_inputs(recipe: Recipe, allow_pickle: bool = False,
                validate: Callable[[dict[str, Checkpoint]], object] | None = None) -> dict[str, Checkpoint]:
    """Resolve and open every model the recipe names.

    Hub ids fetch config, index and tokenizer files first (a wrong id fails at once). When some
    Hub model's weights are not cached yet and we are online, `validate` (e.g. `build_plan`)
    first runs on checkpoints made of the Hub's safetensors headers, so a name or shape mismatch
    fails before any weights are downloaded.
    """
    from huggingface_hub import constants

    from merging.io.hub import remote_headers, resolve, weights_cached
    from merging.io.references import hub_id, is_hub_id, parts

    refs = recipe.model_refs()
    remote: dict[str, Checkpoint] = {}
    for ref in refs + ([recipe.tokenizer_ref] if recipe.tokenizer_ref else []):
        for part in parts(ref):
            if Path(part).expanduser().exists():
                continue
            if not is_hub_id(part):
                raise BasinError(f"{part}: no such file or folder (model reference in the recipe)")
            folder = resolve(part, allow_pickle=allow_pickle, weights=False).path
            if part == ref and ref in refs and not constants.HF_HUB_OFFLINE and not weights_cached(folder):
                repo, rev = hub_id(ref)  # type: ignore[misc]  # is_hub_id(ref) above
                remote[ref] = remote_headers(repo, rev, ref)
                remote[ref].folder = folder  # config and tokenizer files are already here
    if remote and validate is not None:
        validate({ref: remote.get(ref) or open_checkpoint(ref, allow_pickle=allow_pickle, label=ref)
                  for ref in refs})
    return {ref: open_checkpoint(ref, allow_pickle=allow_pickle, label=ref) for ref in refs}


def _build_plan(recipe: Recipe, ckpts: dict[str, Checkpoint], out_dtype: str | None = None, *,
                allow_mixed_architectures: bool = False) -> MergePlan:
    """`merging.plan.tensors.build_plan`, with the recipe's low-precision compute dtype (None: float32) recorded."""
    plan = build_plan(recipe, ckpts, out_dtype, allow_mixed_architectures=allow_mixed_architectures)
    plan.compute_dtype = recipe.low_compute_dtype
    return plan


def _align(recipe: Recipe, ckpts: dict[str, Checkpoint]) -> dict[str, Checkpoint]:
    options = dict(recipe.align or {})
    method = options.get("method")
    try:
        from merging.alignment import align_checkpoints
    except ImportError:
        raise BasinError(f"align: {method}: alignment is not available in this build") from None
    refs = list(ckpts)
    reference = options.pop("reference", None) or recipe.base_model or refs[0]
    if reference not in ckpts:
        raise BasinError(f"align.reference {reference!r} is not one of the recipe's models")
    aligned = align_checkpoints([ckpts[r] for r in refs], refs.index(reference), options)
    return dict(zip(refs, aligned))


SAMPLE = 4096  # bytes: resume_key hashes this much at the start, middle and end of every input tensor


def resume_key(plan: MergePlan, ckpts: dict[str, Checkpoint]) -> str | None:
    """A fingerprint of the plan, the versions and the inputs' content; None for in-memory inputs.

    Per input file: its size, its whole safetensors header (names, dtypes, shapes, offsets, metadata) and,
    per tensor, 4 KiB at its start, middle and end. Paths and mtimes are not trusted: a file replaced in
    place by other weights of the same size, its mtime restored (`cp -p`, `rsync -t`), changes the key.
    """
    import hashlib

    from merging.io.safetensors_format import SafetensorsCheckpoint
    from taxonomy.version import versions

    h = hashlib.sha256(json.dumps([plan.to_json(), versions()], sort_keys=True).encode())
    for ref in plan.inputs:
        ckpt = ckpts[ref]
        if not isinstance(ckpt, SafetensorsCheckpoint):
            return None
        for path in sorted({ckpt.file_of(n) for n in ckpt.names()}):
            h.update(_file_fingerprint(path, ckpt))
    return h.hexdigest()


def _file_fingerprint(path: Path, ckpt: Any) -> bytes:
    """sha256 of one input file's size, header and sampled tensor bytes (see `resume_key`)."""
    import hashlib
    import os

    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = int.from_bytes(f.read(8), "little")
            h.update(f"{size}\0".encode() + f.read(n))
            for name in sorted(ckpt.names()):
                if ckpt.file_of(name) != path:
                    continue
                offset, nbytes = ckpt.data_offset(name), ckpt.meta(name).nbytes
                for at in sorted({0, max(nbytes // 2 - SAMPLE // 2, 0), max(nbytes - SAMPLE, 0)}):
                    h.update(os.pread(f.fileno(), min(SAMPLE, nbytes), offset + at))
    except OSError as err:
        raise BasinError(f"{path}: cannot read ({err.strerror})") from None
    return h.digest()


def protected(recipe_or_path: Any, recipe: Recipe, ckpts: dict[str, Checkpoint], out: Path | None = None) -> set[Path]:
    """The paths a merge reads and its output may not replace (`merging.io.guard.guard_output`: `out` is checked)."""
    refs = recipe.model_refs() + ([recipe.tokenizer_ref] if recipe.tokenizer_ref else [])
    return guard_output(out, refs, ckpts.values(), files=[recipe_or_path])


def _check_output(recipe: Recipe, ckpts: dict[str, Checkpoint], plan: MergePlan, dtype: str | None,
                  progress: bool) -> None:
    """Refuse, before any tensor is merged, a plan whose output transformers would not load with its config."""
    from merging.output.config import check_plan

    note = check_plan(recipe, ckpts, plan, dtype)
    if note and progress:
        print(f"note: {note}", file=sys.stderr)


def merge(
    recipe_or_path: Recipe | dict | str | Path,
    out_dir: str | Path | None,
    *,
    overwrite: bool = False,
    device: str = "cpu",
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    dtype: str | None = None,
    allow_pickle: bool = False,
    dry_run: bool = False,
    progress: bool = True,
    resume: bool = True,
    allow_mixed_architectures: bool = False,
    compute_dtype: str | None = None,
    inputs: dict[str, Checkpoint] | None = None,
) -> MergeReport:
    """Merge the checkpoints a recipe names into `out_dir` (sharded safetensors + config + card).

    With `resume` (default), a merge interrupted by Ctrl-C or a killed process continues where
    it stopped when rerun with the same recipe, inputs (by content: see `resume_key`) and options:
    finished tensors whose bytes still hash as journalled are kept. The output may not be, or contain,
    an input, the recipe or the current folder (`merging.io.guard.check_output`), with or without
    `overwrite`. `allow_mixed_architectures` (or the recipe key of
    that name) merges inputs whose config.json architectures differ, which is refused otherwise.
    `compute_dtype` (or the recipe key): float16/bfloat16 reproduce mergekit's low-precision arithmetic.
    `inputs`: checkpoints already opened by reference (`open_inputs`), e.g. a search worker's, reused merge after
    merge; used when it holds every reference of the recipe.
    """
    start = time.perf_counter()
    recipe = load_recipe(recipe_or_path)
    if compute_dtype is not None:
        recipe.compute_dtype = compute_dtype
        recipe.validate("--compute-dtype")
    if dtype is not None:
        if canonical(dtype) is None:
            raise BasinError(f"--dtype must be one of {', '.join(MERGE_DTYPES)}; got {dtype!r}")
        dtype = canonical(dtype)
    out_dtype = dtype or canonical(recipe.out_dtype or recipe.dtype)
    size = parse_size(shard_size)
    from merging.engine import resolve_device

    resolve_device(device)  # an unknown or absent device fails before any input is opened
    out = planned_output(out_dir, overwrite, dry_run)
    points = recipe.grid_points()
    mixed = {"allow_mixed_architectures": allow_mixed_architectures}
    if inputs is not None and all(ref in inputs for ref in recipe.model_refs()):
        ckpts = {ref: inputs[ref] for ref in recipe.model_refs()}
    else:
        ckpts = open_inputs(recipe, allow_pickle=allow_pickle,
                            validate=lambda headers: [_build_plan(r, headers, out_dtype, **mixed) for _, r in points])
    guard = protected(recipe_or_path, recipe, ckpts, out)  # out checked before alignment or planning reads weights
    if len(points) > 1:
        return _sweep(points, ckpts, out, out_dtype, size, overwrite=overwrite, device=device, dry_run=dry_run,
                      progress=progress, start=start, mixed=allow_mixed_architectures, protect=guard)
    plan = _build_plan(recipe, ckpts, out_dtype, **mixed)  # every check from headers, before any data is read
    if recipe.align and not dry_run:  # alignment reads weights: not in a dry run
        ckpts = _align(recipe, ckpts)
        plan = _build_plan(recipe, ckpts, out_dtype, **mixed)
    _check_output(recipe, ckpts, plan, out_dtype, progress)
    inputs = [InputRecord(ref, ckpts[ref].repo_id, ckpts[ref].revision) for ref in plan.inputs]
    if dry_run:
        return MergeReport(None, plan.method, len(plan.tensors), 0, time.perf_counter() - start, 0.0,
                           _peak_rss_mb(), None, [], inputs, dry_run=True, plan=plan)
    assert out is not None
    from merging.engine import run_plan
    from merging.methods.catalog import get_method
    from merging.output.task_files import recording_task_outputs

    layout = [(tp.name, tp.shape, tp.out_dtype) for tp in plan.tensors]
    method = get_method(plan.method)
    key = resume_key(plan, ckpts) if resume and method.task_outputs is None else None
    with ShardWriter(out, layout, size, overwrite=overwrite, resume_key=key, protect=guard) as writer:
        if writer.done and progress:
            print(f"resuming: {len(writer.done)} of {len(layout)} tensors already written", file=sys.stderr)
        with recording_task_outputs(method, plan, writer):
            stats = run_plan(plan, [ckpts[r] for r in plan.inputs], writer.add, device=device, progress=progress,
                             skip=writer.done)
        digest = finish_output(writer, recipe, ckpts, plan, inputs, out_dtype)
    return MergeReport(str(out), plan.method, len(plan.tensors), stats.bytes_written, time.perf_counter() - start,
                       stats.seconds, _peak_rss_mb(), digest, list(writer.shard_names), inputs,
                       resumed_tensors=len(writer.done), plan=plan)


def point_folder(index: int, values: dict[str, Any]) -> str:
    """A sweep point's folder name, e.g. p01-weight=0.5 (characters outside [A-Za-z0-9._=-] become _)."""
    import re

    label = ",".join(f"{k}={v}" for k, v in values.items())
    return re.sub(r"[^A-Za-z0-9._=,-]", "_", f"p{index:02d}-{label}")[:120]


def _sweep(points: list[tuple[dict[str, Any], Recipe]], ckpts: dict[str, Checkpoint], out: Path | None,
           out_dtype: str | None, size: int, *, overwrite: bool, device: str, dry_run: bool, progress: bool,
           start: float, mixed: bool = False, protect: set[Path] | None = None) -> MergeReport:
    """One output per grid point under `out`, sharing each tensor's reads across the points."""
    from merging.engine import run_plans

    plans = [_build_plan(r, ckpts, out_dtype, allow_mixed_architectures=mixed) for _, r in points]
    from merging.methods.catalog import get_method

    if get_method(plans[0].method).task_outputs is not None:
        raise BasinError(f"{plans[0].method}: writes per-task outputs beside the merge and cannot run as a sweep; "
                         "merge each parameter value separately")
    for (_, r), p in zip(points, plans):
        _check_output(r, ckpts, p, out_dtype, progress)
    if any(r.align for _, r in points):
        raise BasinError("a sweep cannot be combined with align: yet; align first, then sweep the aligned models")
    inputs = [InputRecord(ref, ckpts[ref].repo_id, ckpts[ref].revision) for ref in plans[0].inputs]
    names = [point_folder(k, values) for k, (values, _) in enumerate(points)]
    sweep = [{"folder": n, "values": v} for n, (v, _) in zip(names, points)]
    if dry_run:
        return MergeReport(None, plans[0].method, len(plans[0].tensors), 0, time.perf_counter() - start, 0.0,
                           _peak_rss_mb(), None, [], inputs, dry_run=True, plan=plans[0],
                           sweep=[dict(s, plan=p) for s, p in zip(sweep, plans)])
    assert out is not None
    out = output_path(out)
    check_output(out, protect or (), siblings=[temp_folder(out), old_folder(out)])
    lock = OutputLock(out)
    writers: list[ShardWriter] = []
    tmp = None
    try:
        tmp = prepare_output(out, overwrite, protect=protect or ())
        for name, plan in zip(names, plans):
            writers.append(ShardWriter(tmp / name, [(t.name, t.shape, t.out_dtype) for t in plan.tensors], size,
                                       protect=protect or ()))
        stats = run_plans(plans, [ckpts[r] for r in plans[0].inputs], [w.add for w in writers], device=device,
                          progress=progress)
        for entry, writer, plan, (_, recipe) in zip(sweep, writers, plans, points):
            entry["content_hash"] = finish_output(writer, recipe, ckpts, plan, inputs, out_dtype)
        _write_sweep_index(out, tmp, sweep, overwrite)
    except BaseException:
        for w in writers:
            w.abort()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        lock.release()
    return MergeReport(str(out), plans[0].method, len(plans[0].tensors), stats.bytes_written,
                       time.perf_counter() - start, stats.seconds, _peak_rss_mb(), None, [], inputs,
                       sweep=[dict(s, folder=str(out / s["folder"])) for s in sweep])


def _write_sweep_index(out: Path, tmp: Path, sweep: list[dict[str, Any]], overwrite: bool) -> None:
    """sweep.json, then the sweep folder renamed into place (a failed write: one line, nothing written)."""
    from merging.io.guard import io_error

    try:
        (tmp / "sweep.json").write_text(json.dumps(sweep, indent=2) + "\n")
        replace_output(tmp, out, overwrite)
    except OSError as err:
        raise io_error(out, err) from None


__all__ = ["MergeReport", "load_recipe", "merge", "open_inputs"]
