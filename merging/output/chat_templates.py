"""The recipe's `chat_template` (`merging.recipe.chat_template`) resolved and written into the output.

As mergekit: 'auto' takes the template most of the merged models share (ties: the first in the
recipe's model order; none: nothing is written); a short name without '{' picks one of the named
templates below; anything else must be a Jinja template (at least 20 characters, with a '{').
The template goes into the output's tokenizer_config.json as `chat_template` (any copied
chat_template.jinja / chat_template.json is dropped, since transformers would prefer it).
Templates are read as data from the inputs' tokenizer_config.json / chat_template.jinja /
chat_template.json: no tokenizer code is loaded.

The named templates are basin's renderings of the formats mergekit ships (alpaca, chatml, exaone,
llama3, mistral): for chatml, llama3, mistral and alpaca they render the same text as mergekit's
under transformers' Jinja settings (tested on sample conversations); exaone omits the
indentation whitespace mergekit's renders.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from merging.recipe.chat_template import NAMED
from taxonomy.errors import RecipeError

DROPPED_FILES = ("chat_template.jinja", "chat_template.json")


def folder_template(folder: Path | None) -> str | None:
    """A tokenizer folder's chat template, read as data: chat_template.jinja, chat_template.json, else the
    tokenizer_config.json key (a list of named templates gives its 'default'); stripped; None if none."""
    if folder is None:
        return None
    template: Any = None
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    else:
        for name in ("chat_template.json", "tokenizer_config.json"):
            if (folder / name).is_file():
                template = _json_template(folder / name)
                if template:
                    break
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    return template.strip() if isinstance(template, str) and template.strip() else None


def _json_template(path: Path) -> Any:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise RecipeError(f"{path}: not valid JSON (reading its chat template)") from None
    return data.get("chat_template") if isinstance(data, dict) else None


def resolve_chat_template(value: str | None, folders: list[Path | None]) -> str | None:
    """The template to write: for 'auto', the most common among `folders` (first on ties, None if none)."""
    if value is None:
        return None
    if value == "auto":
        found = [t for t in (folder_template(f) for f in folders) if t]
        if not found:
            return None
        counts = Counter(found)
        best = max(counts.values())
        return next(t for t in found if counts[t] == best)
    return NAMED.get(value, value)


def with_chat_template(tokenizer_config: str | None, template: str) -> str:
    """tokenizer_config.json's text with `chat_template` set (a new config if there was none)."""
    config = json.loads(tokenizer_config) if tokenizer_config else {}
    if not isinstance(config, dict):
        raise RecipeError("tokenizer_config.json: expected a JSON object")
    config["chat_template"] = template
    return json.dumps(config, indent=2) + "\n"
