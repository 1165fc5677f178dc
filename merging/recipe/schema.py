"""Merge recipes in mergekit's YAML schema, parsed into dataclasses and checked without any I/O.

Parameter settings follow mergekit's `evaluate_setting`: a scalar; a list of numbers, a gradient
read at the tensor's relative depth t in [0, 1] by piecewise-linear interpolation between
evenly spaced anchors (numpy.interp); or a list of `{filter: substring, value: ...}` entries,
the first whose filter occurs in the tensor name winning (an entry without a filter matches
every name, so it goes last as the default).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from merging.dtypes import LOW_PRECISION, MERGE_DTYPES, canonical
from merging.io.references import join_adapter
from merging.recipe.yaml_reader import load_recipe_text, read_recipe_file
from taxonomy.errors import BasinWarning, RecipeError, unknown

TOP_LEVEL = {
    "models", "slices", "merge_method", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source",
    "tokenizer", "seed", "align", "name", "allow_mixed_architectures", "chat_template", "compute_dtype", "measure",
}
UNSUPPORTED = {
    "modules": "multi-module merges are not supported",
}
OTHER_TOOLS = {  # fields that mark a configuration for another mergekit command
    "gate_mode": "a mergekit-moe (mixture of experts) configuration: build it with `basin moe CONFIG OUT`",
    "experts": "a mergekit-moe (mixture of experts) configuration: build it with `basin moe CONFIG OUT`",
    "genome": "a mergekit-evolve configuration; basin does not run evolutionary merges: use mergekit-evolve",
}


@dataclass
class ModelSpec:
    model: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class SliceSource:
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class OutputSlice:
    sources: list[SliceSource]
    parameters: dict[str, Any] = field(default_factory=dict)
    base_model: str | None = None
    residual_weight: float | None = None  # mergekit's schema has it; neither mergekit nor basin uses it


@dataclass
class Recipe:
    """A merge recipe (mergekit's configuration, plus basin's `seed` and `align`)."""

    merge_method: str
    models: list[ModelSpec] = field(default_factory=list)
    slices: list[OutputSlice] | None = None
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: dict[str, Any] | None = None  # mergekit's tokenizer: block (source, tokens, pad_to_multiple_of)
    seed: int = 0
    align: dict[str, Any] | None = None
    name: str | None = None
    allow_mixed_architectures: bool = False  # basin: merge inputs whose config.json architectures differ
    chat_template: str | None = None  # 'auto', a named template (merging.output.chat_templates) or a Jinja template
    compute_dtype: str | None = None  # None/float32: float32 arithmetic; float16/bfloat16: mergekit's (lowprec)
    measure: dict[str, Any] | None = None  # basin: what `basin merge` measures after the merge (`check_measure`)

    # --- construction -------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, source: str | Path) -> Recipe:
        """From a YAML file path or YAML text (bounded: see `merging.recipe.yaml_reader`)."""
        where = "recipe"
        text = str(source)
        if isinstance(source, Path) or ("\n" not in text and text.endswith((".yaml", ".yml", ".json"))):
            where, text = str(source), read_recipe_file(Path(source))
        return cls.from_dict(load_recipe_text(text, where), where)

    @classmethod
    def from_dict(cls, data: Any, where: str = "recipe") -> Recipe:
        _check_top_level(data, where)
        models = [_model_spec(m, f"{where}: models[{i}]") for i, m in enumerate(_list(data, "models", where))]
        slices = None
        if data.get("slices") is not None:
            slices = [_slice(s, f"{where}: slices[{i}]") for i, s in enumerate(_list(data, "slices", where))]
        align = data.get("align")
        if isinstance(align, str):
            align = {"method": align}
        source = data.get("tokenizer_source")
        recipe = cls(
            merge_method=str(data["merge_method"]),
            models=models,
            slices=slices,
            base_model=model_reference(data.get("base_model"), f"{where}: base_model"),
            parameters=_params(data.get("parameters"), f"{where}: parameters"),
            dtype=data.get("dtype"),
            out_dtype=data.get("out_dtype"),
            tokenizer_source=(model_reference(source, f"{where}: tokenizer_source") if isinstance(source, dict)
                              else source),
            tokenizer=data.get("tokenizer"),
            seed=data.get("seed", 0),
            align=align,
            name=data.get("name"),
            allow_mixed_architectures=data.get("allow_mixed_architectures", False),
            chat_template=data.get("chat_template"),
            compute_dtype=data.get("compute_dtype"),
            measure=data.get("measure"),
        )
        recipe.validate(where)
        return recipe

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.slices is None:
            d.pop("slices")
        else:
            d.pop("models")
            for sl in d["slices"]:
                if sl["residual_weight"] is None:
                    sl.pop("residual_weight")
        if not self.allow_mixed_architectures:
            d.pop("allow_mixed_architectures")
        return {k: v for k, v in d.items() if v not in (None, {}, [])}

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.to_dict()))

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_json(), sort_keys=False)

    # --- checks without I/O ---------------------------------------------------------------
    def validate(self, where: str = "recipe") -> None:
        """Check method, parameter names and ranges, model counts, dtypes, seed: no file is opened."""
        from merging.methods.catalog import get_method
        from taxonomy.core import Kind

        info = get_method(self.merge_method).info  # BasinError names unknown methods
        if info.kind is not Kind.TENSORWISE:
            raise RecipeError(f"{where}: merge_method {info.name!r} is not a streaming (tensorwise) method")
        if (self.slices is None) == (not self.models):
            raise RecipeError(f"{where}: give exactly one of 'models' or 'slices'")
        if self.slices is not None and not self.slices:
            raise RecipeError(f"{where}: 'slices' is empty")
        self._check_scalars(where)
        self._check_tokenizer(where)
        self._check_compute_dtype(info.name, where)
        if self.align is not None:
            if not isinstance(self.align, dict) or not isinstance(self.align.get("method"), str):
                raise RecipeError(f"{where}: align must be a method name or a mapping with a 'method'")
        self._check_parameters(info, where)
        if self.slices is None:
            self._check_model_count(info, where)
        if self.measure is not None:
            check_measure(self.measure, f"{where}: measure")

    def _check_scalars(self, where: str) -> None:
        """dtype, out_dtype, seed, name, allow_mixed_architectures, chat_template: their types and values."""
        for key in ("dtype", "out_dtype"):
            value = getattr(self, key)
            if value is not None and canonical(value) is None:
                raise RecipeError(f"{where}: {key} must be one of {', '.join(MERGE_DTYPES)}; got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise RecipeError(f"{where}: seed must be an integer in [0, 2^63), got {self.seed!r}")
        if self.name is not None and not isinstance(self.name, str):
            raise RecipeError(f"{where}: name must be a string, got a {type(self.name).__name__}")
        if not isinstance(self.allow_mixed_architectures, bool):
            raise RecipeError(f"{where}: allow_mixed_architectures must be true or false, "
                             f"got {self.allow_mixed_architectures!r}")
        if self.chat_template is not None:
            from merging.recipe.chat_template import check_chat_template

            check_chat_template(self.chat_template, f"{where}: chat_template")

    def _check_tokenizer(self, where: str) -> None:
        spec = self.tokenizer_spec(where)
        if spec is not None:
            merged = self.model_refs()
            for ref in spec.referenced_models():
                if ref not in merged:
                    raise RecipeError(f"{where}: tokenizer.tokens names model {ref!r}, which is not one of the "
                                     f"merged models {merged}")

    def _check_compute_dtype(self, method: str, where: str) -> None:
        value = self.compute_dtype
        if value is None:
            return
        if canonical(value) is None:
            raise RecipeError(f"{where}: compute_dtype must be one of {', '.join(MERGE_DTYPES)}; got {value!r}")
        if self.low_compute_dtype is not None:
            from merging.methods.lowprec import check_supported

            check_supported(method, where)

    @property
    def low_compute_dtype(self) -> str | None:
        """'float16' or 'bfloat16' when the recipe asks for mergekit's low-precision arithmetic, else None."""
        value = canonical(self.compute_dtype)
        return value if value in LOW_PRECISION else None

    def _check_parameters(self, info: Any, where: str) -> None:
        check_settings(info, self.parameters, f"{where}: parameters", per_model_level=False)
        for i, m in enumerate(self.models if self.slices is None else []):
            check_settings(info, m.parameters, f"{where}: models[{i}] ({m.model}) parameters", per_model_level=True)
        for i, s in enumerate(self.slices or []):
            check_settings(info, s.parameters, f"{where}: slices[{i}] parameters", per_model_level=False)
            for j, src in enumerate(s.sources):
                check_settings(info, src.parameters, f"{where}: slices[{i}].sources[{j}] parameters",
                               per_model_level=True)

    def _check_model_count(self, info: Any, where: str) -> None:
        n_inputs = len(self.merge_inputs())
        if info.needs_base and self.base_model is None:
            raise RecipeError(f"{where}: merge_method {info.name!r} needs a base_model")
        problem = info.model_count_problem(n_inputs)
        if problem:
            raise RecipeError(f"{where}: {problem}")

    # --- sweeps ------------------------------------------------------------------------------
    def _param_levels(self) -> list[tuple[str, dict[str, Any]]]:
        levels = [("", self.parameters)]
        levels += [(f"models[{i}].", m.parameters) for i, m in enumerate(self.models)]
        for i, sl in enumerate(self.slices or []):
            levels.append((f"slices[{i}].", sl.parameters))
            levels += [(f"slices[{i}].sources[{j}].", src.parameters) for j, src in enumerate(sl.sources)]
        return levels

    def grid_points(self) -> list[tuple[dict[str, Any], Recipe]]:
        """Expand `{grid: [...]}` settings: one (chosen values, recipe) per point of the product."""
        import copy
        import itertools

        axes = [(prefix + name, level, name, setting["grid"]) for prefix, level in self._param_levels()
                for name, setting in level.items() if isinstance(setting, dict) and set(setting) == {"grid"}]
        if not axes:
            return [({}, self)]
        points = []
        for values in itertools.product(*(grid for _, _, _, grid in axes)):
            for (_, level, name, _), value in zip(axes, values):
                level[name] = value
            points.append(({label: v for (label, _, _, _), v in zip(axes, values)}, copy.deepcopy(self)))
        for _, level, name, grid in axes:
            level[name] = {"grid": grid}
        return points

    # --- helpers ----------------------------------------------------------------------------
    def model_refs(self) -> list[str]:
        """Every model whose tensors the merge reads, each once, in order (base first).

        A tokenizer source that names another model is not among them: only its tokenizer
        files are read (see `tokenizer_ref`).
        """
        refs = [self.base_model] if self.base_model else []
        if self.slices is None:
            refs += [m.model for m in self.models]
        else:
            for s in self.slices:
                refs += ([s.base_model] if s.base_model else []) + [src.model for src in s.sources]
        return list(dict.fromkeys(refs))

    def tokenizer_spec(self, where: str = "recipe"):
        """`tokenizer_source` or the `tokenizer:` block as a `merging.recipe.tokenizer.TokenizerSpec`, or None."""
        from merging.recipe.tokenizer import parse_tokenizer

        return parse_tokenizer(self.tokenizer_source, self.tokenizer, where)

    @property
    def tokenizer_ref(self) -> str | None:
        """The model named as the tokenizer source (`tokenizer_source: <model>` or `tokenizer: {source:
        <model>}`), else None (base, union or no rule)."""
        spec = self.tokenizer_spec()
        return None if spec is None else spec.model_ref

    def merge_inputs(self) -> list[ModelSpec]:
        """The models whose tensors enter the method as `tensors` (models mode).

        Methods that need a base get it separately and it is not among these; for the others
        the base model, when listed under `models:`, comes first (SLERP's t = 0 end).
        """
        from merging.methods.catalog import get_method

        specs = list(self.models)
        if get_method(self.merge_method).info.needs_base:
            return [m for m in specs if m.model != self.base_model]
        return sorted(specs, key=lambda m: m.model != self.base_model)


