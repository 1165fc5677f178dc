"""PEFT LoRA adapters as dense task vectors and as lazy "base+adapter" checkpoints.

LoRA (Hu et al. 2022) adds Delta W = s * B @ A to a targeted weight W (A: r x in, B: out x r) with
s = lora_alpha / r, or lora_alpha / sqrt(r) with `use_rslora` (Kalajdzievski 2023). A PEFT adapter
folder holds `adapter_config.json` and `adapter_model.safetensors` with tensors named
`base_model.model.<module>.lora_A.weight` / `.lora_B.weight` (embedding layers:
`lora_embedding_A` / `lora_embedding_B`, Delta W = s * (B @ A)^T; transformers' Conv1D layers (GPT-2, weight
stored in x out): transposed too). Which layers are transposed is decided per module, as PEFT decides it: PEFT
sets `fan_in_fan_out` from each wrapped module's type (True for a Conv1D, False for an nn.Linear), overriding the
config's value, so basin reads the base's family (`merging.architectures.is_conv1d`); only for a base without a
config.json `model_type` does the shape decide, and for a square weight the config's `fan_in_fan_out`.
`alpha_pattern` overrides lora_alpha per module (PEFT's rule: the pattern matches a dotted
suffix of the module name); r is read from A's shape, so `rank_pattern` needs no handling.
Other tensors in the adapter (`modules_to_save` copies, named as trained or as saved, embedding layers saved with
`save_embedding_layers`, trained biases) replace the base's. A tied base (no `lm_head`, one input embedding, config
not saying tie_word_embeddings: false) gets the adapter's `lm_head` (a full one, as mergekit-extract-lora or
`modules_to_save` write, or LoRA factors applied to the input embedding) as a new tensor; the output's config.json
then says tie_word_embeddings: false (merging.pipeline).
DoRA adapters (`use_dora`) are refused.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from merging.architectures import INPUT_EMBED, OUTPUT_EMBED, is_conv1d
from merging.io.checkpoint import Checkpoint, TensorMeta, read_config
from taxonomy.errors import CheckpointError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<embedding>embedding_)?(?P<part>[AB])(?:\.[^.]+)?(?:\.weight)?$")


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: Delta W = scale * B @ A, transposed when `transpose` (an embedding's always)."""

    module: str
    a: torch.Tensor
    b: torch.Tensor
    scale: float
    transpose: bool = False
    embedding: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        out, inp = self.b.shape[0], self.a.shape[1]
        return (inp, out) if self.transpose else (out, inp)

    def delta(self) -> torch.Tensor:
        product = self.scale * (self.b.to(torch.float32) @ self.a.to(torch.float32))
        return product.T if self.transpose else product


@dataclass(frozen=True)
class LoraTensor:
    """One input's tensor with its LoRA update kept as factors, for methods that merge the factors (KnOTS):
    the tensor is `full` (None: the base's own) plus `up @ down` (None: no update), transposed when `transpose`.
    `up` (out x r) carries the scale s, `down` is A (r x in): the layer's orientation, whatever the storage."""

    full: torch.Tensor | None
    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    transpose: bool = False

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.full, self.up, self.down) if t is not None]

    def map(self, fn) -> LoraTensor:
        """The same tensor with `fn` applied to each part (a device move, a dtype cast)."""
        return LoraTensor(*(None if t is None else fn(t) for t in (self.full, self.up, self.down)), self.transpose)

    def update(self) -> torch.Tensor | None:
        """The LoRA update as stored (float32), or None."""
        if self.up is None:
            return None
        product = self.up.to(torch.float32) @ self.down.to(torch.float32)
        return product.T if self.transpose else product

    def dense(self, base: torch.Tensor) -> torch.Tensor:
        """The input's tensor in full (float32), `base` standing for the base's own."""
        weight = (base if self.full is None else self.full).to(torch.float32)
        update = self.update()
        return weight if update is None else weight + update


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter read from a folder: its modules and any full tensors it replaces."""

    folder: Path
    config: dict
    modules: dict[str, LoraModule]
    full: dict[str, torch.Tensor] = field(default_factory=dict)


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    for pattern, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", module):
            return float(value)
    return float(default)


def _read_config(folder: Path) -> tuple[dict, Path]:
    """The folder's adapter_config.json, checked; and the weights file's path."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such LoRA adapter folder")
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: missing {CONFIG_NAME}; not a PEFT adapter folder")
    if not weights_path.is_file():
        pickle = (folder / "adapter_model.bin").exists()
        hint = " (adapter_model.bin is a pickle; convert it to safetensors)" if pickle else ""
        raise CheckpointError(f"{folder}: missing {WEIGHTS_NAME}{hint}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        config = None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: not a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise CheckpointError(f"{config_path}: peft_type {peft_type!r} is not supported (only LORA)")
    if config.get("use_dora"):
        raise CheckpointError(f"{config_path}: DoRA adapters (use_dora) are not supported")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool):
            raise CheckpointError(f"{config_path}: field {key!r} must be a number, got {config.get(key)!r}")
    return config, weights_path


