"""Model references, parsed in one place: a path, a Hub id `org/name[@revision]`, or `base+adapter` (a LoRA
adapter applied to a base; a path that exists is a path even if it contains '+')."""

from __future__ import annotations

import os
import re
from pathlib import Path

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")


def split_adapter(ref: str) -> tuple[str, str | None]:
    """(base, adapter) of `base+adapter`; (ref, None) for a plain reference or an existing path."""
    if "+" in ref and not Path(os.path.expanduser(ref)).exists():
        base, adapter = ref.rsplit("+", 1)
        return base, adapter
    return ref, None


def join_adapter(base: str, adapter: str | None) -> str:
    return base if adapter is None else f"{base}+{adapter}"


def parts(ref: str) -> list[str]:
    """The references `ref` is made of: [ref], or [base, adapter]."""
    base, adapter = split_adapter(ref)
    return [base] if adapter is None else [base, adapter]


def hub_id(ref: str) -> tuple[str, str | None] | None:
    """(repo, revision) when `ref` is a Hub id (never a path starting with '.', '/' or '~'), else None."""
    m = HUB_ID.match(ref)
    if m is None or ref.startswith((".", "/", "~")):
        return None
    return m.group("repo"), m.group("rev")


def is_hub_id(ref: str) -> bool:
    return hub_id(ref) is not None