MEASURE_PROBES = ("loss", "paths", "barriers", "hessian")
MEASURE_INTS = {"points": 2, "seq_len": 2, "max_examples": 1, "batch_size": 1, "seed": 0}  # field -> minimum
MEASURE_FIELDS = ("data", "probes", "params", *MEASURE_INTS)


def check_measure(block: Any, where: str) -> None:
    """The `measure:` block: known fields, `data` a path string, `probes` known names, integers in range, `params`
    a regular expression. Only checked here: merging never measures (`basin merge` does, after the merge)."""
    import re

    if not isinstance(block, dict):
        raise RecipeError(f"{where}: expected a mapping of {', '.join(MEASURE_FIELDS)}, got {_kind(block)}")
    for key in block:
        if key not in MEASURE_FIELDS:
            raise RecipeError(f"{where}: {unknown('field', key, MEASURE_FIELDS)}")
    for key in ("data", "params"):
        if block.get(key) is not None and (not isinstance(block[key], str) or not block[key].strip()):
            raise RecipeError(f"{where}.{key}: expected a non-empty string, got {block[key]!r}")
    probes = block.get("probes")
    if probes is not None and (not isinstance(probes, list) or not probes):
        raise RecipeError(f"{where}.probes: expected a non-empty list of {', '.join(MEASURE_PROBES)}, got {probes!r}")
    for name in probes or []:
        if name not in MEASURE_PROBES:
            raise RecipeError(f"{where}.probes: {unknown('probe', name, MEASURE_PROBES)}")
    for key, low in MEASURE_INTS.items():
        value = block.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise RecipeError(f"{where}.{key}: expected an integer >= {low}, got {value!r}")
    if block.get("params") is not None:
        try:
            re.compile(block["params"])
        except re.error as err:
            raise RecipeError(f"{where}.params: {block['params']!r} is not a regular expression ({err})") from None


