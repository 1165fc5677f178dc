"""Every tensorwise merge method, by name: the bound methods of the family modules listed here."""

from __future__ import annotations

from merging.methods import (
    competition,
    interpolation,
    isotropic,
    masks,
    ram,
    spherical,
    subspace,
    task_arithmetic,
    wudi,
)
from merging.methods.registry import RegisteredMethod
from taxonomy import BasinError
from taxonomy import get as get_info

FAMILY_MODULES = (interpolation, spherical, task_arithmetic, subspace, ram, isotropic, competition, masks, wudi)


def _collect() -> dict[str, RegisteredMethod]:
    out: dict[str, RegisteredMethod] = {}
    for module in FAMILY_MODULES:
        for value in vars(module).values():
            if isinstance(value, RegisteredMethod):
                if value.info.name in out and out[value.info.name] is not value:
                    raise RuntimeError(f"merge method {value.info.name!r} implemented twice")
                out[value.info.name] = value
    return out


METHODS = _collect()


def get_method(name: str) -> RegisteredMethod:
    """The tensorwise method `name` (or an alias); BasinError for an unknown or not tensorwise method."""
    info = get_info(name)  # raises BasinError for unknown names
    try:
        return METHODS[info.name]
    except KeyError:
        raise BasinError(f"method {name!r} is in the taxonomy but is not a tensorwise merge method") from None


def registered_names() -> list[str]:
    return sorted(METHODS)
