"""The output's config.json, and whether transformers can load the merged tensors with it.

`output_config` builds the config the output gets: the config source's (base model, else the first
model named) with dtype, layer count and per-layer fields (`merging.architectures`), vocab_size and
tie_word_embeddings patched. `check_loadable` builds, on the meta device (no memory, no weights), the
model class that config names and compares what `save_pretrained` would store (names and shapes,
tied duplicates optional, transformers' own load-time ignore patterns applied) with the merged
tensors. A problem the config source already has (an input checkpoint that loads with warnings) is
not held against the output; any other makes the merge fail before the output is renamed into place.
The check is skipped, with a note, when transformers is not installed or does not know the
architecture; remote code is never run.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import torch

from merging.architectures import OUTPUT_EMBED, config_source, patch_layers
from merging.io.checkpoint import Checkpoint, read_config
from taxonomy.errors import BasinError

LAYER_NUMBER = re.compile(r"(?<=\.)\d+(?=\.|$)")
Shapes = dict[str, tuple[int, ...]]


def output_config(recipe: Any, ckpts: dict[str, Checkpoint], plan: Any, dtype: str | None) -> dict[str, Any] | None:
    """The output's config.json as a dict (None when the config source has none)."""
    source = read_config(ckpts[config_source(recipe)])
    if source is None:
        return None
    config = copy.deepcopy(source)
    if dtype:
        for key in ("torch_dtype", "dtype"):
            if key in config or key == "torch_dtype":
                config[key] = dtype
    if plan.layer_origins is not None:
        patch_layers(config, [(layer, read_config(ckpts[ref])) for ref, layer in plan.layer_origins])
    if plan.vocab is not None:
        sub = config if "vocab_size" in config or "text_config" not in config else config["text_config"]
        sub["vocab_size"] = plan.vocab.size
    if any(OUTPUT_EMBED.search(t.name) for t in plan.tensors):  # the tied-embedding rule's output
        untie(config)
    return config


def untie(config: dict) -> None:
    """An output with its own lm_head: tie_word_embeddings false wherever it is true, and set false where no level
    says it (Gemma2's config.json omits it, and its class defaults to true: transformers would tie the lm_head)."""
    levels = [config] + ([config["text_config"]] if isinstance(config.get("text_config"), dict) else [])
    for sub in levels:
        if sub.get("tie_word_embeddings") is True:
            sub["tie_word_embeddings"] = False
    if all("tie_word_embeddings" not in sub for sub in levels):
        config["tie_word_embeddings"] = False


def check_plan(recipe: Any, ckpts: dict[str, Checkpoint], plan: Any, dtype: str | None) -> str | None:
    """`check_loadable` on the config and tensors a plan will write, the config source as reference."""
    config = output_config(recipe, ckpts, plan, dtype)
    if config is None:
        return None
    return check_loadable(config, {tp.name: tp.shape for tp in plan.tensors}, reference_of(recipe, ckpts))


def reference_of(recipe: Any, ckpts: dict[str, Checkpoint]) -> tuple[dict[str, Any], Shapes]:
    """The config source's config.json and tensor shapes (headers only): what the output is held against."""
    ref = ckpts[config_source(recipe)]
    return read_config(ref) or {}, {n: ref.meta(n).shape for n in ref.names()}


def check_written(folder: Path, tensors: Shapes, reference: tuple[dict[str, Any], Shapes] | None) -> str | None:
    """`check_loadable` on the config.json written in `folder` (nothing to check without one)."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    return check_loadable(json.loads(path.read_text()), tensors, reference)


def check_loadable(config: dict[str, Any], tensors: Shapes,
                   reference: tuple[dict[str, Any], Shapes] | None = None) -> str | None:
    """Raise BasinError if transformers would not load `tensors` (name -> shape) with `config`
    (missing, unexpected or misshapen tensors, or a config it refuses); return a note when not checked."""
    _check_layer_lists(config)
    if reference is not None and _same_model(config, tensors, *reference):
        return None  # the config source's own model, tensor for tensor: no problem of the output is a new one
    try:
        import transformers  # noqa: F401
    except ImportError:
        return "transformers is not installed: the output was not checked against the model it builds"
    arch = _class_name(config)
    cls = _model_class(arch)
    if cls is None:
        return f"transformers has no class {arch!r}: the output was not checked against it"
    key = (json.dumps(config, sort_keys=True), tuple(sorted(tensors.items())))
    problems = _problems_cached(cls, *key)
    if problems and reference is not None:
        ref_key = (json.dumps(reference[0], sort_keys=True), tuple(sorted(reference[1].items())))
        try:
            known = _problems_cached(cls, *ref_key)
        except BasinError:
            return f"{arch}: the config source's own config does not build in transformers; output not checked"
        problems = [p for p in problems if _general(p) not in {_general(k) for k in known}]
    if problems:
        raise BasinError(f"the output would not load in transformers as {arch} "
                         f"({_layer_count(config)}): {'; '.join(problems[:4])}"
                         f"{' ...' if len(problems) > 4 else ''}; nothing was written")
    return None


_NOT_SHAPE_FIELDS = frozenset({"torch_dtype", "dtype", "transformers_version", "_name_or_path"})


def _same_model(config: dict[str, Any], tensors: Shapes, ref_config: dict[str, Any], ref_tensors: Shapes) -> bool:
    """The output's config (fields that do not shape the model aside) and tensor shapes equal the config source's.
    Only problems absent from the reference are reported, so none can be: the check (and importing transformers,
    seconds on a small machine) is skipped."""
    def strip(c: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in c.items() if k not in _NOT_SHAPE_FIELDS}

    return bool(ref_config) and strip(config) == strip(ref_config) and dict(tensors) == {
        n: tuple(s) for n, s in ref_tensors.items()}


def _check_layer_lists(config: dict[str, Any]) -> None:
    """Every per-layer list of the config has one entry per layer (checked without transformers)."""
    from merging.architectures import LAYER_COUNTS, PER_LAYER_LISTS, layer_config

    sub = layer_config(config)
    n = next((sub[k] for k in LAYER_COUNTS if isinstance(sub.get(k), int)), None)
    for key in PER_LAYER_LISTS:
        if n is not None and isinstance(sub.get(key), list) and len(sub[key]) != n:
            raise BasinError(f"the output's config.json has {len(sub[key])} {key} entries for {n} layers; "
                             "transformers would not load it")


def _class_name(config: dict[str, Any]) -> str | None:
    arch = config.get("architectures")
    return arch[0] if isinstance(arch, list) and arch and isinstance(arch[0], str) else None


def _model_class(name: str | None):
    """transformers' own class of that name (never remote code), None if it has none."""
    import transformers

    if not name:
        return None
    try:
        cls = getattr(transformers, name)
    except (AttributeError, ImportError, RuntimeError):
        return None
    return cls if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel) else None