def _check_top_level(data: Any, where: str) -> None:
    """A mapping with known fields and a merge_method; other mergekit tools' configurations are named."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping at the top level, got {_kind(data)}")
    for key in data:
        if key in OTHER_TOOLS:
            raise RecipeError(f"{where}: field {key!r}: this is {OTHER_TOOLS[key]}")
    for key in data:
        if key in UNSUPPORTED:
            raise RecipeError(f"{where}: field {key!r}: {UNSUPPORTED[key]}")
        if key not in TOP_LEVEL:
            raise RecipeError(f"{where}: {unknown('field', key, TOP_LEVEL)}")
    if "merge_method" not in data:
        raise RecipeError(f"{where}: missing field 'merge_method'")
    if not isinstance(data["merge_method"], str):
        raise RecipeError(f"{where}: merge_method must be a method name, got {_kind(data['merge_method'])}")


def _kind(value: Any) -> str:
    """A short description of a YAML value's type, for messages."""
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "nothing (null)"}
    return names.get(type(value), type(value).__name__)


def _list(data: dict[str, Any], key: str, where: str) -> list[Any]:
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise RecipeError(f"{where}: '{key}' must be a list (one '- ...' entry per model), got {_kind(value)}"
                         + (f" {value!r}" if isinstance(value, str) and len(value) < 80 else ""))
    return value


