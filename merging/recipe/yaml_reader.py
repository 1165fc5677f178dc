"""Reading a recipe's YAML safely: bounded size, bounded alias expansion, one document (or, for a multi-stage
recipe, `load_recipe_documents`), UTF-8.

PyYAML's SafeLoader shares the object an alias points to, so a "billion laughs" recipe (each
anchor a list of ten aliases of the previous one) parses into a small graph that explodes when
anything walks it (a copy, a dump, a hash). `load_recipe_text` composes the node graph first and
refuses it when its *expanded* size (every alias counted as a copy of its target) exceeds
`MAX_NODES`, or when it is recursive, before a single Python object is built. Numbers in YAML
1.2 form (1e-5, without the dot PyYAML 1.1 requires) load as floats, as mergekit's pydantic
schema reads them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from taxonomy.errors import RecipeError

MAX_RECIPE_BYTES = 1 << 20  # 1 MiB: the largest real recipes (frankenmerges) are a few kB
MAX_NODES = 100_000  # expanded YAML nodes: aliases counted as copies
MAX_DEPTH = 64  # nesting of lists and mappings

FLOAT_12 = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


class RecipeLoader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 exponent floats (1e-5) as numbers."""


RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", FLOAT_12, list("-+0123456789"))


def read_recipe_file(path: Path) -> str:
    """The text of a recipe file: at most MAX_RECIPE_BYTES, UTF-8 (a one-line BasinError otherwise)."""
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: {size} bytes; a recipe may be at most {MAX_RECIPE_BYTES} bytes")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path}: not UTF-8 text (byte {err.start}: {data[err.start:err.start + 1]!r}); "
                         "save the recipe as UTF-8") from None


def expanded_size(root: yaml.Node, where: str, limit: int = MAX_NODES, max_depth: int = MAX_DEPTH) -> int:
    """Number of nodes once every alias is expanded, walking at most `limit` of them (so recursive
    anchors and alias bombs stop early with a BasinError)."""
    count = 0
    stack: list[tuple[yaml.Node, int]] = [(root, 0)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > limit:
            raise RecipeError(f"{where}: the recipe expands to more than {limit} YAML nodes (anchors and aliases "
                             "repeated, or an anchor that contains itself); write it out plainly")
        if depth > max_depth:
            raise RecipeError(f"{where}: the recipe nests lists/mappings more than {max_depth} levels deep (or has "
                             "an anchor that contains itself)")
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                stack.extend(((key, depth + 1), (value, depth + 1)))
    return count


def _documents(loader: RecipeLoader, where: str) -> yaml.Node | None:
    node = loader.get_node() if loader.check_node() else None
    if node is not None and loader.check_node():
        raise RecipeError(f"{where}: several YAML documents (separated by '---'): a multi-stage (mergekit-multi) "
                         "recipe; run it with `basin merge FILE OUT` (merging.multistage.merge_stages), which runs "
                         "each stage in dependency order")
    return node


def load_recipe_documents(text: str, where: str = "recipe") -> list[Any]:
    """Every YAML document of `text` (a multi-stage recipe), bounded as `load_recipe_text` is, in file order;
    empty documents are skipped."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{where}: a recipe may be at most {MAX_RECIPE_BYTES} bytes")
    loader = None
    try:
        loader = RecipeLoader(text)
        docs, budget = [], MAX_NODES
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            budget -= expanded_size(node, where, limit=budget)
            docs.append(loader.construct_document(node))
        return docs
    except (yaml.YAMLError, RecursionError) as err:
        raise _yaml_error(err, where) from None
    finally:
        if loader is not None:
            loader.dispose()


def _yaml_error(err: Exception, where: str) -> RecipeError:
    """A parse failure as one line: invalid YAML, or nesting too deep for the parser."""
    if isinstance(err, RecursionError):
        return RecipeError(f"{where}: the recipe nests lists/mappings too deeply")
    return RecipeError(f"{where}: not valid YAML ({' '.join(str(err).split())})")


def load_recipe_text(text: str, where: str = "recipe") -> Any:
    """Parse recipe YAML into Python objects, refusing oversized, bomb-like, recursive or multi-document input."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{where}: a recipe may be at most {MAX_RECIPE_BYTES} bytes")
    loader = None
    try:
        loader = RecipeLoader(text)  # the reader checks the characters at once
        node = _documents(loader, where)
        if node is None:
            return None
        expanded_size(node, where)
        return loader.construct_document(node)
    except (yaml.YAMLError, RecursionError) as err:
        raise _yaml_error(err, where) from None
    finally:
        if loader is not None:
            loader.dispose()
