"""matplotlib for the figures, imported only when one is drawn (it is the optional `plot` extra), on the
file-only Agg backend: `pyplot()` raises `MatplotlibMissing` (a BasinError, and an ImportError) without it,
`optional_pyplot()` returns None for the plots that are skipped without it."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from merging.io.atomic import atomic_write
from taxonomy.errors import BasinError


class MatplotlibMissing(BasinError, ImportError):
    """A figure was asked for and matplotlib cannot be imported."""


def pyplot() -> ModuleType:
    """matplotlib.pyplot with the Agg backend (figures go to files, no display needed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise MatplotlibMissing(f"plotting needs matplotlib, which cannot be imported ({err}); "
                                "install it with: pip install 'basin[plot]'") from None
    return plt


def optional_pyplot() -> ModuleType | None:
    """`pyplot()`, or None when matplotlib is missing."""
    try:
        return pyplot()
    except MatplotlibMissing:
        return None


def save_figure(fig: object, path: str | Path, **savefig_kwargs: object) -> Path:
    """`fig.savefig(path, ...)` written atomically (`merging.io.atomic.atomic_write`), then the figure closed."""
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, **savefig_kwargs))
    finally:
        pyplot().close(fig)