def _warn(message: str) -> None:
    warnings.warn(message, BasinWarning, stacklevel=3)


def _model_path(value: Any, where: str) -> str:
    """mergekit's ModelPath: 'path', 'path@revision' or {path, revision} -> 'path[@revision]'."""
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, dict) and isinstance(value.get("path"), str) and value["path"].strip():
        extra = set(value) - {"path", "revision"}
        if extra:
            raise RecipeError(f"{where}: {unknown('field', sorted(extra)[0], ['path', 'revision'])}")
        rev = value.get("revision")
        if rev is not None and (not isinstance(rev, str) or not rev.strip() or "@" in value["path"]):
            raise RecipeError(f"{where}.revision: expected a branch, tag or commit string, got {rev!r}")
        return value["path"].strip() + (f"@{rev.strip()}" if rev else "")
    raise RecipeError(f"{where}: expected a model path string or {{path: ..., revision: ...}}, got {value!r}")


REF_FIELDS = ("model", "lora", "override_architecture")


def model_reference(value: Any, where: str) -> str | None:
    """A model reference as basin's string ('org/name@rev', a path, 'model+lora'), from any form mergekit's
    ModelReference accepts: a string, {model: <path>, lora: <path>, override_architecture: ...}, with each
    path a string or {path, revision}."""
    if value is None:
        return None
    if isinstance(value, dict):
        if "model" not in value:
            raise RecipeError(f"{where}: a model reference mapping needs 'model' (and optional 'lora'), "
                             f"got fields {sorted(map(str, value))}")
        extra = set(value) - set(REF_FIELDS)
        if extra:
            raise RecipeError(f"{where}: {unknown('field', sorted(map(str, extra))[0], REF_FIELDS)}")
        if value.get("override_architecture") is not None:
            _warn(f"{where}.override_architecture: ignored (basin reads tensor names from the checkpoint itself)")
        lora = value.get("lora")
        return join_adapter(_model_path(value["model"], f"{where}.model"),
                            None if lora is None else _model_path(lora, f"{where}.lora"))
    if not isinstance(value, str) or not value.strip():
        raise RecipeError(f"{where}: expected a model reference string, got {value!r}")
    return value.strip()


