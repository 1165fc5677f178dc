"""`token_surgery(model, donor, out_dir)`: the Python API behind `basin tokensurgeon` (mergekit-tokensurgeon).

Order of work, so that mistakes cost seconds: check the settings; refuse an existing output; open both checkpoints
lazily and load both tokenizers (local files, no remote code); refuse an output that would replace an input; plan
from headers, config.json and the tokenizers (`merging.tokensurgeon.vocab`: which donor tokens the model has) and
check on the meta device that the output loads; only then read the two embeddings (and output heads) and compute
the new rows (`merging.tokensurgeon.approximate`); stream every other tensor unchanged into the shard writer.

Output rows: one per donor row (the donor's embedding rows, its padding included), more if the donor's tokenizer
has ids beyond them. Row `i` of the output embedding (and of an untied head) is the model's row of donor token
`i` when the model has that token (bit-identical), else the approximation; donor ids without a token (padding)
and tokens without a donor row are zero, as are new rows of other vocabulary-indexed tensors (an output bias).
A tied model stays tied. config.json gets the new vocab_size and the donor's special token ids; the donor's
tokenizer files are copied; generation_config.json takes the donor's token ids; README.md records the surgery.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from merging.architectures import INPUT_EMBED, OUTPUT_EMBED, VOCAB_TENSOR, is_tied
from merging.io.checkpoint import Checkpoint, open_checkpoint, read_config
from merging.io.writer import DEFAULT_SHARD_SIZE, ShardWriter, parse_size
from merging.tokensurgeon.vocab import TokenMatch, match
from taxonomy.errors import BasinError

METHODS = ("omp", "mean", "zero", "subword")
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "mask_token_id", "sep_token_id")
GENERATION_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


@dataclass
class Side:
    """One input: its checkpoint, tokenizer, input embedding name and output head name (None: tied / absent)."""

    ref: str
    ckpt: Checkpoint
    tokenizer: Any
    embed: str
    head: str | None
    config: dict[str, Any]


@dataclass
class SurgeryPlan:
    model: Side
    donor: Side
    tokens: TokenMatch
    rows: int
    method: str
    k: int
    config: dict[str, Any]
    layout: list[tuple[str, tuple[int, ...], torch.dtype]]
    remapped: list[str] = field(default_factory=list)  # vocabulary-indexed tensors besides embedding and head

    def table(self) -> str:
        """The dry run's listing: tokens, rows, method, then one line per output tensor with its source."""
        m, d = self.model, self.donor
        how = f"omp, k={self.k}" if self.method == "omp" else self.method
        lines = [f"{m.ref} with the tokenizer of {d.ref}: {len(self.tokens.shared)} shared tokens (rows copied), "
                 f"{len(self.tokens.new)} donor-only tokens ({how}); {m.ckpt.meta(m.embed).shape[0]} -> "
                 f"{self.rows} rows; head {'untied' if m.head else 'tied'}"]
        for name, shape, dtype in self.layout:
            where = ("rows rebuilt" if name in (m.embed, m.head) else "shared rows kept, new rows zero"
                     if name in self.remapped else "copied")
            lines.append(f"  {name}  {list(shape)}  {str(dtype).removeprefix('torch.')}  <- {where}")
        return "\n".join(lines)


@dataclass
class SurgeryReport:
    out_dir: str | None
    method: str
    k: int
    shared: int
    approximated: int
    rows: int
    tensors: int
    bytes_written: int = 0
    seconds: float = 0.0
    content_hash: str | None = None
    dry_run: bool = False
    plan: SurgeryPlan | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items() if k != "plan"}


