"""The merge plan: for every output tensor, its inputs, the method and the resolved parameters.

Built from a recipe and the inputs' headers only (no tensor data), so every name, shape and
parameter problem surfaces before any weight is read. Depth t follows mergekit's planner:
layer k of an output slice of n layers has t = k / (n - 1) (t = 1 when n = 1); the tensors outside
the layers have t = 0, those before them (embeddings, from the first slice's sources) as well as
those after them (final norm, output head, pooler, from the last slice's): a gradient gives them its
first value. Which tensor is before or after the layers is per-architecture data (`merging.architectures`).
Parameter precedence (mergekit): a slice source's (or model's) parameters > the slice's >
the global `parameters:`; within one level, the first matching filter entry wins.

Also from headers and config/tokenizer files, before any weight is read: mixed architectures are
refused (`merging.plan.inputs`), tied models lacking `lm_head` read their embedding there (`merging.plan.inputs`),
inputs whose vocabulary row counts (or, with equal counts, tokenizer vocabularies) differ are refused
unless a tokenizer rule remaps them, and the rows of the vocabulary-indexed tensors are mapped to
the output vocabulary (`merging.plan.vocab`).
Methods with an optional base (`optional_base`, e.g. nuslerp, multislerp) receive a recipe
`base_model` not listed under `models:` as their base, without merging it as a model.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from merging.architectures import config_source, is_post, layer_index, with_layer
from merging.dtypes import MERGE_DTYPES, canonical, torch_dtype
from merging.io.checkpoint import Checkpoint, read_config
from merging.plan.inputs import (
    check_architectures,
    check_lora_inputs,
    drop_recomputed,
    real_name,
    tie_hint,
    tie_inputs,
    vocab_rows,
    vocab_tensors,
)
from merging.plan.vocab import VocabMap, check_same_vocab, plan_vocab
from merging.recipe.schema import OutputSlice, Recipe, SliceSource, evaluate_setting
from taxonomy.errors import BasinError


@dataclass
class TensorPlan:
    """One output tensor: `sources` are (input index, tensor name) pairs entering as `tensors`."""

    name: str
    sources: list[tuple[int, str]]
    base: tuple[int, str] | None
    params: dict[str, Any]
    t: float
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    vocab: bool = False  # rows remapped to the output vocabulary before merging (MergePlan.vocab)

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.out_dtype).element_size()

    def to_json(self, inputs: list[str]) -> dict[str, Any]:
        return {
            "name": self.name,
            "t": round(self.t, 6),
            "inputs": [f"{inputs[i]}:{n}" for i, n in self.sources],
            "base": None if self.base is None else f"{inputs[self.base[0]]}:{self.base[1]}",
            "params": self.params,
            "shape": list(self.shape),
            "dtype": str(self.out_dtype).removeprefix("torch."),
        } | ({"remap_vocab": True} if self.vocab else {})


@dataclass
class MergePlan:
    method: str
    inputs: list[str]  # model references, indexed by TensorPlan.sources
    tensors: list[TensorPlan]
    seed: int
    num_layers: int | None = None  # output layer count (for config.json), None if unchanged
    layer_origins: list[tuple[str, int]] | None = None  # per output layer: (model, source layer), for config.json
    vocab: VocabMap | None = None  # output vocabulary and row maps (tokenizer rule), None if none applies
    compute_dtype: str | None = None  # float16/bfloat16: mergekit's low-precision arithmetic (merging.methods.lowprec)
    notes: list[str] = field(default_factory=list)  # what the planner left out and why (e.g. recomputed buffers)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "inputs": self.inputs, "seed": self.seed, "num_layers": self.num_layers,
                "layer_origins": self.layer_origins, "tensors": [t.to_json(self.inputs) for t in self.tensors]} | (
                    {"vocab": self.vocab.to_json()} if self.vocab is not None else {}) | (
                    {"compute_dtype": self.compute_dtype} if self.compute_dtype else {}) | (
                    {"notes": self.notes} if self.notes else {})

    def table(self) -> str:
        """A readable per-tensor listing: name, shape, t, inputs, effective parameters."""
        lines = [f"method {self.method}, seed {self.seed}, {len(self.tensors)} tensors, "
                 f"{self.nbytes / 1e6:.1f} MB out"]
        lines += [f"  input {i}: {ref}" for i, ref in enumerate(self.inputs)]
        lines += [f"  note: {note}" for note in self.notes]
        if self.vocab is not None:
            v = self.vocab
            what = "unchanged" if v.identity else "rows remapped (remap_vocab)"
            lines.append(f"  vocabulary: {v.source}, {v.size} rows, {v.added} tokens added, {what}")
        for tp in self.tensors:
            srcs = ", ".join(f"{i}:{n}" if n != tp.name else str(i) for i, n in tp.sources)
            base = ""
            if tp.base is not None:
                base = f" base={tp.base[0]}" + ("" if tp.base[1] == tp.name else f":{tp.base[1]}")
            params = " ".join(f"{k}={_fmt(v)}" for k, v in tp.params.items())
            shape = "x".join(map(str, tp.shape)) or "scalar"
            dtype = str(tp.out_dtype).removeprefix("torch.")
            remap = "  remap_vocab" if tp.vocab else ""
            lines.append(f"{tp.name}  [{shape} {dtype}]  t={tp.t:.3f}  inputs=[{srcs}]{base}{remap}  {params}")
        return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def num_layers(ckpt: Checkpoint) -> int:
    idx = [i for i in (layer_index(n) for n in ckpt.names()) if i is not None]
    return max(idx) + 1 if idx else 0


def _resolve(levels: list[dict[str, Any]], pname: str, tensor: str, t: float) -> Any:
    for level in levels:
        if pname in level:
            value = evaluate_setting(level[pname], tensor, t)
            if value is not None:
                return value
    return None


def _check_same(ckpts: dict[str, Checkpoint], refs: list[str], names: list[str], context: str,
                vocab_names: frozenset[str] | set[str] = frozenset()) -> None:
    """Every named tensor exists in each checkpoint with one shape (for `vocab_names`, one shape after
    the first dimension: their rows are remapped); lists the first few problems."""
    first = refs[0]
    for ref in refs[1:]:
        have = set(ckpts[ref].names())
        missing = [n for n in names if n not in have]
        if missing:
            raise BasinError(f"{context}: {ref} lacks tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                             f"that {first} has ({len(missing)} in all){tie_hint(ckpts[ref], missing)}")

        def shape(c: Checkpoint, n: str) -> tuple[int, ...]:
            return c.meta(n).shape[1:] if n in vocab_names else c.meta(n).shape

        bad = [f"{n} {ckpts[first].meta(n).shape} vs {ckpts[ref].meta(n).shape}" for n in names
               if shape(ckpts[first], n) != shape(ckpts[ref], n)]
        if bad:
            raise BasinError(f"{context}: tensor shapes differ between {first} and {ref}: {bad[:5]}"
                             f"{' ...' if len(bad) > 5 else ''} ({len(bad)} in all)")


def _vocab_for(recipe: Recipe, ckpts: dict[str, Checkpoint], inputs: list[str]) -> VocabMap | None:
    """The tokenizer rule's row maps; without a rule (or copy-only), equal vocabulary row counts are required."""
    rows = {ref: vocab_rows(ckpts[ref]) for ref in inputs}
    spec = recipe.tokenizer_spec()
    vocab = None
    if spec is not None:
        source_folder = None
        ref = spec.model_ref
        if ref is not None and ref not in ckpts:
            source_folder = _tokenizer_folder(ref)
        vocab = plan_vocab(spec, inputs, {r: ckpts[r].folder for r in inputs}, rows, recipe.base_model,
                           source_folder)
    sized = {r: n for r, n in rows.items() if n is not None}
    if vocab is None and len(set(sized.values())) > 1:
        (a, na), (b, nb) = next(iter(sized.items())), next((r, n) for r, n in sized.items()
                                                           if n != next(iter(sized.values())))
        names = {r: next(iter(vocab_tensors(ckpts[r])), "embedding") for r in (a, b)}
        why = ("no model has tokenizer files to remap them with" if spec is not None else
               "set tokenizer_source: base | union | <model> (or a tokenizer: block) to remap them to one vocabulary")
        raise BasinError(f"vocabulary sizes differ: {a} has {na} rows ({names[a]}), {b} has {nb} "
                         f"({names[b]}); embeddings are never truncated: {why}")
    if spec is None:  # rows are merged as they are: the tokenizers must agree too
        check_same_vocab(inputs, {r: getattr(ckpts[r], "folder", None) for r in inputs}, rows, recipe.base_model)
    return vocab


