"""A recipe whose values are searched: `{search: ...}` settings, parsed and checked without I/O or Optuna.

Any parameter setting (global, per model, per slice or source; a whole setting, one anchor of a gradient list, the
`value` of a filter entry) and the top-level `merge_method` may be given as a search instead of a value:

- `{search: [low, high]}`: a number in the closed range (`log: true` samples its logarithm, `step: s` a grid of
  multiples of `s` above `low`; an integer range when both ends are integers and the parameter's default is one);
- `{search: [a, b, c]}`: one of the choices (any list other than two numbers: method names, booleans, strings);
- `default: v` (optional): the value the recipe would use unsearched (else the parameter's taxonomy default, clipped
  into the range, or the first choice).

`SearchSpace.recipe(values)` is the plain `Recipe` for one point; each range is checked at both ends and each choice
on its own (the other dimensions at their defaults) when the space is built, so a range over a parameter that takes
no numbers, an empty range or an unknown method fails before any trial runs.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merging.recipe.schema import Recipe
from merging.recipe.yaml_reader import load_recipe_text, read_recipe_file
from taxonomy.errors import BasinError, RecipeError

SEARCH_KEYS = ("search", "log", "step", "default")
Path_ = tuple[Any, ...]  # keys and list indices from the recipe's top level to a search node


@dataclass(frozen=True)
class Dimension:
    """One searched value: `label` (e.g. `models[0].parameters.weight`), where it sits, and its domain."""

    label: str
    path: Path_
    kind: str  # "float", "int" or "choice"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    default: Any = None

    def grid(self) -> list[Any] | None:
        """Every value of a finite domain (choices, or a stepped range), else None."""
        if self.kind == "choice":
            return list(self.choices)
        if self.step is None:
            return None
        n = int(math.floor((self.high - self.low) / self.step + 1e-9))
        values = [self.low + k * self.step for k in range(n + 1)]
        return [int(v) for v in values] if self.kind == "int" else [round(v, 12) for v in values]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.label, "kind": self.kind, "default": self.default}
        if self.kind == "choice":
            out["choices"] = list(self.choices)
        else:
            out.update(low=self.low, high=self.high, log=self.log, step=self.step)
        return out


@dataclass
class SearchSpace:
    """A recipe with `{search: ...}` settings (see the module docstring)."""

    raw: dict[str, Any]
    dims: list[Dimension] = field(default_factory=list)
    where: str = "recipe"

    @classmethod
    def from_yaml(cls, source: str | Path) -> SearchSpace:
        where = str(source)
        return cls.from_dict(load_recipe_text(read_recipe_file(Path(source)), where), where)

    @classmethod
    def from_dict(cls, data: Any, where: str = "recipe") -> SearchSpace:
        if not isinstance(data, dict):
            raise RecipeError(f"{where}: expected a mapping at the top level")
        raw = copy.deepcopy(data)
        nodes = list(_find(raw, ()))
        _check_places(nodes, where)
        methods = _method_names(raw, nodes)
        dims = [_dimension(node, path, methods, where) for path, node in nodes]
        space = cls(raw, [], where)
        space.dims = [_with_default(d, space, methods) for d in dims]
        space.check()
        return space

    def defaults(self) -> dict[str, Any]:
        """label -> the value each dimension takes unsearched."""
        return {d.label: d.default for d in self.dims}

    def filled(self, values: dict[str, Any]) -> dict[str, Any]:
        """The recipe's mapping with every search replaced by `values[label]` (missing labels: their default)."""
        out = copy.deepcopy(self.raw)
        for d in self.dims:
            _set(out, d.path, values.get(d.label, d.default))
        return out

    def recipe(self, values: dict[str, Any], quiet: bool = True) -> Recipe:
        """The plain recipe at `values` (parameter warnings, e.g. one a chosen method lacks, silenced if `quiet`)."""
        with warnings.catch_warnings():
            if quiet:
                warnings.simplefilter("ignore")
            return Recipe.from_dict(self.filled(values), self.where)

    def check(self) -> None:
        """Every range at both ends and every choice, the other dimensions at their defaults (see the docstring)."""
        if not self.dims:
            raise RecipeError(f"{self.where}: no {{search: ...}} setting to search; give at least one parameter "
                              "or merge_method as {search: [low, high]} or {search: [choice, ...]}")
        for d in self.dims:
            inside = (d.default in d.choices if d.kind == "choice"
                      else _number(d.default) and d.low <= d.default <= d.high)
            if not inside:
                raise RecipeError(f"{self.where}: {d.label}.default: {d.default!r} is not in the search's domain")
        self.recipe(self.defaults(), quiet=False)
        for d in self.dims:
            for value in d.choices if d.kind == "choice" else (d.low, d.high):
                try:
                    self.recipe({**self.defaults(), d.label: value})
                except BasinError as err:
                    raise RecipeError(f"{self.where}: {d.label}: search value {value!r}: {err}") from None

    def to_json(self) -> list[dict[str, Any]]:
        return [d.to_json() for d in self.dims]


# --- finding and reading search nodes ---------------------------------------------------------------------------
def _is_search(node: Any) -> bool:
    return isinstance(node, dict) and "search" in node


def _find(node: Any, path: Path_):
    """(path, node) of every `{search: ...}` mapping in the recipe, in document order."""
    if _is_search(node):
        yield path, node
        return
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield from _find(child, (*path, key))


def label_of(path: Path_) -> str:
    """('models', 0, 'parameters', 'weight', 1) -> 'models[0].parameters.weight[1]'."""
    out = ""
    for key in path:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else str(key))
    return out


