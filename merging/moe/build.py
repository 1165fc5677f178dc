"""`merging.moe.build_moe(config, out_dir)`: the Python API behind `basin moe` (mergekit-moe).

Order of work, so that mistakes cost seconds: read and check the YAML (no I/O); refuse an existing output;
open every model lazily; choose the output architecture from the config.json files (`merging.moe.arch`); plan
every output tensor from headers (every expert's MLP tensors checked against the base's: names and shapes) and
check the output loads in transformers (against the tensors its class builds; no gate mode imports transformers
where `merging.moe.decoder` covers the base, `hidden` otherwise its modeling module); only then compute the router
weights (`merging.moe.router`) and stream the tensors one at a time into the shard writer: attention, norms and
embeddings from the base, each expert's MLP from its source; config.json, generation_config.json, the base's
tokenizer and the YAML (`mergekit_moe_config.yml`, as mergekit names it) beside them; rename into place.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from merging.dtypes import torch_dtype
from merging.io.checkpoint import Checkpoint, open_checkpoint, read_config
from merging.io.writer import DEFAULT_SHARD_SIZE, ShardWriter, parse_size
from merging.moe.arch import MLP_PROJ, QWEN2_MOE, MoEArch, choose, dense_config, expected_tensors, moe_config
from merging.moe.config import RANDOM_MODES, Expert, MoEConfig
from merging.moe.hf_config import Fields
from taxonomy.errors import BasinError

DENSE_MLP = re.compile(r"^model\.layers\.(\d+)\.mlp\.(.+)$")


@dataclass
class Entry:
    """One output tensor: copied from `ref`'s tensor `source`, a router row block, or zeros."""

    name: str
    shape: tuple[int, ...]
    ref: str | None = None
    source: str | None = None
    expert: Expert | None = None
    router: tuple[int, slice] | None = None  # (layer, rows of the gate vectors)


@dataclass
class MoEPlan:
    arch: MoEArch
    config: dict[str, Any]
    dtype: torch.dtype
    entries: list[Entry]
    layers: int
    hidden: int
    own_config: bool = False  # config.json from `merging.moe.hf_config` (no transformers involved)

    def table(self) -> str:
        """The dry run's listing: architecture, then one line per output tensor with its source."""
        lines = [f"{self.arch.name} ({self.arch.class_name}): {self.layers} layers, "
                 f"{self.config.get('num_local_experts', self.config.get('num_experts'))} experts, "
                 f"{self.config['num_experts_per_tok']} per token, dtype {str(self.dtype).removeprefix('torch.')}"]
        for e in self.entries:
            where = (f"router rows {e.router[1].start}:{e.router[1].stop} (layer {e.router[0]})" if e.router
                     else "zeros" if e.ref is None else f"{e.ref} :: {e.source}")
            lines.append(f"  {e.name}  {list(e.shape)}  <- {where}")
        return "\n".join(lines)


@dataclass
class MoEReport:
    out_dir: str | None
    architecture: str
    experts: int
    tensors: int
    bytes_written: int
    seconds: float
    router_seconds: float
    content_hash: str | None
    dry_run: bool = False
    plan: MoEPlan | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"out_dir": self.out_dir, "architecture": self.architecture, "experts": self.experts,
                "tensors": self.tensors, "bytes_written": self.bytes_written, "seconds": round(self.seconds, 4),
                "router_seconds": round(self.router_seconds, 4), "content_hash": self.content_hash,
                "dry_run": self.dry_run}


def load_config(config: MoEConfig | dict | str | Path) -> MoEConfig:
    if isinstance(config, MoEConfig):
        config.validate()
        return config
    if isinstance(config, dict):
        return MoEConfig.from_dict(config)
    return MoEConfig.from_yaml(config)


def open_models(config: MoEConfig, allow_pickle: bool = False) -> dict[str, Checkpoint]:
    """Every model the config names, opened lazily; a missing one is a one-line error naming it."""
    ckpts = {}
    for ref in config.model_refs():
        try:
            ckpts[ref] = open_checkpoint(ref, allow_pickle=allow_pickle, label=ref)
        except BasinError as err:
            raise BasinError(f"model {ref!r} (named in the moe config): {err}") from None
    return ckpts


