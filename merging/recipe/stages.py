"""Multi-stage recipes (mergekit-multi's schema): several recipes in one YAML file, separated by `---`, each with a
`name:`; a later stage names an earlier one as a model. Parsed, validated and ordered without any I/O.

mergekit-multi's rules, kept: a stage name wins over a path of the same name; a name is used as the base of any model
reference (`name`, `name+lora`, `{model: name, lora: ...}`, tokenizer sources); names are unique; at most one
document has no name (the final merge). basin's additions: names are folder names (letters, digits, `._-`), a stage
may not use itself, and cycles are reported with their path; all before any model is opened.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from merging.io.references import join_adapter
from merging.recipe.schema import Recipe
from merging.recipe.yaml_reader import load_recipe_documents, read_recipe_file
from taxonomy.errors import RecipeError, unknown

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclass
class Stage:
    """One document: its name (None for the unnamed final merge), recipe, and the stages it reads."""

    name: str | None
    recipe: Recipe
    depends: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.name or "final merge (unnamed)"


def is_multi_stage(path: str | Path) -> bool:
    """Whether the recipe file holds more than one YAML document."""
    p = Path(path)
    return p.is_file() and len(load_recipe_documents(read_recipe_file(p), str(p))) > 1


def load_stages(source: str | Path, where: str | None = None) -> list[Stage]:
    """The stages of a multi-stage recipe file (or YAML text), in file order, validated (see the module docstring)."""
    text = source
    if isinstance(source, Path) or ("\n" not in str(source) and str(source).endswith((".yaml", ".yml"))):
        where, text = where or str(source), read_recipe_file(Path(source))
    where = where or "recipe"
    docs = load_recipe_documents(str(text), where)
    if not docs:
        raise RecipeError(f"{where}: no recipe in this file")
    stages: list[Stage] = []
    for k, doc in enumerate(docs):
        stages.append(_stage(doc, f"{where}: document {k + 1}", stages))
    names = {s.name for s in stages if s.name}
    for s in stages:
        s.depends = sorted({r for r in stage_refs(s.recipe) if r in names})
        if s.name in s.depends:
            raise RecipeError(f"{where}: stage {s.name!r} uses itself as a model")
    return stages


def _stage(doc: object, where: str, earlier: list[Stage]) -> Stage:
    if not isinstance(doc, dict):
        raise RecipeError(f"{where}: expected a recipe (a mapping), got {type(doc).__name__}")
    name = doc.get("name")
    if name is not None and (not isinstance(name, str) or not NAME.match(name)):
        raise RecipeError(f"{where}: name {name!r}: a stage name is a folder name (letters, digits, '.', '_', '-')")
    if name is None and any(s.name is None for s in earlier):
        raise RecipeError(f"{where}: a second document without a name; only the final merge may be unnamed")
    if name is not None and any(s.name == name for s in earlier):
        raise RecipeError(f"{where}: a second stage named {name!r}; stage names must be unique")
    label = f"{where} ({name})" if name else where
    return Stage(name, Recipe.from_dict(doc, label))


def _tokenizer_refs(recipe: Recipe) -> list[str]:
    spec = recipe.tokenizer_spec()
    if spec is None:
        return []
    return ([spec.model_ref] if spec.model_ref else []) + spec.referenced_models()


def all_refs(recipe: Recipe) -> list[str]:
    """Every model reference of the recipe: the merged models and the tokenizer's sources."""
    return list(dict.fromkeys(recipe.model_refs() + _tokenizer_refs(recipe)))


def stage_refs(recipe: Recipe) -> list[str]:
    """The base part of every model reference in the recipe (the part a stage name can be)."""
    return list(dict.fromkeys(_base_of(r) for r in all_refs(recipe)))


def _base_of(ref: str) -> str:
    """The part of `ref` a stage name can be: all of it, or what comes before its last '+'."""
    return ref.rsplit("+", 1)[0] if "+" in ref else ref


def order(stages: list[Stage], target: str | None = None) -> list[Stage]:
    """The stages to run, dependencies first: `target` (a stage name) and what it needs, or every stage."""
    by_name = {s.name: s for s in stages}
    if target is not None and target not in by_name:
        raise RecipeError(f"--stage: {unknown('stage', target, [s.name for s in stages if s.name])}")
    done: list[Stage] = []
    state: dict[str | None, str] = {}

    def visit(stage: Stage, path: list[str]) -> None:
        if state.get(stage.name) == "done":
            return
        if state.get(stage.name) == "active":
            cycle = path[path.index(stage.label):] + [stage.label]
            raise RecipeError(f"stages form a cycle: {' -> '.join(cycle)}")
        state[stage.name] = "active"
        for dep in stage.depends:
            visit(by_name[dep], path + [stage.label])
        state[stage.name] = "done"
        done.append(stage)

    for stage in [by_name[target]] if target is not None else stages:
        visit(stage, [])
    return done


def output_stage(stages: list[Stage], target: str | None) -> Stage:
    """The stage written to OUT: `target`, else the unnamed document, else the last one (mergekit-multi: the unnamed
    document is the final merge)."""
    if target is not None:
        return next(s for s in stages if s.name == target)
    return next((s for s in stages if s.name is None), stages[-1])


def _rename(ref: str | None, mapping: Callable[[str], str]) -> str | None:
    """`ref` with its base part mapped (`name` or `name+lora`; stage names hold no '+')."""
    if ref is None or mapping(ref) != ref:
        return None if ref is None else mapping(ref)
    if "+" in ref:
        base, adapter = ref.rsplit("+", 1)
        if mapping(base) != base:
            return join_adapter(mapping(base), adapter)
    return ref


def with_models(recipe: Recipe, mapping: Callable[[str], str]) -> Recipe:
    """A copy of `recipe` whose model references' base parts are mapped (stage name -> its folder)."""
    out = copy.deepcopy(recipe)
    for m in out.models:
        m.model = _rename(m.model, mapping)
    out.base_model = _rename(out.base_model, mapping)
    for sl in out.slices or []:
        sl.base_model = _rename(sl.base_model, mapping)
        for src in sl.sources:
            src.model = _rename(src.model, mapping)
    if isinstance(out.tokenizer_source, str) and out.tokenizer_source not in ("base", "union"):
        out.tokenizer_source = _rename(out.tokenizer_source, mapping)
    if isinstance(out.tokenizer, dict):
        out.tokenizer = _rename_tokenizer(out.tokenizer, mapping)
    return out


def _rename_tokenizer(block: dict, mapping: Callable[[str], str]) -> dict:
    """The `tokenizer:` block with its source and per-token model references mapped."""
    block = dict(block)
    if isinstance(block.get("source"), str) and block["source"] not in ("base", "union"):
        block["source"] = _rename(block["source"], mapping)
    tokens = {}
    for tok, rule in (block.get("tokens") or {}).items():
        rule = copy.deepcopy(rule)
        if isinstance(rule, dict) and isinstance(rule.get("source"), str):
            rule["source"] = _rename(rule["source"], mapping)
        elif isinstance(rule, dict) and isinstance(rule.get("source"), dict) and isinstance(
                rule["source"].get("model"), str):
            rule["source"]["model"] = _rename(rule["source"]["model"], mapping)
        tokens[tok] = rule
    if tokens:
        block["tokens"] = tokens
    return block