def full_tensor_name(name: str) -> str:
    """The base model's name for a full tensor saved in an adapter: PEFT's `X.modules_to_save[.<adapter>].weight`
    (as trained, or as saved) and `X.base_layer.weight` (embedding layers saved with save_embedding_layers) are
    `X.weight`."""
    name = re.sub(r"\.modules_to_save(\.[^.]+)?(?=\.)", "", name)
    return re.sub(r"\.base_layer(?=\.)", "", name)


def _split_tensors(tensors: dict[str, torch.Tensor], weights_path: Path
                   ) -> tuple[dict[str, dict[str, torch.Tensor]], set[str], dict[str, torch.Tensor]]:
    """LoRA factors per module ({module: {"A": .., "B": ..}}), the embedding modules, and the full tensors."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    embedding: set[str] = set()
    full: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        if ".lora_" in name and name.endswith(".bias"):
            raise CheckpointError(f"{weights_path}: tensor {key!r} is a LoRA bias (lora_bias); not supported")
        if "lora_magnitude_vector" in name:
            raise CheckpointError(f"{weights_path}: tensor {key!r} belongs to a DoRA adapter; not supported")
        match = _LORA_KEY.match(name)
        if match is None:
            full[full_tensor_name(name)] = tensor
            continue
        parts.setdefault(match["module"], {})[match["part"]] = tensor
        if match["embedding"]:
            embedding.add(match["module"])
    return parts, embedding, full


def read_adapter(folder: Path | str) -> LoraAdapter:
    """Read and check a PEFT LoRA adapter folder (config and safetensors weights)."""
    folder = Path(folder)
    config, weights_path = _read_config(folder)
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"{weights_path}: cannot read: {err}") from None
    parts, embedding, full = _split_tensors(tensors, weights_path)
    use_rslora = bool(config.get("use_rslora", False))
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    modules: dict[str, LoraModule] = {}
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise CheckpointError(
                f"{weights_path}: module {module!r} has lora_{''.join(ab)} but not both lora_A and lora_B")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise CheckpointError(
                f"{weights_path}: module {module!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                             "do not form B @ A")
        rank = a.shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        modules[module] = LoraModule(module, a, b, scale, transpose=module in embedding or fan_in_fan_out,
                                     embedding=module in embedding)
    if not modules and not full:
        raise CheckpointError(f"{weights_path}: holds no LoRA tensors")
    return LoraAdapter(folder, config, modules, full)


def _resolve(module: str, suffix: str, names: list[str], label: str, what: str) -> str:
    """The base tensor for `module` + `suffix`: exact, else the unique base name ending with it,
    else the adapter name with leading components removed (adapters trained on a wrapper model)."""
    target = module + suffix
    if target in names:
        return target
    ending = [n for n in names if n.endswith("." + target)]
    if len(ending) == 1:
        return ending[0]
    pieces = target.split(".")
    for start in range(1, len(pieces) - 1):
        shorter = ".".join(pieces[start:])
        if shorter in names:
            return shorter
    raise CheckpointError(f"{label}: LoRA {what} {module!r} has no tensor {target!r} in the base model")


def tied_input_embedding(base: Checkpoint) -> str | None:
    """The input embedding a tied base's missing output embedding reads: the base has no `lm_head` (or
    `embed_out`), exactly one input embedding, and its config.json does not say tie_word_embeddings: false (Gemma2's
    omits the key, true by default); else None."""
    names = base.names()
    if any(OUTPUT_EMBED.search(n) for n in names):
        return None
    embeds = [n for n in names if INPUT_EMBED.search(n)]
    config = read_config(base) or {}
    untied = config.get("tie_word_embeddings") is False or (config.get("text_config") or {}).get(
        "tie_word_embeddings") is False
    return embeds[0] if len(embeds) == 1 and not untied else None


def _bind_name(target: str, names: list[str], head_source: str | None, label: str, what: str, module: str) -> str:
    """_resolve, except that an output embedding a tied base lacks is bound under its adapter name."""
    if head_source is not None and OUTPUT_EMBED.search(target) and not _resolvable(target, names):
        return target
    return _resolve(module, target[len(module):], names, label, what)


def _resolvable(target: str, names: list[str]) -> bool:
    return target in names or any(n.endswith("." + target) for n in names)


def _bind(base: Checkpoint, adapter: LoraAdapter) -> tuple[dict[str, LoraModule], dict[str, torch.Tensor], str | None]:
    """Map the adapter's modules and full tensors to base tensor names, checking shapes; and the input embedding
    that an output embedding added to a tied base starts from (None if none is added)."""
    names = base.names()
    label = f"{adapter.folder}"
    source = tied_input_embedding(base)

    def shape_of(name: str) -> tuple[int, ...]:
        return tuple(base.meta(source if name not in names else name).shape)

    lora: dict[str, LoraModule] = {}
    config = read_config(base)
    for module, lm in adapter.modules.items():
        name = _bind_name(module + ".weight", names, source, label, "target module", module)
        lm = replace(lm, transpose=_transposed(lm, name.removesuffix(".weight"), shape_of(name), config))
        if shape_of(name) != lm.shape:
            raise CheckpointError(f"{label}: LoRA module {module!r} gives a {lm.shape} update for {name!r} of shape "
                             f"{shape_of(name)}")
        lora[name] = lm
    full: dict[str, torch.Tensor] = {}
    for key, tensor in adapter.full.items():
        name = _bind_name(key, names, source, label, "tensor", key)
        if shape_of(name) != tuple(tensor.shape):
            raise CheckpointError(
                f"{label}: tensor {key!r} has shape {tuple(tensor.shape)}, the base's {name!r} has {shape_of(name)}"
            )
        full[name] = tensor
    added = any(n not in names for n in [*lora, *full])
    return lora, full, source if added else None


def _transposed(lm: LoraModule, module: str, shape: tuple[int, ...], config: dict | None) -> bool:
    """Whether the update of base module `module` is (B A)^T (module docstring: PEFT's per-module rule)."""
    if lm.embedding:
        return True
    conv1d = is_conv1d(module, config)
    if conv1d is not None:
        return conv1d
    out, inp = lm.b.shape[0], lm.a.shape[1]
    if out != inp and shape in ((out, inp), (inp, out)):
        return shape == (inp, out)
    return lm.transpose


class LoraCheckpoint(Checkpoint):
    """The base with a LoRA adapter folded in, lazily: get(name) = W + s * B @ A for adapted weights."""

    def __init__(self, base: Checkpoint, adapter: LoraAdapter):
        self.base = base
        self.adapter = adapter
        self.label = f"{base.label}+{adapter.folder}"
        self.folder = base.folder
        self.revision = base.revision
        self.repo_id = base.repo_id
        self._lora, self._full, self._head_source = _bind(base, adapter)
        base_names = set(base.names())
        self._added = [n for n in dict.fromkeys([*self._full, *self._lora]) if n not in base_names]

    def names(self) -> list[str]:
        return self.base.names() + self._added

    def _stored(self, name: str) -> str:
        """The base tensor `name` starts from: an output embedding added to a tied base starts from its input one."""
        return self._head_source if name in self._added else name

    def meta(self, name: str) -> TensorMeta:
        return self.base.meta(self._stored(name))

    def get(self, name: str) -> torch.Tensor:
        """The adapter's full tensor, else the base's; plus the LoRA update of that module if any (PEFT saves a
        LoRA'd embedding or head whole as well, `<module>.base_layer.weight`, and adds its update on top)."""
        if name in self._full:
            weight = self._full[name].to(self.meta(name).dtype)
        else:
            weight = self.base.get(self._stored(name))
        module = self._lora.get(name)
        if module is None:
            return weight
        return (weight.to(torch.float32) + module.delta().to(weight.device)).to(weight.dtype)

    def lora_tensor(self, name: str) -> LoraTensor:
        """Tensor `name` as the base's (`full` None) or the adapter's full tensor, plus its LoRA factors if any."""
        full = self._full[name].to(self.meta(name).dtype) if name in self._full else None
        if full is None and name in self._added:  # an output embedding added to a tied base: its own tensor
            full = self.base.get(self._stored(name))
        module = self._lora.get(name)
        if module is None:
            return LoraTensor(full)
        return LoraTensor(full, module.scale * module.b.to(torch.float32), module.a.to(torch.float32),
                          module.transpose)

    def adapted_names(self) -> list[str]:
        """Base tensor names that the adapter changes."""
        return sorted({*self._lora, *self._full})


def open_lora(base: Checkpoint, adapter_dir: Path | str) -> LoraCheckpoint:
    """Open `base` with the PEFT LoRA adapter in `adapter_dir` folded in (mergekit's `model+lora`)."""
    return LoraCheckpoint(base, read_adapter(adapter_dir))


def lora_task_vector(adapter_dir: Path | str, base: Checkpoint | None = None) -> dict[str, torch.Tensor]:
    """The adapter as a dense task vector, float32: {weight name: s * B @ A}.

    Without `base`, names are `<module>.weight` as in the adapter; with `base`, names are resolved
    to the base's tensors and shapes are checked, and full tensors the adapter replaces contribute
    their difference from the base.
    """
    adapter = read_adapter(adapter_dir)
    if base is None:
        return {module + ".weight": lm.delta() for module, lm in adapter.modules.items()}
    lora, full, source = _bind(base, adapter)
    names = set(base.names())
    out = {name: lm.delta() for name, lm in lora.items()}
    for name, tensor in full.items():
        diff = tensor.to(torch.float32) - base.get(name if name in names else source).to(torch.float32)
        out[name] = diff + out[name] if name in out else diff
    return out
