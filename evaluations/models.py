"""Transformers models from basin checkpoint references, weights streamed in tensor by tensor.

`load_model(ref)` accepts every reference `basin merge` does (folder, `.safetensors` file with a config.json beside
it, Hub id from the local cache, `base+lora`), reads its config.json with `AutoConfig` (local files only, never
remote code), builds the class named in `config.architectures` with weight initialisation skipped, directly in
the requested dtype (torch's default dtype set while it is built, as `from_pretrained(dtype=...)` does: no
float32 copy, no conversion pass, float32-by-design buffers such as RoPE's `inv_freq` stay float32), and copies
each tensor from `merging.io.checkpoint.open_checkpoint(ref).get(name)` (memory-mapped) into it. Tied weights
(parameters sharing storage, e.g. `lm_head.weight` and the input embedding) need only one of their names in the
checkpoint and stay tied. Names transformers renames on load are read by their stored names (GPT-NeoX's
`embed_out`, older `LayerNorm.gamma`/`.beta`) and tensors it fuses on load (Mixtral's per-expert weights into one
`gate_up_proj`) are assembled from their parts (`evaluations.load_names`). Peak anonymous memory: one model in the
requested dtype (measured 1.00x, float32 and bfloat16, tied or untied heads;
`tests/evaluations/test_checkpoint_paths.py`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from evaluations.load_names import fused_view, load_renames
from merging.dtypes import EVAL_DTYPES, canonical, torch_dtype
from taxonomy.errors import CheckpointError


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'float32' / 'float64' / 'float16' / 'bfloat16' (or a torch dtype) -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = canonical(dtype, EVAL_DTYPES)
    if name is None:
        raise CheckpointError(f"dtype={dtype!r}: choose from {sorted(EVAL_DTYPES)}")
    return torch_dtype(name)


def parse_device(device: str | torch.device) -> torch.device:
    """A torch device that exists on this machine; a one-line error otherwise."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise CheckpointError(f"device={device!r}: not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"device={device!r}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CheckpointError(f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def config_folder(ckpt, ref: object) -> Path:
    """The folder holding the checkpoint's config.json; a one-line error when there is none."""
    folder = getattr(ckpt, "folder", None)
    if folder is None or not (Path(folder) / "config.json").is_file():
        where = folder if folder is not None else ref
        raise CheckpointError(f"{where}: no config.json beside the weights; pass --model-factory module:fn to "
                              "build the model")
    return Path(folder)


def load_config(folder: Path):
    """`AutoConfig` from `folder/config.json`, local files only; a config needing remote code is refused."""
    from transformers import AutoConfig

    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable config.json ({err})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: config.json is not a JSON object")
    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as err:
        hint = " (it names remote code in auto_map; basin never runs remote code)" if "auto_map" in raw else ""
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: transformers cannot build model_type {raw.get('model_type')!r}{hint}: "
                              f"{first}") from None