def _config_of(ckpt: Checkpoint, ref: str) -> dict[str, Any]:
    config = read_config(ckpt)
    if not config or "model_type" not in config:
        raise BasinError(f"{ref}: no config.json with a model_type beside the weights")
    return config


def plan_moe(config: MoEConfig, ckpts: dict[str, Checkpoint]) -> MoEPlan:
    """Every output tensor, from headers and config.json files only (no tensor data read)."""
    raw = {ref: _config_of(ckpts[ref], ref) for ref in config.model_refs()}
    arch = choose({ref: c.get("model_type") for ref, c in raw.items()}, len(config.shared_experts),
                  config.architecture)
    dense = dense_config(raw[config.base_model], config.base_model)
    dtype_name = config.out_dtype or _base_dtype(dense)
    out_config = moe_config(arch, dense, len(config.experts), config.experts_per_token, dtype_name,
                            config.base_model)
    if arch.shared and len(config.gated) == len(config.experts):
        raise BasinError(f"{arch.name}: the shared expert needs positive_prompts for gate_mode "
                         f"{config.gate_mode!r} (its gate is computed from them)")
    base = ckpts[config.base_model]
    layers, hidden = dense.num_hidden_layers, dense.hidden_size
    entries = list(_base_entries(base, config.base_model, arch, dense, out_config))
    for layer in range(layers):
        entries += _layer_entries(config, ckpts, arch, layer, hidden)
    dtype = torch_dtype(dtype_name) if dtype_name else base.meta(_first(base)).dtype
    return MoEPlan(arch, out_config, dtype, entries, layers, hidden, isinstance(dense, Fields))


def _base_dtype(dense: Any) -> str | None:
    from merging.dtypes import canonical

    value = getattr(dense, "dtype", None) or getattr(dense, "torch_dtype", None)
    return canonical(str(value).removeprefix("torch.")) if value is not None else None


def _first(ckpt: Checkpoint) -> str:
    return sorted(ckpt.names())[0]


def _base_entries(base: Checkpoint, ref: str, arch: MoEArch, dense: Any, out_config: dict) -> Iterator[Entry]:
    """Everything but the MLPs from the base; the lm_head only when the output does not tie it; zero q/k/v biases
    for a Qwen2-MoE from a base without them (as mergekit writes)."""
    names = set(base.names())
    for name in sorted(names):
        if DENSE_MLP.match(name) or name.endswith("rotary_emb.inv_freq"):
            continue
        if name == "lm_head.weight" and out_config.get("tie_word_embeddings"):
            continue
        yield Entry(name, tuple(base.meta(name).shape), ref, name)
    if not out_config.get("tie_word_embeddings") and "lm_head.weight" not in names:
        raise BasinError(f"{ref}: no tensor 'lm_head.weight' and config.json does not tie it to the embeddings")
    if arch is QWEN2_MOE:
        head = getattr(dense, "head_dim", None) or dense.hidden_size // dense.num_attention_heads
        for layer in range(dense.num_hidden_layers):
            for proj, heads in (("q", dense.num_attention_heads), ("k", dense.num_key_value_heads),
                                ("v", dense.num_key_value_heads)):
                name = f"model.layers.{layer}.self_attn.{proj}_proj.bias"
                if name not in names:
                    yield Entry(name, (heads * head,))


def _layer_entries(config: MoEConfig, ckpts: dict[str, Checkpoint], arch: MoEArch, layer: int,
                   hidden: int) -> list[Entry]:
    """Layer `layer`'s experts (each MLP tensor checked against the base's) and router rows."""
    base = ckpts[config.base_model]
    shapes = {p: _mlp_shape(base, config.base_model, layer, p) for p in MLP_PROJ}
    out: list[Entry] = []
    for k, expert in enumerate(config.experts):
        out += [Entry(arch.expert(layer, k, p), shapes[p], expert.source_model, _mlp_name(layer, p), expert)
                for p in MLP_PROJ if _check_expert(ckpts, expert.source_model, layer, p, shapes[p])]
    n = len(config.experts)
    out.append(Entry(arch.router(layer), (n, hidden), router=(layer, slice(0, n))))
    if arch.shared:
        shared = config.shared_experts[0]
        out += [Entry(arch.shared_expert(layer, p), shapes[p], shared.source_model, _mlp_name(layer, p), shared)
                for p in MLP_PROJ if _check_expert(ckpts, shared.source_model, layer, p, shapes[p])]
        out.append(Entry(arch.shared_gate(layer), (1, hidden), router=(layer, slice(n, n + 1))))
    return out


