"""One atomic file write for every output a user sees: the content goes to a hidden temporary beside the
target (same suffix, so writers that pick a format from it, e.g. matplotlib, keep it), then `os.replace`
puts it in place. A reader never sees a half-written file; on any error the temporary is removed and an
OSError (full disk, read-only folder) becomes a one-line `OutputError` naming the target.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from taxonomy.errors import OutputError


def temp_name(target: Path) -> Path:
    """The hidden temporary written for `target`: `.stem.<pid>.basin-tmp<suffix>` in the same folder."""
    return target.with_name(f".{target.stem}.{os.getpid()}.basin-tmp{target.suffix}")


def atomic_write(path: str | Path, writer: Callable[[Path], object]) -> Path:
    """Call `writer(temporary)`, then rename the temporary onto `path`; returns `path`."""
    target = Path(path)
    tmp = temp_name(target)
    try:
        writer(tmp)
        os.replace(tmp, target)
    except OSError as err:
        raise OutputError(f"cannot write {target}: {err.strerror or err}; nothing was written") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`atomic_write` of a UTF-8 text."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