def model_class(config, path: Path) -> type:
    """The transformers class named by `config.architectures[0]` (a built-in PreTrainedModel for this config)."""
    import transformers
    from transformers import PreTrainedModel

    archs = getattr(config, "architectures", None) or []
    if not archs:
        raise CheckpointError(f"{path}: config.json names no architectures; pass --model-factory module:fn")
    cls = getattr(transformers, str(archs[0]), None)
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise CheckpointError(f"{path}: architecture {archs[0]!r} is not a transformers model class (remote code "
                              "is never run); pass --model-factory module:fn")
    if cls.config_class is not None and not isinstance(config, cls.config_class):
        raise CheckpointError(f"{path}: architecture {archs[0]!r} does not take a {type(config).__name__}")
    return cls


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """torch's default floating dtype set to `dtype` inside the block (as transformers' from_pretrained does)."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def build_model(config, cls: type, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """An instance of `cls` for `config` on `device`, weights left uninitialised (they are loaded next).

    Built directly in `dtype` (no float32 copy, no conversion pass): buffers a class computes in float32 on
    purpose (e.g. Llama's RoPE `inv_freq`) stay float32, as with `from_pretrained(dtype=...)`."""
    from transformers.initialization import no_init_weights

    try:
        with no_init_weights(), torch.device(device), default_dtype(dtype):
            model = cls(config)
    except RuntimeError as err:
        raise CheckpointError(f"cannot build {cls.__name__} on device {str(device)!r}: {err}") from None
    for param in model.parameters():  # a head some classes build in the config's dtype (Llama's score)
        if param.is_floating_point() and param.dtype != dtype:
            param.data = torch.empty_like(param.data, dtype=dtype)
    model.eval()
    model.tie_weights()  # the config's ties (e.g. tie_word_embeddings), so tied names share one storage
    return model


def tied_groups(model: nn.Module) -> dict[str, list[str]]:
    """name -> every state-dict name sharing its storage (itself included)."""
    by_ptr: dict[tuple, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        key = (t.data_ptr(), tuple(t.shape), t.device) if t.numel() else (name,)  # empty tensors share ptr 0
        by_ptr.setdefault(key, []).append(name)
    return {n: group for group in by_ptr.values() for n in group}


def ignorable(model: nn.Module, name: str) -> bool:
    """A checkpoint tensor the model recomputes itself: a non-persistent buffer (older checkpoints saved e.g.
    `embeddings.position_ids`), or one its class lists in `_keys_to_ignore_on_load_unexpected`."""
    import re

    if name in dict(model.named_buffers()):
        return True
    patterns = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []
    return any(re.search(p, name) for p in patterns)


def check_names(model: nn.Module, ckpt, label: object) -> dict[str, str]:
    """model tensor name -> the checkpoint name to read it from (a tied partner when it is absent, or the name
    transformers would rename on load: `load_names.load_renames`; pass `load_names.fused_view(model, ckpt)` for
    tensors it fuses); missing, unexpected or mis-shaped tensors are a one-line
    error."""
    names = set(ckpt.names())
    state = model.state_dict()
    groups = tied_groups(model)
    renamed, fused = load_renames(model, names - set(state))
    source: dict[str, str] = {}
    for name, t in state.items():
        present = [n for n in groups[name] if n in names] or [renamed[n] for n in groups[name] if n in renamed]
        if not present:
            if fused:
                raise CheckpointError(f"{label}: tensor {name!r} of {type(model).__name__} is stored as separate "
                                      f"tensors that transformers fuses on load (e.g. {fused[0]!r}) in a way basin "
                                      "does not read (`evaluations.load_names`)")
            raise CheckpointError(f"{label}: tensor {name!r} of {type(model).__name__} is missing from the checkpoint")
        source[name] = name if name in names else present[0]
        shape = tuple(ckpt.meta(source[name]).shape)
        if shape != tuple(t.shape):
            raise CheckpointError(f"{label}: tensor {source[name]!r} has shape {shape}, {type(model).__name__} "
                                  f"expects {tuple(t.shape)}")
    extra = sorted(n for n in names - set(state) - set(renamed.values()) if not ignorable(model, n))
    if extra:
        raise CheckpointError(f"{label}: tensor {extra[0]!r} is not in {type(model).__name__} "
                              f"({len(extra)} unexpected)")
    return source


def copy_weights(model: nn.Module, ckpt, source: dict[str, str]) -> None:
    """Copy every tensor of `ckpt` into `model` in place, one at a time (cast to the model's dtype)."""
    state = model.state_dict()
    with torch.no_grad():
        for name, t in state.items():
            t.copy_(ckpt.get(source[name]))


def load_model(ref: object, dtype: str | torch.dtype = "float32", device: str = "cpu",
               allow_pickle: bool = False) -> nn.Module:
    """The transformers model of checkpoint `ref` (see the module docstring), in eval mode."""
    from merging.io.checkpoint import open_checkpoint

    dtype, device = parse_dtype(dtype), parse_device(device)
    ckpt = open_checkpoint(ref, allow_pickle=allow_pickle)
    folder = config_folder(ckpt, ref)
    config = load_config(folder)
    cls = model_class(config, folder / "config.json")
    model = build_model(config, cls, dtype, device)
    ckpt = fused_view(model, ckpt)
    copy_weights(model, ckpt, check_names(model, ckpt, ref))
    model.basin_folder = folder
    return model