def _params(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RecipeError(f"{where}: expected a mapping of parameter names to values")
    return dict(value)


def _model_spec(item: Any, where: str) -> ModelSpec:
    if isinstance(item, str):
        return ModelSpec(model_reference(item, where))
    if not isinstance(item, dict) or "model" not in item:
        raise RecipeError(f"{where}: expected a model reference or a mapping with a 'model' field, got {_kind(item)}")
    extra = set(item) - {"model", "parameters"}
    if extra:
        raise RecipeError(f"{where}: {unknown('field', sorted(map(str, extra))[0], ['model', 'parameters'])}")
    return ModelSpec(model_reference(item["model"], f"{where}.model"),
                     _params(item.get("parameters"), f"{where}.parameters"))


SLICE_FIELDS = ("sources", "parameters", "base_model", "residual_weight")
SOURCE_FIELDS = ("model", "layer_range", "parameters")


def _source(src: Any, w: str) -> SliceSource:
    if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
        raise RecipeError(f"{w}: expected a mapping with 'model' and 'layer_range'")
    extra = set(src) - set(SOURCE_FIELDS)
    if extra:
        raise RecipeError(f"{w}: {unknown('field', sorted(map(str, extra))[0], SOURCE_FIELDS)}")
    lr = src["layer_range"]
    if (not isinstance(lr, (list, tuple)) or len(lr) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in lr) or not 0 <= lr[0] < lr[1]):
        raise RecipeError(f"{w}.layer_range: expected [start, end) with 0 <= start < end, got {lr!r}")
    return SliceSource(model_reference(src["model"], f"{w}.model"), (lr[0], lr[1]),
                       _params(src.get("parameters"), f"{w}.parameters"))


