"""The recipe's `chat_template`: 'auto', a named template, or a Jinja template, written into the output.

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

from taxonomy.errors import RecipeError, suggest

NAMED: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}{{ '<|start_header_id|>' + "
        "message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "mistral": (
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set turns = messages[1:] %}{% else %}{% set turns = messages %}{% endif %}{{ bos_token }}"
        "{% for message in turns %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('conversation roles must alternate user/assistant after an optional system message') }}"
        "{% endif %}"
        "{% if message['role'] == 'user' %}{{ ' [INST] ' }}{% if loop.first and system is defined %}"
        "{{ system + '\\n\\n' }}{% endif %}{{ message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
        "{% else %}{{ raise_exception('only user and assistant roles, after an optional system message') }}"
        "{% endif %}{% endfor %}"
    ),
    "alpaca": (
        "{% set system = messages | selectattr('role', 'equalto', 'system') | list %}"
        "{{ (system | last).content | trim if system else '' }}{{ '\\n\\n' }}"
        "{% set headers = {'user': '### Instruction:', 'assistant': '### Response:', 'user_context': '### Input:'} %}"
        "{% for message in messages %}{% if message['role'] in headers %}"
        "{{ headers[message['role']] + '\\n' + message['content'] | trim }}"
        "{% if not loop.last %}{{ '\\n\\n' }}{% endif %}{% endif %}{% endfor %}"
        "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '### Response:\\n' }}{% endif %}"
    ),
    "exaone": (
        "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
        "{{ '[|system|][|endofturn|]\\n' }}{% endif %}{{ '[|' + message['role'] + '|]' + message['content'] }}"
        "{% if message['role'] == 'user' %}{{ '\\n' }}{% else %}{{ '[|endofturn|]\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
    ),
}
DROPPED_FILES = ("chat_template.jinja", "chat_template.json")


def _is_name(value: str) -> bool:
    return len(value) < 256 and "\n" not in value and "{" not in value


def check_chat_template(value: Any, where: str) -> None:
    """'auto', a named template or a Jinja template (mergekit's rule), else a one-line BasinError."""
    if not isinstance(value, str):
        raise RecipeError(f"{where}: expected 'auto', a template name or a Jinja template, got {value!r}")
    if value == "auto" or value in NAMED:
        return
    if _is_name(value) and len(value) < 20:
        raise RecipeError(f"{where}: unknown chat template {value!r}{suggest(value, NAMED)} "
                         f"(named: auto, {', '.join(sorted(NAMED))}; or give a Jinja template)")
    if len(value) < 20 or "{" not in value:
        raise RecipeError(f"{where}: not a chat template (a Jinja template has '{{' and at least 20 characters)")


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
