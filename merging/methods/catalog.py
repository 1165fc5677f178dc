"""Every tensorwise merge method, by name: the bound methods of the family modules listed here."""

from __future__ import annotations

from merging.methods import (
    competition,
    interpolation,
    isotropic,
    knots,
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
from taxonomy.core import Kind, MethodInfo

FAMILY_MODULES = (interpolation, spherical, task_arithmetic, subspace, ram, isotropic, competition, masks, wudi,
                  knots)


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
        raise BasinError(not_streamable(info)) from None


def not_streamable(info: MethodInfo) -> str:
    """Why a taxonomy entry cannot run in the streaming engine (`basin merge`), and where it does run."""
    if info.kind is not Kind.MODELWISE:
        return f"method {info.name!r} is in the taxonomy but is not a merge method ({info.kind.value})"
    needs = [what for what, flag in (("a base model", info.needs_base), ("unlabeled test inputs",
                                                                        info.needs_test_inputs),
                                     ("data", info.needs_data and not info.needs_test_inputs)) if flag]
    return (f"method {info.name!r} is a model-level merge" + (f" that needs {' and '.join(needs)}" if needs else "")
            + ": it does not stream through `basin merge`; run it from the Python API "
            "(merging.modelwise.catalog.merge_models) or in a `basin bench` suite")


def registered_names() -> list[str]:
    return sorted(METHODS)
