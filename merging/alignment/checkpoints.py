"""Aligning N checkpoints to one reference before a merge (Ainsworth et al. 2023, section 5: each
model is permuted onto the reference, then any merge method averages the aligned models).

Alignment reads whole models into memory (weight matching needs every tensor of a group at once).
For Hugging Face folders the spec comes from config.json and the tensor names (BERT/Llama-style);
otherwise pass `options["spec"]` (a PermutationSpec or a JSON file) or `options["model_factory"]`
(a callable or "module:fn" returning an nn.Module to trace).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from merging.alignment.apply import apply_permutation
from merging.alignment.infer import infer_spec, spec_from_hf_folder
from merging.alignment.spec import PermutationSpec
from merging.alignment.weight_matching import MatchResult, weight_matching
from merging.io.checkpoint import Checkpoint, StateDictCheckpoint
from merging.objects import load_object
from taxonomy.errors import BasinError

METHODS = ("weight_matching", "activation_matching")


def load_state(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """Every tensor of `ckpt` in memory, as copies: a tensor from `get()` may be a file mapping (one open
    file descriptor each), which a whole state dict of a many-tensor model must not hold."""
    return {name: ckpt.get(name).clone() for name in ckpt.names()}


def _load_object(spec: Any) -> Any:
    """A callable given directly or as "module:fn" (`merging.objects.load_object`)."""
    return load_object(spec) if isinstance(spec, str) else spec


def spec_for(ckpt: Checkpoint, options: Mapping[str, Any]) -> PermutationSpec:
    """The permutation spec for a checkpoint: given, from a model factory, or from its HF config."""
    given = options.get("spec")
    if isinstance(given, PermutationSpec):
        return given
    if isinstance(given, (str, Path)):
        try:
            return PermutationSpec.from_json(json.loads(Path(given).read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise BasinError(f"{given}: cannot read the permutation spec ({err})") from None
    if options.get("model_factory") is not None:
        model = _build(_load_object(options["model_factory"]), "align: model_factory")
        return infer_spec(model, options.get("example_input"), residual=options.get("residual", "auto"))
    if ckpt.folder is not None and (Path(ckpt.folder) / "config.json").is_file():
        shapes = {n: ckpt.meta(n).shape for n in ckpt.names()}
        return spec_from_hf_folder(ckpt.folder, shapes, residual=options.get("residual", "auto"))
    raise BasinError(f"{ckpt.label}: cannot infer a permutation spec (no config.json); "
                     "give a spec or a model factory")


def hf_factory(folder: Path) -> Any:
    """A factory building the architecture named in `folder`/config.json with transformers (no remote code);
    an `architectures` entry that is not a transformers model class is a one-line BasinError."""

    def build():
        import transformers

        config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False)
        names = list(config.architectures or [])
        archs = [getattr(transformers, a, None) for a in names]
        cls = next((a for a in archs if a is not None), None)
        if cls is None:
            return transformers.AutoModel.from_config(config, trust_remote_code=False)
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            raise BasinError(f"{folder}/config.json: architectures {names} names {cls.__name__!r}, "
                             "not a transformers model class")
        return cls(config)

    return build


def _build(factory: Any, label: str) -> torch.nn.Module:
    """`factory()`, checked to be an nn.Module (a factory returning anything else is a one-line BasinError)."""
    if not callable(factory):
        raise BasinError(f"{label}: is a {type(factory).__name__}, not a callable")
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise BasinError(f"{label}: returned a {type(model).__name__}, not an nn.Module")
    return model


def match(state_ref: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], spec: PermutationSpec,
          options: Mapping[str, Any]) -> MatchResult:
    method = options.get("method", "weight_matching")
    if method == "weight_matching":
        return weight_matching(state_ref, state, spec, seed=int(options.get("seed", 0)),
                               max_iter=int(options.get("max_iter", 100)), progress=bool(options.get("progress")))
    if method == "activation_matching":
        from merging.alignment.activation_matching import activation_matching

        folder = options.get("hf_folder")
        if options.get("data") is None or (options.get("model_factory") is None and folder is None):
            raise BasinError("activation_matching needs 'data' and a 'model_factory' (or a Hugging Face folder)")
        factory, label = ((_load_object(options["model_factory"]), "align: model_factory")
                          if options.get("model_factory") else (hf_factory(folder), f"align: {folder}"))
        data = options["data"]
        data = _load_object(data)() if isinstance(data, str) else data
        model_a, model_b = _build(factory, label), _build(factory, label)
        for model, weights, label in ((model_a, state_ref, "A"), (model_b, state, "B")):
            try:
                model.load_state_dict(dict(weights))
            except RuntimeError as err:
                raise BasinError(f"model {label} does not fit the model factory's architecture "
                                 f"({str(err).splitlines()[0]})") from None
        return activation_matching(model_a, model_b, spec, data)
    raise BasinError(f"align: unknown method {method!r}; choose from {list(METHODS)}")


def align_states(states: list[Mapping[str, torch.Tensor]], reference_index: int, spec: PermutationSpec,
                 options: Mapping[str, Any] | None = None) -> tuple[list[dict[str, torch.Tensor]], list[MatchResult]]:
    """Permute every state dict onto `states[reference_index]` (which is returned unchanged)."""
    options = dict(options or {})
    if not 0 <= reference_index < len(states):
        raise BasinError(f"align: reference index {reference_index} out of range for {len(states)} models")
    ref = states[reference_index]
    out: list[dict[str, torch.Tensor]] = []
    results: list[MatchResult] = []
    for i, state in enumerate(states):
        if i == reference_index:
            out.append(dict(state))
            continue
        result = match(ref, state, spec, options)
        out.append(apply_permutation(state, spec, result.perms))
        results.append(result)
    return out, results


def align_checkpoints(checkpoints: list[Checkpoint], reference_index: int,
                      options: Mapping[str, Any] | None = None) -> list[Checkpoint]:
    """In-memory checkpoints of every model permuted onto the reference (loads whole models).

    options: method ("weight_matching" | "activation_matching"), seed, max_iter, spec,
    model_factory, data, residual ("auto" | True | False, transformers only).
    """
    options = dict(options or {})
    if options.get("method", "weight_matching") not in METHODS:
        raise BasinError(f"align: unknown method {options.get('method')!r}; choose from {list(METHODS)}")
    if not checkpoints:
        raise BasinError("align: no checkpoints")
    ref = checkpoints[reference_index] if 0 <= reference_index < len(checkpoints) else None
    if ref is None:
        raise BasinError(f"align: reference index {reference_index} out of range for {len(checkpoints)} models")
    spec = spec_for(ref, options)
    if ref.folder is not None and (Path(ref.folder) / "config.json").is_file():
        options.setdefault("hf_folder", Path(ref.folder))
    states = [load_state(c) for c in checkpoints]
    aligned, _ = align_states(states, reference_index, spec, options)
    out: list[Checkpoint] = []
    for i, (ckpt, state) in enumerate(zip(checkpoints, aligned)):
        if i == reference_index:
            out.append(ckpt)
            continue
        new = StateDictCheckpoint(state, label=f"{ckpt.label} aligned to {ref.label}", folder=ckpt.folder)
        new.revision, new.repo_id = ckpt.revision, ckpt.repo_id
        out.append(new)
    return out


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


def align_pair(ref_a: Any, ref_b: Any, out: Path, options: Mapping[str, Any] | None = None,
               overwrite: bool = False) -> tuple[Path, MatchResult]:
    """Write checkpoint B permuted onto A as a safetensors folder at `out` (with B's config/tokenizer
    files when B is a folder); the permutations go to `out/alignment.json`."""
    from merging.io.checkpoint import open_checkpoint
    from merging.io.guard import check_output, checkpoint_paths, protected_paths
    from merging.io.writer import ShardWriter

    options = dict(options or {})
    ckpt_a, ckpt_b = open_checkpoint(ref_a), open_checkpoint(ref_b)
    given = [r for r in (ref_a, ref_b, options.get("spec")) if isinstance(r, (str, Path))]
    protect = protected_paths(given + checkpoint_paths(ckpt_a) + checkpoint_paths(ckpt_b))
    check_output(out, protect)  # before any weights are read
    spec = spec_for(ckpt_a, options)
    if ckpt_a.folder is not None and (Path(ckpt_a.folder) / "config.json").is_file():
        options.setdefault("hf_folder", Path(ckpt_a.folder))
    state_a, state_b = load_state(ckpt_a), load_state(ckpt_b)
    result = match(state_a, state_b, spec, options)
    aligned = apply_permutation(state_b, spec, result.perms)
    layout = [(name, tuple(t.shape), t.dtype) for name, t in aligned.items()]
    with ShardWriter(Path(out), layout, overwrite=overwrite, protect=protect) as writer:
        for name, tensor in aligned.items():
            writer.add(name, tensor.contiguous())
        folder = Path(ckpt_b.folder) if ckpt_b.folder is not None else None
        if folder is not None and (folder / "config.json").is_file():
            for f in sorted(folder.iterdir()):
                if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and not f.name.startswith("."):
                    writer.copy_file(f)
        record = {"a": str(ref_a), "b": str(ref_b), **result.to_json(), "spec": spec.to_json()}
        writer.write_text("alignment.json", json.dumps(record) + "\n")
        path = writer.close()
    return path, result
