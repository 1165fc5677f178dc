"""Load user objects named as "module:attribute" or "path/to/file.py:attribute" (CLI factories)."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

from taxonomy.errors import BasinError


def load_object(spec: str) -> Any:
    """Return the attribute named by `spec` ("pkg.module:fn" or "file.py:fn")."""
    if ":" not in spec:
        raise BasinError(f"{spec!r}: expected 'module:attribute' or 'file.py:attribute'")
    module_name, attr = spec.rsplit(":", 1)
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.exists():
            raise BasinError(f"{module_name}: no such file")
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        assert mod_spec and mod_spec.loader
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            raise BasinError(f"{spec!r}: cannot import module {module_name!r} ({err})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise BasinError(f"{spec!r}: module {module_name!r} has no attribute {attr!r}") from None
