"""The registry of method entries that the CLI, the docs and the merge engine read."""

from __future__ import annotations

from collections.abc import Iterable

from taxonomy import adaptive, alignment, ensemble, importance, interference, interpolation, task_arithmetic
from taxonomy.core import Family, MethodInfo
from taxonomy.errors import BasinError, suggest

FAMILIES = (interpolation, task_arithmetic, interference, importance, alignment, ensemble, adaptive)


def _index(infos: Iterable[MethodInfo]) -> dict[str, MethodInfo]:
    """Name and alias -> entry; a name declared twice is a programming error."""
    out: dict[str, MethodInfo] = {}
    for info in infos:
        for key in (info.name, *info.aliases):
            if key in out:
                raise RuntimeError(f"taxonomy entry {key!r} declared twice")
            out[key] = info
    return out


_ENTRIES = _index(info for module in FAMILIES for info in module.ENTRIES)


def get(name: str) -> MethodInfo:
    try:
        return _ENTRIES[name]
    except KeyError:
        hint = suggest(name, _ENTRIES) or " (run `basin methods` for the list)"
        raise BasinError(f"unknown merge method {name!r}{hint}") from None


def parameter_names() -> set[str]:
    """Every parameter name of every method (a recipe may set one its method ignores, as in mergekit)."""
    return {p.name for info in _ENTRIES.values() for p in info.params}


def all_methods(family: Family | None = None) -> list[MethodInfo]:
    seen: dict[str, MethodInfo] = {}
    for info in _ENTRIES.values():
        seen.setdefault(info.name, info)
    out = [m for m in seen.values() if family is None or m.family == family]
    return sorted(out, key=lambda m: (list(Family).index(m.family), m.category, m.name))


def table(methods: Iterable[MethodInfo] | None = None) -> str:
    """A plain-text table of methods: name, family, category, paper, needs."""
    rows = [("method", "family", "category", "needs", "paper")]
    for m in methods if methods is not None else all_methods():
        needs = ",".join(
            n for n, flag in (("base", m.needs_base), ("data", m.needs_data), ("test-inputs", m.needs_test_inputs),
                              ("task-id", m.needs_task_identity), ("lora", m.needs_lora),
                              ("shared-init", m.needs_shared_init))
            if flag
        ) or "-"
        rows.append((m.name, m.family.value, m.category, needs, m.paper))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 5)
    return "\n".join(lines)