def check_settings(method: str, k: int, batch_size: int) -> None:
    from taxonomy.errors import unknown

    if method not in METHODS:
        raise BasinError(unknown("approximation method", method, METHODS))
    for name, value in (("k", k), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BasinError(f"{name} must be a positive integer, got {value!r}")


def open_side(ref: Any, role: str, allow_pickle: bool) -> Side:
    """A checkpoint with its config.json, tokenizer and embedding names; one-line errors naming `ref`."""
    from merging.plan.vocab import has_tokenizer, load_tokenizer

    label = str(ref)
    ckpt = open_checkpoint(ref, allow_pickle=allow_pickle, label=label)
    folder = getattr(ckpt, "folder", None)
    if not has_tokenizer(folder):
        raise BasinError(f"{label}: the {role} has no tokenizer files (tokenizer.json, tokenizer.model, vocab.json"
                         f"...) in {folder or 'its folder'}: tokensurgeon needs both tokenizers")
    config = read_config(ckpt) or {}
    embed = _one(ckpt, INPUT_EMBED, label, "input embedding")
    heads = [n for n in ckpt.names() if OUTPUT_EMBED.search(n)]
    head = heads[0] if heads and not is_tied(config) else None
    return Side(label, ckpt, load_tokenizer(folder, label), embed, head, config)


def _one(ckpt: Checkpoint, pattern: Any, label: str, what: str) -> str:
    names = [n for n in ckpt.names() if pattern.search(n) and len(ckpt.meta(n).shape) == 2]
    if len(names) != 1:
        found = ", ".join(names[:4]) or "none"
        raise BasinError(f"{label}: expected one {what} matrix (embed_tokens / wte / word_embeddings ...), "
                         f"found {found}")
    return names[0]


def plan_surgery(model: Side, donor: Side, method: str, k: int) -> SurgeryPlan:
    """Every output tensor and the output config, from headers, config.json and the tokenizers."""
    model_rows = model.ckpt.meta(model.embed).shape[0]
    tokens = match(model.tokenizer, donor.tokenizer, model_rows)
    donor_rows = donor.ckpt.meta(donor.embed).shape[0]
    rows = max(donor_rows, max(tokens.donor_tokens, default=-1) + 1)
    shared_with_row = sum(d < donor_rows for d in tokens.shared)
    if not tokens.shared or (method == "omp" and not shared_with_row):
        raise BasinError(f"{model.ref} and {donor.ref}: the tokenizers share no token: nothing to build the new "
                         "rows from")
    layout, remapped = [], []
    for name in sorted(model.ckpt.names()):
        meta = model.ckpt.meta(name)
        shape = tuple(meta.shape)
        if VOCAB_TENSOR.search(name) and shape and shape[0] == model_rows:
            shape = (rows, *shape[1:])
            if name not in (model.embed, model.head) and not OUTPUT_EMBED.search(name):
                remapped.append(name)
        layout.append((name, shape, meta.dtype))
    config = output_config(model, donor, rows)
    plan = SurgeryPlan(model, donor, tokens, rows, method, min(k, shared_with_row or k), config, layout, remapped)
    _check_loadable(plan)
    return plan


def output_config(model: Side, donor: Side, rows: int) -> dict[str, Any]:
    """The model's config.json with vocab_size = `rows` and the donor's special token ids: each from the
    donor's config.json when it has the key, else (when the model's has it) the donor tokenizer's token of that
    role."""
    config = json.loads(json.dumps(model.config))
    target = config if "vocab_size" in config or "text_config" not in config else config["text_config"]
    target["vocab_size"] = rows
    for key in TOKEN_ID_KEYS:
        if key in donor.config:
            config[key] = donor.config[key]
        elif key in config:
            token = getattr(donor.tokenizer, key.removesuffix("_id"), None)
            config[key] = donor.tokenizer.convert_tokens_to_ids(token) if isinstance(token, str) else None
    return config


def _check_loadable(plan: SurgeryPlan) -> None:
    from merging.output.config import check_loadable

    if plan.config.get("architectures"):
        check_loadable(plan.config, {name: shape for name, shape, _ in plan.layout})


def token_surgery(model: Any, donor: Any, out_dir: str | Path | None, *, method: str = "omp", k: int = 64,
                  batch_size: int = 512, overwrite: bool = False, dry_run: bool = False,
                  shard_size: int | str = DEFAULT_SHARD_SIZE, allow_pickle: bool = False,
                  progress: bool = True) -> SurgeryReport:
    """Give `model` the tokenizer of `donor` (module docstring); `k`: OMP's sparsity (at most the number of
    shared tokens); `batch_size`: new tokens approximated at a time."""
    from merging.io.guard import guard_output, planned_output

    start = time.perf_counter()
    check_settings(method, k, batch_size)
    size = parse_size(shard_size)
    out = planned_output(out_dir, overwrite, dry_run)
    m, d = open_side(model, "model", allow_pickle), open_side(donor, "donor", allow_pickle)
    guard = guard_output(out, [model, donor], [m.ckpt, d.ckpt])
    plan = plan_surgery(m, d, method, k)
    report = SurgeryReport(None, method, plan.k, len(plan.tokens.shared), len(plan.tokens.new), plan.rows,
                           len(plan.layout), dry_run=True, plan=plan)
    if out is not None:
        tensors = new_tensors(plan, batch_size, progress)
        report.content_hash, report.bytes_written = _write(plan, tensors, out, size, overwrite, guard, progress)
        report.out_dir, report.dry_run = str(out), False
    report.seconds = time.perf_counter() - start
    return report


def new_tensors(plan: SurgeryPlan, batch_size: int, progress: bool) -> dict[str, torch.Tensor]:
    """The rebuilt embedding (and untied head) of the output, keyed by the model's tensor names."""
    from merging.tokensurgeon.rows import rebuild

    m, d = plan.model, plan.donor
    pairs = [(m.embed, d.embed)]
    if m.head is not None:
        pairs.append((m.head, d.head or d.embed))
    bar = _bar(len(plan.tokens.new) * len(pairs), "tokensurgeon") if progress else None
    out = {}
    for mine, theirs in pairs:
        out[mine] = rebuild(plan, m.ckpt.get(mine), d.ckpt.get(theirs), batch_size,
                            bar.update if bar is not None else None)
    if bar is not None:
        bar.close()
    return out


def _bar(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="token", file=sys.stderr, leave=False)


def _tensor(plan: SurgeryPlan, name: str, new: dict[str, torch.Tensor]) -> torch.Tensor:
    if name in new:
        return new[name]
    tensor = plan.model.ckpt.get(name)
    if name in plan.remapped or (OUTPUT_EMBED.search(name) and name != plan.model.head):
        from merging.tokensurgeon.rows import remap_shared

        return new[plan.model.embed] if OUTPUT_EMBED.search(name) and tensor.ndim == 2 else remap_shared(
            plan, tensor)
    return tensor


def _write(plan: SurgeryPlan, new: dict[str, torch.Tensor], out: Path, size: int, overwrite: bool,
           guard: set[Path], progress: bool) -> tuple[str, int]:
    """Stream every tensor into the writer, then config, tokenizer, card; (content hash, bytes written)."""
    from merging.output.config import check_written

    written = 0
    names = [name for name, _, _ in plan.layout]
    with ShardWriter(out, plan.layout, size, overwrite=overwrite, protect=guard) as writer:
        for name in (_progress(names) if progress else names):
            tensor = _tensor(plan, name, new).contiguous()
            writer.add(name, tensor)
            written += tensor.numel() * tensor.element_size()
        _side_files(plan, writer)
        check_written(writer.tmp, {name: shape for name, shape, _ in plan.layout}, None)
        digest = writer.content_hash()
        writer.write_text("README.md", surgery_card(plan, digest))
        writer.close()
    return digest, written


def _progress(names: list[str]) -> Any:
    from tqdm.auto import tqdm

    return tqdm(names, desc="write", unit="tensor", file=sys.stderr, leave=False)


def _side_files(plan: SurgeryPlan, writer: ShardWriter) -> None:
    """config.json, generation_config.json (the donor's token ids), the donor's tokenizer files."""
    from merging.io.hf_files import TOKENIZER_FILES

    writer.write_text("config.json", json.dumps(plan.config, indent=2) + "\n")
    generation = _generation_config(plan)
    if generation is not None:
        writer.write_text("generation_config.json", json.dumps(generation, indent=2) + "\n")
    folder = plan.donor.ckpt.folder
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            writer.copy_file(folder / name)


def _generation_config(plan: SurgeryPlan) -> dict[str, Any] | None:
    """The model's generation_config.json with its token ids from the donor's (else from the output config)."""
    def read(side: Side) -> dict[str, Any] | None:
        path = side.ckpt.folder / "generation_config.json"
        try:
            return json.loads(path.read_text()) if path.is_file() else None
        except ValueError:
            raise BasinError(f"{path}: not valid JSON") from None

    config, donor = read(plan.model), read(plan.donor) or {}
    if config is None:
        return None
    for key in GENERATION_KEYS:
        if key in config:
            config[key] = donor.get(key, plan.config.get(key, config[key]))
    return config


def surgery_card(plan: SurgeryPlan, digest: str) -> str:
    """README.md: the inputs, the method, the token counts (`merging.output.model_card.card_text`)."""
    from merging.output.model_card import InputRecord, card_text, front_matter
    from taxonomy.version import versions

    inputs = [InputRecord(s.ref, s.ckpt.repo_id, s.ckpt.revision) for s in (plan.model, plan.donor)]
    how = f"orthogonal matching pursuit over the donor's embeddings, k = {plan.k}" if plan.method == "omp" \
        else {"mean": "the mean of the model's rows", "zero": "zeros",
              "subword": "the mean of the model's rows of the token's pieces"}[plan.method]
    lines = [f"- tokens shared with the model (rows copied): {len(plan.tokens.shared)}",
             f"- donor-only tokens (rows approximated: {how}): {len(plan.tokens.new)}",
             f"- rows: {plan.model.ckpt.meta(plan.model.embed).shape[0]} -> {plan.rows}; output head "
             f"{'untied' if plan.model.head else 'tied'}"]
    intro = (f"`{plan.model.ref}` with the tokenizer of `{plan.donor.ref}`, made with basin "
             f"{versions().get('basin', '')} (`basin tokensurgeon`).")
    front = front_matter(None, inputs, tags=("tokensurgeon", "basin"))
    return card_text(front, f"{Path(plan.model.ref).name} + {Path(plan.donor.ref).name} tokenizer", intro, inputs,
                     [("Tokenizer surgery", lines)], digest, versions())
