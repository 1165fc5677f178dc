"""User objects named as "package.module:attribute" (recipes, suites, CLI flags), or as
"path/to/file.py:attribute" where the name was typed by the user (`files=True`: CLI flags and suite files, never
a recipe, which must not make basin run a file it names). The one loader of user code: it lives in merging/ so
that merging and evaluations share it. A spec that cannot be loaded, or a module that fails while importing, is
a one-line `BasinError` naming where the spec came from."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

from taxonomy.errors import BasinError


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def load_object(spec: str, where: str | None = None, *, files: bool = False) -> Any:
    """The attribute named by `spec`; a BasinError naming `where` (default: the spec) if it cannot be loaded."""
    label = where or repr(spec)
    module_name, sep, attr = spec.rpartition(":") if isinstance(spec, str) else ("", "", "")
    if not (sep and module_name and attr):
        forms = "'module:attribute' or 'file.py:attribute'" if files else "'module:attribute'"
        raise BasinError(f"{label}: expected {forms}, got {spec!r}")
    if files and module_name.endswith(".py"):
        module = exec_file(Path(module_name), where=label)
    else:
        module = _import(module_name, label)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise BasinError(f"{label}: module {module_name!r} has no attribute {attr!r}") from None


def _import(module_name: str, label: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except (ImportError, TypeError, ValueError) as err:  # TypeError, ValueError: a relative or empty name
        raise BasinError(f"{label}: cannot import module {module_name!r} ({err})") from None
    except Exception as err:  # noqa: BLE001 - the user's module failed while importing: report it in one line
        raise BasinError(f"{label}: importing {module_name!r} raised {_first_line(err)}") from None


def exec_file(path: Path, name: str | None = None, where: str | None = None) -> ModuleType:
    """The Python file run as a module of its own, named `name` (default: the file's stem; not registered in
    sys.modules). Only for files the user named on the command line or as a suite."""
    label = where or str(path)
    if not path.is_file():
        raise BasinError(f"{label}: no such file {path}")
    mod_spec = importlib.util.spec_from_file_location(name or path.stem, path)
    if mod_spec is None or mod_spec.loader is None:
        raise BasinError(f"{label}: {path} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - as above
        raise BasinError(f"{label}: importing {path} raised {_first_line(err)}") from None
    return module