def _mlp_name(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.{proj}.weight"


def _mlp_shape(ckpt: Checkpoint, ref: str, layer: int, proj: str) -> tuple[int, ...]:
    name = _mlp_name(layer, proj)
    if name not in ckpt.names():
        raise BasinError(f"{ref}: no tensor {name!r} (a Llama-shaped MLP with gate_proj, up_proj, down_proj in "
                         "every layer is needed)")
    return tuple(ckpt.meta(name).shape)


def _check_expert(ckpts: dict[str, Checkpoint], ref: str, layer: int, proj: str, shape: tuple[int, ...]) -> bool:
    got = _mlp_shape(ckpts[ref], ref, layer, proj)
    if got != shape:
        raise BasinError(f"{ref}: tensor {_mlp_name(layer, proj)!r} has shape {list(got)}, the base's has "
                         f"{list(shape)}: every expert needs the base's hidden and intermediate sizes")
    return True


def _check_extra(config: MoEConfig, ckpts: dict[str, Checkpoint], layers: int) -> None:
    """An expert with more layers, or MLP tensors beyond the three projections (biases), is an error."""
    for expert in config.experts + config.shared_experts:
        for name in ckpts[expert.source_model].names():
            m = DENSE_MLP.match(name)
            if m and (int(m.group(1)) >= layers or m.group(2) not in {f"{p}.weight" for p in MLP_PROJ}):
                raise BasinError(f"{expert.source_model}: tensor {name!r} has no place in the MoE (the base has "
                                 f"{layers} layers, each MLP gate_proj/up_proj/down_proj weights only)")


def check_plan(plan: MoEPlan) -> None:
    """Refuse, before any data is read, an output transformers would not load with its config: with basin's own
    config, against the tensors that config's class builds (`merging.moe.arch.expected_tensors`); else by
    building the class in transformers (on the meta device)."""
    from merging.output.config import check_loadable

    planned = {e.name: e.shape for e in plan.entries}
    if not plan.own_config:
        check_loadable(plan.config, planned)
        return
    want = expected_tensors(plan.arch, plan.config)
    problems = ([f"missing {n}" for n in want if n not in planned]
                + [f"unexpected {n}" for n in planned if n not in want]
                + [f"shape: {n} is {list(s)}, the model's is {list(want[n])}" for n, s in planned.items()
                   if n in want and tuple(s) != want[n]])
    if problems:
        raise BasinError(f"the output would not load in transformers as {plan.arch.class_name} "
                         f"({plan.layers} layers): {'; '.join(problems[:4])}{' ...' if len(problems) > 4 else ''}; "
                         "nothing was written")


def router_weights(config: MoEConfig, plan: MoEPlan, base: Checkpoint, device: str = "cpu",
                   hidden_dtype: str = "float32") -> torch.Tensor:
    """(layers, gated experts, hidden) router rows (`merging.moe.router.gate_vectors`)."""
    from merging.moe import router

    mode = config.gate_mode
    gated = config.gated
    if mode in RANDOM_MODES:
        return router.gate_vectors(mode, gated, plan.layers, plan.hidden, seed=config.seed)
    tokenizer = router.tokenizer_of(base.folder, config.base_model)
    if mode == "cheap_embed":
        return router.gate_vectors(mode, gated, plan.layers, plan.hidden, tokenizer=tokenizer,
                                   embed=lambda: base.get("model.embed_tokens.weight"))
    with torch.no_grad():
        return router.gate_vectors(mode, gated, plan.layers, plan.hidden, tokenizer=tokenizer,
                                   states=router.hidden_states(base, torch_dtype(hidden_dtype), device))


def _tensor(entry: Entry, ckpts: dict[str, Checkpoint], gates: torch.Tensor, dtype: torch.dtype,
            seed: int) -> torch.Tensor:
    if entry.router is not None:
        layer, rows = entry.router
        return gates[layer, rows].to(dtype).contiguous()
    if entry.ref is None:
        return torch.zeros(entry.shape, dtype=dtype)
    tensor = ckpts[entry.ref].get(entry.source)
    if entry.expert is not None:
        tensor = _noise_and_scale(tensor, entry, seed)
    return tensor.to(dtype).contiguous()


def _noise_and_scale(tensor: torch.Tensor, entry: Entry, seed: int) -> torch.Tensor:
    """mergekit's `noise_and_scale`: + N(0, noise_scale^2) noise (seeded per output tensor), and down_proj times
    residual_scale."""
    import hashlib

    expert = entry.expert
    assert expert is not None
    if expert.noise_scale:
        digest = hashlib.sha256(f"{seed}\0{entry.name}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        tensor = tensor.float() + torch.randn(tensor.shape, generator=g) * expert.noise_scale
    if expert.residual_scale is not None and entry.source and entry.source.endswith("down_proj.weight"):
        tensor = tensor.float() * expert.residual_scale
    return tensor


def build_moe(config_or_path: MoEConfig | dict | str | Path, out_dir: str | Path | None, *, overwrite: bool = False,
              dry_run: bool = False, device: str = "cpu", shard_size: int | str = DEFAULT_SHARD_SIZE,
              hidden_dtype: str = "float32", allow_pickle: bool = False, progress: bool = True) -> MoEReport:
    """Build a mixture-of-experts model from dense models, as a mergekit-moe config says (module docstring)."""
    from merging.io.guard import guard_output, planned_output

    start = time.perf_counter()
    config = load_config(config_or_path)
    _check_hidden_dtype(hidden_dtype)
    from merging.engine import resolve_device

    resolve_device(device)
    size = parse_size(shard_size)
    out = planned_output(out_dir, overwrite, dry_run)
    ckpts = open_models(config, allow_pickle)
    guard = guard_output(out, config.model_refs(), ckpts.values(), files=[config_or_path])
    plan = plan_moe(config, ckpts)
    _check_extra(config, ckpts, plan.layers)
    check_plan(plan)
    report = MoEReport(None, plan.arch.name, len(config.experts), len(plan.entries), 0, 0.0, 0.0, None,
                       dry_run=True, plan=plan)
    if out is None:
        report.seconds = time.perf_counter() - start
        return report
    t0 = time.perf_counter()
    gates = router_weights(config, plan, ckpts[config.base_model], device, hidden_dtype)
    report.router_seconds = time.perf_counter() - t0
    report.content_hash, report.bytes_written = _write(config, plan, ckpts, gates, out, size, overwrite, guard,
                                                       progress)
    report.out_dir, report.dry_run, report.seconds = str(out), False, time.perf_counter() - start
    return report


def _check_hidden_dtype(name: str) -> None:
    from merging.dtypes import EVAL_DTYPES, canonical

    if canonical(name, EVAL_DTYPES) != name:
        raise BasinError(f"hidden_dtype must be one of {', '.join(EVAL_DTYPES)}; got {name!r}")


def _write(config: MoEConfig, plan: MoEPlan, ckpts: dict[str, Checkpoint], gates: torch.Tensor, out: Path,
           size: int, overwrite: bool, guard: set[Path], progress: bool) -> tuple[str, int]:
    """Stream every tensor into the writer, then the side files; (content hash, bytes written)."""
    import json

    layout = [(e.name, e.shape, plan.dtype) for e in plan.entries]
    written = 0
    with ShardWriter(out, layout, size, overwrite=overwrite, protect=guard) as writer:
        for entry in _progress(plan.entries, progress):
            tensor = _tensor(entry, ckpts, gates, plan.dtype, config.seed)
            writer.add(entry.name, tensor)
            written += tensor.numel() * tensor.element_size()
        writer.write_text("config.json", json.dumps(plan.config, indent=2) + "\n")
        _side_files(writer, config, ckpts[config.base_model])
        digest = writer.content_hash()
        writer.close()
    return digest, written


def _side_files(writer: ShardWriter, config: MoEConfig, base: Checkpoint) -> None:
    from merging.io.hf_files import TOKENIZER_FILES

    folder = base.folder
    if folder is not None:
        for name in ("generation_config.json", *TOKENIZER_FILES):
            if (folder / name).is_file():
                writer.copy_file(folder / name)
    if config.text is not None:
        writer.write_text("mergekit_moe_config.yml", config.text)


def _progress(entries: list[Entry], enabled: bool) -> Any:
    if not enabled:
        return entries
    from tqdm.auto import tqdm

    return tqdm(entries, desc="moe", unit="tensor", file=sys.stderr)
