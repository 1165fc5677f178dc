"""The exception type for bad user input, shared by every layer, and the warning for ignored input.

The CLI prints a `BasinError`'s message without a traceback and exits with status 2; a
`BasinWarning` (a field accepted for mergekit compatibility that has no effect) as one line.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class BasinError(ValueError):
    """Bad input from the user: a message that names the file, tensor, field or parameter."""


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
