"""The exception type for bad user input, shared by every layer, and the warning for ignored input.

The CLI prints a `BasinError`'s (or a subclass's, one per area) message without a traceback and exits with status 2; a
`BasinWarning` (a field accepted for mergekit compatibility that has no effect) as one line.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class BasinError(ValueError):
    """Bad input from the user: a message that names the file, tensor, field or parameter."""


class RecipeError(BasinError):
    """A recipe (YAML or dict) that is malformed, bounded out, or names unknown methods, fields or parameters."""


class CheckpointError(BasinError):
    """A checkpoint, adapter, index or Hub reference that cannot be opened or is malformed."""


class OutputError(BasinError):
    """An output that may not be written: it would replace an input, it exists, it is locked, the disk refused."""


class DataError(BasinError):
    """Data (batches, factories' results) that does not fit the model or is empty."""


class ProbeError(BasinError):
    """Arguments a probe cannot honour: a parameter selection matching nothing, an operator of the wrong size."""


class BasinWarning(UserWarning):
    """Input that is accepted (mergekit accepts it) but has no effect."""


def suggest(name: object, choices: Iterable[str], limit: int = 5) -> str:
    """'; did you mean 'a' or 'b'?' for the choices most similar to `name` (difflib ratio), else ''."""
    close = difflib.get_close_matches(str(name), sorted(set(choices)), n=limit, cutoff=0.6)
    if not close:
        return ""
    return "; did you mean " + " or ".join(repr(c) for c in close) + "?"


def unknown(kind: str, name: object, choices: Iterable[str]) -> str:
    """'unknown <kind> 'x'; did you mean 'y'? (known: a, b, c)': the closest first, then every known name."""
    known = sorted(set(choices))
    return f"unknown {kind} {name!r}{suggest(name, known)} (known: {', '.join(known) or 'none'})"