def _layer_count(config: dict[str, Any]) -> str:
    from merging.architectures import LAYER_COUNTS, layer_config

    sub = layer_config(config)
    n = next((sub[k] for k in LAYER_COUNTS if isinstance(sub.get(k), int)), None)
    return "layer count unknown" if n is None else f"{n} layers"


_CACHE: dict[tuple, list[str]] = {}


def _problems_cached(cls: type, config_text: str, tensors: tuple) -> list[str]:
    key = (cls, config_text, tensors)
    if key not in _CACHE:
        _CACHE.clear()  # one merge's two checks share a result; nothing accumulates across merges
        _CACHE[key] = _problems(cls, json.loads(config_text), dict(tensors))
    return list(_CACHE[key])


def _problems(cls: type, config: dict[str, Any], tensors: Shapes) -> list[str]:
    """What transformers would report loading `tensors` into `cls(config)`: missing, unexpected, shapes."""
    model = meta_model(cls, config)
    saved, tied = _saved_layout(model)
    ignore_missing = list(getattr(model, "_keys_to_ignore_on_load_missing", None) or [])
    ignore_unexpected = list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
    optional = {n for group in tied for n in group}
    missing = [n for n in saved if n not in tensors and n not in optional
               and not any(re.search(p, n) for p in ignore_missing)]
    missing += [group[0] for group in tied if not any(n in tensors for n in group)]
    unexpected = [n for n in tensors if n not in saved and not any(re.search(p, n) for p in ignore_unexpected)]
    shapes = [f"{n} is {list(tensors[n])}, the model's is {list(saved[n])}" for n in tensors
              if n in saved and tuple(tensors[n]) != tuple(saved[n])]
    return ([f"missing {n}" for n in missing] + [f"unexpected {n}" for n in unexpected]
            + [f"shape: {s}" for s in shapes])


def meta_model(cls: type, config: dict[str, Any]):
    """`cls` built from `config` on the meta device; a config transformers refuses is an error."""
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        cfg = cls.config_class.from_dict({k: v for k, v in config.items() if k != "auto_map"})
        with torch.device("meta"):
            return cls(cfg)
    except Exception as e:  # noqa: BLE001  (transformers raises many kinds for a bad config)
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BasinError(f"the output's config.json does not build a {cls.__name__} in transformers: {text}") from None
    finally:
        transformers.logging.set_verbosity(level)


def _saved_layout(model) -> tuple[Shapes, list[list[str]]]:
    """Names and shapes `save_pretrained` would store for `model` (its weight conversions reverted),
    and the groups of tied names (one of each group is enough)."""
    state = model.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for name, value in state.items():
        groups.setdefault(id(value), []).append(name)
    saved = _revert(model, {n: v.detach() for n, v in state.items()})
    tied = [[_revert_name(model, n, state[n]) for n in g] for g in groups.values() if len(g) > 1]
    return {n: tuple(v.shape) for n, v in saved.items()}, tied


def _revert(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers >= 5 keeps checkpoints in their original layout (e.g. Mixtral's experts one by one)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return state
    return revert_weight_conversion(model, state)


def _revert_name(model, name: str, tensor: torch.Tensor) -> str:
    try:
        names = list(_revert(model, {name: tensor.detach()}))
    except Exception:  # noqa: BLE001  (a converter that needs its siblings: keep the model's name)
        return name
    return names[0] if len(names) == 1 else name


def _general(problem: str) -> str:
    """A problem with its layer numbers erased, to compare the output's with its config source's."""
    return LAYER_NUMBER.sub("#", problem)