@functools.lru_cache(maxsize=16)
def _tokenizer_folder(ref: str):
    """The local folder of a tokenizer source that is not a merged model (Hub: config and tokenizer files)."""
    from pathlib import Path

    from merging.io.hub import resolve

    path = Path(ref).expanduser()
    if not path.exists():
        path = resolve(ref, weights=False).path
    return path if path.is_dir() else path.parent


def build_plan(recipe: Recipe, ckpts: dict[str, Checkpoint], out_dtype: str | None = None, *,
               allow_mixed_architectures: bool = False) -> MergePlan:
    """Resolve every output tensor of `recipe` over the opened checkpoints (headers, config and tokenizer
    files only)."""
    from merging.methods.catalog import get_method

    method = get_method(recipe.merge_method)
    dtype_name = out_dtype or recipe.out_dtype or recipe.dtype
    dtype = torch_dtype(_canonical_dtype(dtype_name)) if dtype_name else None
    inputs = recipe.model_refs()
    if method.info.needs_lora:
        check_lora_inputs(method.info.name, inputs, recipe.base_model, ckpts)
    check_architectures({r: ckpts[r] for r in inputs}, allow_mixed_architectures or recipe.allow_mixed_architectures)
    ckpts, notes = drop_recomputed({r: ckpts[r] for r in inputs})  # buffers save_pretrained drops
    ckpts = tie_inputs(ckpts)  # tied models read their embedding as lm_head
    vocab = _vocab_for(recipe, ckpts, inputs)
    remap = vocab is not None and not vocab.identity
    vocab_names = {n for r in inputs for n in vocab_tensors(ckpts[r])} if remap else set()
    slices = recipe.slices if recipe.slices is not None else _models_as_slice(recipe, ckpts)
    builder = _Builder(method, recipe, ckpts, inputs, dtype, vocab, vocab_names)
    if recipe.slices is not None:
        _check_layer_ranges(slices, ckpts)
    first_sources, first_base = builder.roles(slices[0])
    last_sources, last_base = builder.roles(slices[-1])
    ref_ckpt = ckpts[(first_sources[0] if first_sources else first_base).model]
    non_layer = [n for n in ref_ckpt.names() if layer_index(n) is None]
    ref_config = read_config(ref_ckpt)
    post = [n for n in non_layer if is_post(n, ref_config)]
    pre = [n for n in non_layer if n not in set(post)]
    all_refs = list(dict.fromkeys([s.model for sl in slices for s in sl.sources]
                                  + [b.model for b in (first_base, last_base) if b is not None]))
    if recipe.slices is None:  # models mode: every input holds the same tensors
        _check_names(ckpts, all_refs)
    _check_same(ckpts, all_refs, non_layer, "models", vocab_names)
    for name in pre:  # t = 0 (mergekit's planner reads pre- and post-layer parameters at t = 0)
        builder.add(name, [(s, name) for s in first_sources], None if first_base is None else (first_base.model, name),
                    slices[0].parameters, 0.0)
    origins: list[tuple[str, int]] = []
    cfg_ref = config_source(recipe)
    for sl in slices:
        origins += builder.add_slice(sl, len(origins), cfg_ref)
    for name in post:  # t = 0 as well: a gradient gives them its first value, as in mergekit
        builder.add(name, [(s, name) for s in last_sources], None if last_base is None else (last_base.model, name),
                    slices[-1].parameters, 0.0)
    if remap and vocab is not None:
        for tp in builder.tensors:
            if tp.vocab:
                _check_rule_models(tp, vocab)
    layers_in = num_layers(ref_ckpt)
    return MergePlan(method.info.name, inputs, builder.tensors, recipe.seed,
                     num_layers=len(origins) if len(origins) != layers_in else None, vocab=vocab,
                     layer_origins=origins if recipe.slices is not None else None, notes=notes)


