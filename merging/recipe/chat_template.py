"""The recipe's `chat_template` value: 'auto', one of the named templates below, or a Jinja template (mergekit's
rule), checked without I/O. The named templates are basin's renderings of the formats mergekit ships
(`merging.output.chat_templates` writes them)."""

from __future__ import annotations

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


def is_name(value: str) -> bool:
    return len(value) < 256 and "\n" not in value and "{" not in value


def check_chat_template(value: Any, where: str) -> None:
    """'auto', a named template or a Jinja template (mergekit's rule), else a one-line BasinError."""
    if not isinstance(value, str):
        raise RecipeError(f"{where}: expected 'auto', a template name or a Jinja template, got {value!r}")
    if value == "auto" or value in NAMED:
        return
    if is_name(value) and len(value) < 20:
        raise RecipeError(f"{where}: unknown chat template {value!r}{suggest(value, NAMED)} "
                         f"(named: auto, {', '.join(sorted(NAMED))}; or give a Jinja template)")
    if len(value) < 20 or "{" not in value:
        raise RecipeError(f"{where}: not a chat template (a Jinja template has '{{' and at least 20 characters)")