def _residual_weight(value: Any, where: str) -> float | None:
    """mergekit's slice `residual_weight`: accepted (a finite number), with a warning that it has no effect."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecipeError(f"{where}.residual_weight: expected a finite number, got {value!r}")
    _warn(f"{where}.residual_weight: has no effect (mergekit ignores it too)")
    return float(value)


def _slice(item: Any, where: str) -> OutputSlice:
    if not isinstance(item, dict) or not isinstance(item.get("sources"), list) or not item["sources"]:
        raise RecipeError(f"{where}: expected a mapping with a non-empty 'sources' list")
    extra = set(item) - set(SLICE_FIELDS)
    if extra:
        raise RecipeError(f"{where}: {unknown('field', sorted(map(str, extra))[0], SLICE_FIELDS)}")
    sources = [_source(src, f"{where}.sources[{j}]") for j, src in enumerate(item["sources"])]
    lengths = {s.layer_range[1] - s.layer_range[0] for s in sources}
    if len(lengths) != 1:
        raise RecipeError(
            f"{where}: every source of a slice must span the same number of layers, got {sorted(lengths)}")
    return OutputSlice(sources, _params(item.get("parameters"), f"{where}.parameters"),
                       model_reference(item.get("base_model"), f"{where}.base_model"),
                       _residual_weight(item.get("residual_weight"), where))


# --- parameter settings ------------------------------------------------------------------------
def _is_scalar(v: Any) -> bool:
    return isinstance(v, (int, float, bool, str))


def setting_values(setting: Any, where: str) -> list[Any]:
    """Every scalar a setting can produce (gradient anchors, filter values); checks its form."""
    if _is_scalar(setting):
        return [setting]
    if isinstance(setting, dict):
        if set(setting) == {"grid"}:
            grid = setting["grid"]
            if not isinstance(grid, list) or not grid or any(isinstance(v, dict) for v in grid):
                raise RecipeError(f"{where}.grid: expected a non-empty list of settings to sweep, got {grid!r}")
            return [v for k, point in enumerate(grid) for v in setting_values(point, f"{where}.grid[{k}]")]
        if set(setting) <= {"filter", "value"} and "value" in setting:
            setting = [setting]
        else:
            raise RecipeError(f"{where}: expected a scalar, a list (gradient) or {{filter, value}} entries, "
                             f"got {setting!r}")
    if not isinstance(setting, list) or not setting:
        raise RecipeError(f"{where}: expected a scalar, a non-empty list (gradient) or filter entries, got {setting!r}")
    if all(_is_scalar(v) for v in setting):
        return list(setting)
    out = []
    for k, entry in enumerate(setting):
        if not isinstance(entry, dict) or "value" not in entry or not set(entry) <= {"filter", "value"}:
            raise RecipeError(f"{where}[{k}]: expected {{filter: substring, value: ...}}, got {entry!r}")
        if entry.get("filter") is not None and not isinstance(entry["filter"], str):
            raise RecipeError(f"{where}[{k}].filter: expected a substring of tensor names")
        if isinstance(entry["value"], dict) or (isinstance(entry["value"], list)
                                                 and not all(_is_scalar(v) for v in entry["value"])):
            raise RecipeError(f"{where}[{k}].value: expected a scalar or a gradient list")
        out += setting_values(entry["value"], f"{where}[{k}].value")
    return out


def check_settings(info: Any, params: dict[str, Any], where: str, per_model_level: bool) -> None:
    """Check every setting of one parameter level. A parameter another method has but this one lacks (e.g. a
    per-model `weight` under `sce`) is dropped with a warning, as mergekit ignores it; other names are errors."""
    from taxonomy.registry import parameter_names

    for name in list(params):
        if not isinstance(name, str):
            raise RecipeError(f"{where}: parameter names must be strings, got {name!r}")
        if name not in {p.name for p in info.params} and name in parameter_names():
            _warn(f"{where}.{name}: method {info.name!r} has no parameter {name!r}; ignored (as mergekit does)")
            del params[name]
            continue
        p = info.param(name)  # BasinError: unknown parameter, the closest names first
        if per_model_level and not p.per_model:
            raise RecipeError(f"{where}: {name!r} is a global parameter of {info.name!r}, not a per-model one")
        for v in setting_values(params[name], f"{where}.{name}"):
            _check_type(p, v, f"{where}.{name}")
            p.check(v, f"{where}.{name}")


def _check_type(p: Any, value: Any, where: str) -> None:
    """A value has its default's kind: a boolean for a boolean parameter, a number for a numeric one."""
    default = p.default
    if isinstance(default, bool) and not isinstance(value, bool):
        raise RecipeError(f"{where}: parameter {p.name!r} must be true or false, got {value!r}")
    if (isinstance(default, (int, float)) and not isinstance(default, bool)
            and (isinstance(value, bool) or not isinstance(value, (int, float)))):
        raise RecipeError(f"{where}: parameter {p.name!r} must be a number, got {value!r}")


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """The value of `setting` for `tensor_name` at relative depth `t`, or None if no filter matches."""
    if isinstance(setting, dict):
        if "grid" in setting:
            raise RecipeError(f"{tensor_name}: a {{grid: ...}} setting must be expanded with Recipe.grid_points()")
        setting = [setting]
    if _is_scalar(setting):
        return setting
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
        if len(setting) == 1:
            return setting[0]
        return float(np.interp(t, np.linspace(0.0, 1.0, len(setting)), np.asarray(setting, dtype=np.float64)))
    if all(_is_scalar(v) for v in setting):  # strings/booleans: the anchor at or below t
        return setting[int(t * (len(setting) - 1))]
    for entry in setting:
        f = entry.get("filter")
        if f is None or f == "*" or f in tensor_name:
            return evaluate_setting(entry["value"], tensor_name, t)
    return None
