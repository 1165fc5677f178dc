"""Load user objects named as "module:attribute" or "path/to/file.py:attribute" (CLI factories, suite bodies).

These name code the user chose to run (a model or data factory, a suite): the module is imported (a file
executed) as given, like `python -m`. Nothing else is imported from user strings. A spec that cannot be
imported, or a module that fails while importing, is a one-line `BasinError` naming the spec.
"""

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


def import_file(path: Path, where: str = "", name: str | None = None) -> ModuleType:
    """Execute the Python file `path` as a module (named `name`, default its stem); errors start with `where`."""
    if not path.is_file():
        raise BasinError(f"{where}no such file {path}")
    mod_spec = importlib.util.spec_from_file_location(name or path.stem, path)
    if mod_spec is None or mod_spec.loader is None:
        raise BasinError(f"{where}cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - the user's file failed while importing: report it in one line
        raise BasinError(f"{where}importing {path} raised {_first_line(err)}") from None
    return module


def _import_module(name: str, spec: str, where: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        raise BasinError(f"{where}{spec!r}: cannot import module {name!r} ({err})") from None
    except Exception as err:  # noqa: BLE001 - as above
        raise BasinError(f"{where}{spec!r}: importing {name!r} raised {_first_line(err)}") from None


def load_object(spec: str, where: str = "") -> Any:
    """Return the attribute named by `spec` ("pkg.module:fn" or "file.py:fn"); `where` prefixes errors."""
    module_name, _, attr = str(spec).rpartition(":")
    if not module_name or not attr:
        raise BasinError(f"{where}{spec!r}: expected 'module:attribute' or 'file.py:attribute'")
    if module_name.endswith(".py"):
        module = import_file(Path(module_name), f"{where}{spec!r}: ")
    else:
        module = _import_module(module_name, spec, where)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise BasinError(f"{where}{spec!r}: module {module_name!r} has no attribute {attr!r}") from None