def _check_layer_ranges(slices: list[OutputSlice], ckpts: dict[str, Checkpoint]) -> None:
    for sl in slices:
        for src in sl.sources:
            n = num_layers(ckpts[src.model])
            if src.layer_range[1] > n:
                raise BasinError(f"slices: layer_range {list(src.layer_range)} of {src.model} exceeds its {n} layers")


class _Builder:
    """Accumulates the plan's tensors: parameters resolved (and cached) per tensor, sources per slice."""

    def __init__(self, method: Any, recipe: Recipe, ckpts: dict[str, Checkpoint], inputs: list[str],
                 dtype: torch.dtype | None, vocab: VocabMap | None, vocab_names: set[str]):
        self.method, self.recipe, self.ckpts, self.dtype = method, recipe, ckpts, dtype
        self.index = {ref: i for i, ref in enumerate(inputs)}
        self.vocab, self.vocab_names = vocab, vocab_names
        self.optional_base = method.optional_base
        self.tensors: list[TensorPlan] = []
        self.cache: dict[tuple, dict[str, Any]] = {}

    def params(self, out_name: str, srcs: list[tuple[SliceSource, str]], slice_params: dict[str, Any],
               t: float) -> dict[str, Any]:
        """mergekit's precedence: source > slice > global; per-model parameters by source tensor name."""
        from merging.methods.apply import full_params

        resolved: dict[str, Any] = {}
        for p in self.method.info.params:
            if p.per_model:
                vals = [_resolve([src.parameters, slice_params, self.recipe.parameters], p.name, src_name, t)
                        for src, src_name in srcs]
                resolved[p.name] = [p.default if v is None else v for v in vals]
            else:
                v = _resolve([slice_params, self.recipe.parameters], p.name, out_name, t)
                if v is not None:
                    resolved[p.name] = v
        key = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in resolved.items())
        if key not in self.cache:
            self.cache[key] = full_params(self.method, resolved, len(srcs))
        return self.cache[key]

    def add(self, out_name: str, srcs: list[tuple[SliceSource, str]], base: tuple[str, str] | None,
            slice_params: dict[str, Any], t: float) -> None:
        ckpts = self.ckpts
        first_ref, first_name = (srcs[0][0].model, srcs[0][1]) if srcs else base
        meta = ckpts[first_ref].meta(first_name)
        tdtype = self.dtype if (self.dtype is not None and meta.dtype.is_floating_point) else meta.dtype
        rows = out_name in self.vocab_names
        shape = (self.vocab.size,) + meta.shape[1:] if rows and self.vocab is not None else meta.shape
        self.tensors.append(TensorPlan(
            name=out_name,
            sources=[(self.index[s.model], real_name(ckpts[s.model], n)) for s, n in srcs],
            base=None if base is None else (self.index[base[0]], real_name(ckpts[base[0]], base[1])),
            params=self.params(out_name, srcs, slice_params, t), t=t, shape=shape, out_dtype=tdtype, vocab=rows,
        ))

    def roles(self, sl: OutputSlice) -> tuple[list[SliceSource], SliceSource | None]:
        """The slice's sources entering as `tensors` (base first for methods without a base) and its base."""
        info, recipe = self.method.info, self.recipe
        base_ref = sl.base_model or recipe.base_model
        base_src = next((s for s in sl.sources if s.model == base_ref), None)
        if info.needs_base or (self.optional_base and base_ref is not None):
            if base_ref is None:
                raise BasinError(f"merge_method {info.name!r} needs a base_model")
            if base_src is None:
                if recipe.slices is not None:
                    raise BasinError(f"slice sources {[s.model for s in sl.sources]} do not include the base "
                                     f"model {base_ref!r}")
                base_src = SliceSource(base_ref, sl.sources[0].layer_range)
        if info.needs_base:
            sources = [s for s in sl.sources if s is not base_src]
        else:  # base first (SLERP's t = 0); an optional base not listed is passed only as the base
            sources = sorted(sl.sources, key=lambda s: s.model != base_ref)
        problem = info.model_count_problem(len(sources))
        if problem:
            raise BasinError(f"{problem} in a slice (besides the base): {[s.model for s in sources]}")
        return sources, base_src

    def add_slice(self, sl: OutputSlice, out_layer: int, cfg_ref: str) -> list[tuple[str, int]]:
        """Plan one output slice's layers from output layer `out_layer` on; returns each layer's origin
        (model, source layer): the config source's layer if it is a source of the slice, else the first source's."""
        sources, base_src = self.roles(sl)
        everyone = sources + ([base_src] if base_src is not None and base_src not in sources else [])
        lead = everyone[0]
        n = lead.layer_range[1] - lead.layer_range[0]
        lead_names = self.ckpts[lead.model].names()
        origin = next((s for s in sl.sources if s.model == cfg_ref), sl.sources[0])
        for k in range(n):
            t = k / (n - 1) if n > 1 else 1.0
            names = [x for x in lead_names if layer_index(x) == lead.layer_range[0] + k]
            self._check_layer(everyone, lead, names, k, out_layer + k)
            for x in names:
                srcs = [(s, with_layer(x, s.layer_range[0] + k)) for s in sources]
                base = None if base_src is None else (base_src.model, with_layer(x, base_src.layer_range[0] + k))
                self.add(with_layer(x, out_layer + k), srcs, base, sl.parameters, t)
        return [(origin.model, origin.layer_range[0] + k) for k in range(n)]

    def _check_layer(self, everyone: list[SliceSource], lead: SliceSource, names: list[str], k: int,
                     out_layer: int) -> None:
        """Every source has the lead's tensors of its k-th layer, with the lead's shapes."""
        ckpts = self.ckpts
        for s in everyone:
            have = set(ckpts[s.model].names())
            for x in names:
                sx = with_layer(x, s.layer_range[0] + k)
                if sx not in have:
                    raise BasinError(f"{s.model} lacks tensor {sx!r} (needed for output layer {out_layer})")
                if ckpts[s.model].meta(sx).shape != ckpts[lead.model].meta(x).shape:
                    raise BasinError(f"tensor shapes differ: {lead.model}:{x} {ckpts[lead.model].meta(x).shape}"
                                     f" vs {s.model}:{sx} {ckpts[s.model].meta(sx).shape}")