def _check_places(nodes: list[tuple[Path_, Any]], where: str) -> None:
    """Searches only in parameter settings and `merge_method`; no `{grid: ...}` beside them."""
    for path, _ in nodes:
        if path != ("merge_method",) and "parameters" not in path:
            raise RecipeError(f"{where}: {label_of(path)}: only parameter settings and merge_method can be "
                              "searched")
        inside = path[path.index("parameters") + 2:] if "parameters" in path else ()
        if any(k in ("filter", "grid") for k in inside):
            raise RecipeError(f"{where}: {label_of(path)}: a search cannot stand for a filter or inside a grid")


def _method_names(raw: dict[str, Any], nodes: list[tuple[Path_, Any]]) -> list[str]:
    """The method(s) the recipe may use: its merge_method, or each choice of a searched one."""
    method = raw.get("merge_method")
    if _is_search(method):
        choices = method.get("search")
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise RecipeError(f"recipe: merge_method: expected {{search: [method, ...]}} (names), got {choices!r}")
        return list(choices)
    return [method] if isinstance(method, str) else []


def _param_name(path: Path_) -> str | None:
    return path[path.index("parameters") + 1] if "parameters" in path else None


def _params_of(name: str | None, methods: list[str]) -> list[Any]:
    """The taxonomy `Param` named `name` of each method that has it."""
    from merging.methods.catalog import get_method

    out = []
    for m in methods:
        try:
            info = get_method(m).info
        except BasinError:
            continue  # named by `check` with the label and the closest names
        out += [p for p in info.params if p.name == name]
    return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _dimension(node: dict[str, Any], path: Path_, methods: list[str], where: str) -> Dimension:
    """One `{search: ...}` mapping read into a Dimension (its form checked; values are checked by `check`)."""
    label = label_of(path)
    extra = sorted(set(map(str, node)) - set(SEARCH_KEYS))
    if extra:
        raise RecipeError(f"{where}: {label}: unknown field {extra[0]!r} of a search (known: "
                          f"{', '.join(SEARCH_KEYS)})")
    domain = node["search"]
    if not isinstance(domain, list) or not domain:
        raise RecipeError(f"{where}: {label}.search: expected [low, high] or a non-empty list of choices, "
                          f"got {domain!r}")
    if len(domain) == 2 and all(_number(v) for v in domain):
        return _range(node, label, path, methods, where)
    if any(k in node for k in ("log", "step")):
        raise RecipeError(f"{where}: {label}: log and step apply to a range [low, high], not to choices")
    if not all(isinstance(v, (str, bool, int, float)) for v in domain):
        raise RecipeError(f"{where}: {label}.search: choices must be scalars (numbers, strings, booleans)")
    if len(set(map(repr, domain))) != len(domain):
        raise RecipeError(f"{where}: {label}.search: a choice is listed twice: {domain!r}")
    if len(domain) == 1:
        raise RecipeError(f"{where}: {label}.search: a single choice is not a search; write the value itself")
    return Dimension(label, path, "choice", choices=tuple(domain), default=node.get("default"))


def _range(node: dict[str, Any], label: str, path: Path_, methods: list[str], where: str) -> Dimension:
    low, high = node["search"]
    if not all(math.isfinite(v) for v in (low, high)):
        raise RecipeError(f"{where}: {label}.search: the range's ends must be finite numbers, got {[low, high]}")
    if not low < high:
        raise RecipeError(f"{where}: {label}.search: empty range [{low}, {high}] (low must be below high)")
    params = _params_of(_param_name(path), methods)
    if params and not any(_number(p.default) or p.low is not None or p.high is not None for p in params):
        kinds = "true/false" if all(isinstance(p.default, bool) for p in params) else "no numbers"
        raise RecipeError(f"{where}: {label}: a range needs a numeric parameter; {params[0].name!r} takes {kinds}")
    log, step = node.get("log", False), node.get("step")
    if not isinstance(log, bool):
        raise RecipeError(f"{where}: {label}.log: expected true or false, got {log!r}")
    if log and low <= 0:
        raise RecipeError(f"{where}: {label}: a log range needs low > 0, got {low}")
    if step is not None and (not _number(step) or not 0 < step <= high - low or log):
        raise RecipeError(f"{where}: {label}.step: expected a number in (0, high - low] (and no log), got {step!r}")
    integer = isinstance(low, int) and isinstance(high, int) and (step is None or isinstance(step, int)) and \
        bool(params) and all(isinstance(p.default, int) and not isinstance(p.default, bool) for p in params)
    kind = "int" if integer else "float"
    cast = int if integer else float
    return Dimension(label, path, kind, cast(low), cast(high), log, None if step is None else cast(step),
                     default=node.get("default"))


def _with_default(d: Dimension, space: SearchSpace, methods: list[str]) -> Dimension:
    """`d` with its default: the search's own, else the taxonomy default clipped into the range, else the first
    choice (a range without a numeric default: its midpoint, geometric for a log range)."""
    from dataclasses import replace

    if d.default is not None:
        return d
    if d.kind == "choice":
        return replace(d, default=d.choices[0])
    numeric = [p.default for p in _params_of(_param_name(d.path), methods) if _number(p.default)]
    value = numeric[0] if numeric else (math.sqrt(d.low * d.high) if d.log else (d.low + d.high) / 2)
    value = min(max(value, d.low), d.high)
    return replace(d, default=int(round(value)) if d.kind == "int" else float(value))


def _set(data: Any, path: Path_, value: Any) -> None:
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


__all__ = ["Dimension", "SearchSpace", "label_of"]
