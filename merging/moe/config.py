"""mergekit-moe's YAML schema, parsed into dataclasses and checked without any I/O.

Fields as mergekit-moe reads them: `base_model`, `experts` (each `source_model`, `positive_prompts`,
`negative_prompts`, `noise_scale`, `residual_scale`), `shared_experts` (same fields), `gate_mode` (`hidden`,
`cheap_embed`, `random`, `uniform_random`; mergekit's aliases `hidden_avg`, `hidden_last`), `dtype`,
`experts_per_token` (default 2) and `architecture` (`mixtral`, `qwen`, `qwen3`: pick the output class);
basin adds `seed` (random gates and `noise_scale` noise; default 0), so that a recipe is reproducible.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merging.dtypes import MERGE_DTYPES, canonical
from merging.recipe.yaml_reader import load_recipe_text, read_recipe_file
from taxonomy.errors import BasinWarning, RecipeError, unknown

GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")
RANDOM_MODES = ("random", "uniform_random")
ARCHITECTURES = ("mixtral", "qwen", "qwen3")
TOP_LEVEL = {"base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture",
             "seed"}
EXPERT_FIELDS = {"source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale"}


@dataclass
class Expert:
    """One dense model whose MLPs become one expert per layer (mergekit's `Expert`)."""

    source_model: str
    positive_prompts: list[str] = field(default_factory=list)
    negative_prompts: list[str] = field(default_factory=list)
    noise_scale: float | None = None
    residual_scale: float | None = None


@dataclass
class MoEConfig:
    """A mergekit-moe configuration (see the module docstring)."""

    base_model: str
    experts: list[Expert]
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: list[Expert] = field(default_factory=list)
    architecture: str | None = None
    seed: int = 0
    text: str | None = None  # the YAML it was read from (copied into the output)

    @classmethod
    def from_yaml(cls, path: str | Path) -> MoEConfig:
        path = Path(path)
        text = read_recipe_file(path)
        config = cls.from_dict(load_recipe_text(text, str(path)), str(path))
        config.text = text
        return config

    @classmethod
    def from_dict(cls, data: Any, where: str = "moe config") -> MoEConfig:
        if not isinstance(data, dict):
            raise RecipeError(f"{where}: expected a mapping with base_model and experts")
        for key in data:
            if key not in TOP_LEVEL:
                raise RecipeError(f"{where}: {unknown('field', key, TOP_LEVEL)}")
        for key in ("base_model", "experts"):
            if data.get(key) in (None, "", []):
                raise RecipeError(f"{where}: {key!r} is required")
        config = cls(
            base_model=_text(data["base_model"], f"{where}: base_model"),
            experts=_experts(data["experts"], f"{where}: experts"),
            gate_mode=data.get("gate_mode", "hidden"),
            dtype=data.get("dtype"),
            experts_per_token=data.get("experts_per_token", 2),
            shared_experts=_experts(data.get("shared_experts") or [], f"{where}: shared_experts"),
            architecture=data.get("architecture"),
            seed=data.get("seed", 0),
        )
        config.validate(where)
        return config

    def validate(self, where: str = "moe config") -> None:
        """mergekit-moe's checks (`is_bad_config`), as one-line errors naming the field."""
        if self.gate_mode not in GATE_MODES:
            raise RecipeError(f"{where}: gate_mode: {unknown('gate mode', self.gate_mode, GATE_MODES)}")
        if self.dtype is not None and canonical(self.dtype) is None:
            raise RecipeError(f"{where}: dtype must be one of {', '.join(MERGE_DTYPES)}; got {self.dtype!r}")
        if self.architecture is not None and str(self.architecture).lower() not in ARCHITECTURES:
            raise RecipeError(f"{where}: architecture: {unknown('architecture', self.architecture, ARCHITECTURES)}")
        _integer(self.seed, f"{where}: seed", 0)
        _integer(self.experts_per_token, f"{where}: experts_per_token", 1)
        if self.experts_per_token > len(self.experts):
            raise RecipeError(f"{where}: experts_per_token is {self.experts_per_token} but there are only "
                              f"{len(self.experts)} experts")
        self._check_prompts(where)

    def _check_prompts(self, where: str) -> None:
        if self.gate_mode in RANDOM_MODES:
            return
        for k, expert in enumerate(self.experts):
            if not expert.positive_prompts:
                raise RecipeError(f"{where}: experts[{k}] ({expert.source_model}) has no positive_prompts; gate_mode "
                                  f"{self.gate_mode!r} computes its router weights from them")
        with_prompts = [bool(e.positive_prompts) for e in self.shared_experts]
        if any(with_prompts) and not all(with_prompts):
            raise RecipeError(f"{where}: shared_experts: give positive_prompts for every shared expert or for none")
        first = _prompts(self.experts[0])
        if len(self.experts) > 1 and all(_prompts(e) == first for e in self.experts[1:]):
            raise RecipeError(f"{where}: every expert has the same positive and negative prompts, so every router "
                              "row would be the same: give each expert prompts of what it should receive")
        if len(self.experts) > 1 and len({e.source_model for e in self.experts}) == 1:
            warnings.warn(f"{where}: every expert is {self.experts[0].source_model}: the output computes the same "
                          "function as that model, at a larger cost, until it is trained", BasinWarning, stacklevel=3)

    @property
    def out_dtype(self) -> str | None:
        return canonical(self.dtype) if self.dtype else None

    @property
    def gated(self) -> list[Expert]:
        """The experts that get a router row: the routed ones, then the shared ones with prompts (or random)."""
        shared = self.shared_experts
        if self.gate_mode in RANDOM_MODES or (shared and shared[0].positive_prompts):
            return self.experts + shared
        return list(self.experts)

    def model_refs(self) -> list[str]:
        """Every model named, base first, each once."""
        refs = [self.base_model] + [e.source_model for e in self.experts + self.shared_experts]
        return list(dict.fromkeys(refs))


def _prompts(expert: Expert) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(expert.positive_prompts), tuple(expert.negative_prompts)


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RecipeError(f"{where}: expected a model reference (a path or a Hub id), got {value!r}")
    return value


def _integer(value: Any, where: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise RecipeError(f"{where}: expected a whole number >= {low}, got {value!r}")


def _strings(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise RecipeError(f"{where}: expected a list of non-empty strings")
    return list(value)


def _scale(value: Any, where: str) -> float | None:
    import math

    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecipeError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def _expert(item: Any, where: str) -> Expert:
    if isinstance(item, str):
        item = {"source_model": item}
    if not isinstance(item, dict):
        raise RecipeError(f"{where}: expected a mapping with source_model")
    for key in item:
        if key not in EXPERT_FIELDS:
            raise RecipeError(f"{where}: {unknown('field', key, EXPERT_FIELDS)}")
    if "source_model" not in item:
        raise RecipeError(f"{where}: 'source_model' is required")
    noise = _scale(item.get("noise_scale"), f"{where}.noise_scale")
    if noise is not None and noise < 0:
        raise RecipeError(f"{where}.noise_scale: expected a number >= 0, got {noise}")
    return Expert(_text(item["source_model"], f"{where}.source_model"),
                  _strings(item.get("positive_prompts"), f"{where}.positive_prompts"),
                  _strings(item.get("negative_prompts"), f"{where}.negative_prompts"),
                  noise, _scale(item.get("residual_scale"), f"{where}.residual_scale"))


def _experts(value: Any, where: str) -> list[Expert]:
    if not isinstance(value, list):
        raise RecipeError(f"{where}: expected a list of experts")
    return [_expert(item, f"{where}[{k}]") for k, item in enumerate(value)]