def _check_rule_models(tp: TensorPlan, vocab: VocabMap) -> None:
    """Every model a `tokenizer.tokens` rule takes rows from enters the remapped tensor."""
    entering = {i for i, _ in tp.sources} | ({tp.base[0]} if tp.base is not None else set())
    for row, (_, src, _, _) in vocab.rules.items():
        if src is not None and src not in entering:
            raise BasinError(f"{tp.name}: tokenizer.tokens takes output row {row} from {vocab.inputs[src]}, "
                             "which does not enter this tensor")


def _canonical_dtype(name: str) -> str:
    value = canonical(name)
    if value is None:
        raise BasinError(f"dtype must be one of {', '.join(MERGE_DTYPES)}; got {name!r}")
    return value


def _models_as_slice(recipe: Recipe, ckpts: dict[str, Checkpoint]) -> list[OutputSlice]:
    """`models:` mode as one output slice spanning every layer (mergekit's normalize_config)."""
    counts = {m.model: num_layers(ckpts[m.model]) for m in recipe.models}
    if len(set(counts.values())) > 1:
        raise BasinError(f"models have different layer counts: {counts}")
    n = next(iter(counts.values()), 0)
    return [OutputSlice([SliceSource(m.model, (0, n), m.parameters) for m in recipe.models])]


def _check_names(ckpts: dict[str, Checkpoint], refs: list[str]) -> None:
    first = refs[0]
    names = set(ckpts[first].names())
    for ref in refs[1:]:
        other = set(ckpts[ref].names())
        if other != names:
            missing, extra = sorted(names - other), sorted(other - names)
            raise BasinError(f"tensor names differ between {first} and {ref}: {ref} lacks {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}, has extra {extra[:5]}"
                             f"{' ...' if len(extra) > 5 else ''}"
                             f"{tie_hint(ckpts[ref], missing) or tie_hint(ckpts[first], extra)}")
