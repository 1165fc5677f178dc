"""The recipe's tokenizer settings (`tokenizer_source` and mergekit's `tokenizer:` block), parsed and
validated without I/O; `merging.plan.vocab` builds the output vocabulary from them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from merging.recipe.schema import model_reference
from taxonomy.errors import BasinError


@dataclass(frozen=True)
class TokenSource:
    """Where a token's fill row comes from: `model` (that model's row for the token), `zero`, or
    `model_token` (that model's row for `token` or `token_id`)."""

    kind: str
    model: str | None = None
    token: str | None = None
    token_id: int | None = None


@dataclass(frozen=True)
class TokenRule:
    source: TokenSource
    force: bool = False


@dataclass(frozen=True)
class TokenizerSpec:
    """`source`: "base", "union" or a model reference."""

    source: str
    tokens: dict[str, TokenRule] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None

    @property
    def model_ref(self) -> str | None:
        return None if self.source in ("base", "union") else self.source

    def referenced_models(self) -> list[str]:
        return [r.source.model for r in self.tokens.values() if r.source.model is not None]


def parse_tokenizer(tokenizer_source: Any, block: Any, where: str = "recipe") -> TokenizerSpec | None:
    """The recipe's `tokenizer_source` or `tokenizer:` block (mergekit: at most one), checked."""
    if tokenizer_source is not None and block is not None:
        raise BasinError(f"{where}: give either tokenizer_source or a tokenizer: block, not both")
    if tokenizer_source is not None:
        return TokenizerSpec(_source(tokenizer_source, f"{where}: tokenizer_source"))
    if block is None:
        return None
    w = f"{where}: tokenizer"
    if not isinstance(block, dict):
        raise BasinError(f"{w}: expected a mapping with source, tokens, pad_to_multiple_of")
    extra = set(block) - {"source", "tokens", "pad_to_multiple_of"}
    if extra:
        raise BasinError(f"{w}: unknown field(s) {sorted(extra)} (known: pad_to_multiple_of, source, tokens)")
    source = _source(block.get("source", "union"), f"{w}.source")  # union: mergekit's default
    pad = block.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise BasinError(f"{w}.pad_to_multiple_of: expected a positive integer, got {pad!r}")
    tokens_in = block.get("tokens") or {}
    if not isinstance(tokens_in, dict):
        raise BasinError(f"{w}.tokens: expected a mapping of token -> {{source, force}}")
    tokens = {str(tok): _token_rule(cfg, f"{w}.tokens[{tok!r}]") for tok, cfg in tokens_in.items()}
    return TokenizerSpec(source, tokens, pad)


def _source(value: Any, where: str) -> str:
    """'base', 'union' or a model reference in any form mergekit's ModelReference takes (a string, or
    {model: <path or {path, revision}>, lora: ...}), as basin's reference string."""
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, dict):
        return model_reference(value, where)
    raise BasinError(f"{where} must be 'base', 'union' or a model reference, got {value!r}")


def _token_rule(cfg: Any, where: str) -> TokenRule:
    if not isinstance(cfg, dict) or "source" not in cfg:
        raise BasinError(f"{where}: expected a mapping with 'source' (and optional 'force')")
    extra = set(cfg) - {"source", "force"}
    if extra:
        raise BasinError(f"{where}: unknown field(s) {sorted(extra)}")
    force = cfg.get("force", False)
    if not isinstance(force, bool):
        raise BasinError(f"{where}.force: expected true or false, got {force!r}")
    src = cfg["source"]
    if isinstance(src, str) and src.strip() or isinstance(src, dict) and "model" in src and "kind" not in src:
        return TokenRule(TokenSource("model", model=model_reference(src, f"{where}.source")), force)
    if not isinstance(src, dict) or src.get("kind") not in ("zero", "model_token"):
        raise BasinError(f"{where}.source: expected a model reference, {{kind: zero}} or "
                         f"{{kind: model_token, model: ..., token: ...}}, got {src!r}")
    if src["kind"] == "zero":
        if set(src) != {"kind"}:
            raise BasinError(f"{where}.source: {{kind: zero}} takes no other field")
        return TokenRule(TokenSource("zero"), force)
    extra = set(src) - {"kind", "model", "token", "token_id"}
    if extra:
        raise BasinError(f"{where}.source: unknown field(s) {sorted(extra)}")
    model, token, token_id = src.get("model"), src.get("token"), src.get("token_id")
    if not isinstance(model, (str, dict)) or isinstance(model, str) and not model.strip():
        raise BasinError(f"{where}.source.model: expected a model reference, got {model!r}")
    model = model_reference(model, f"{where}.source.model")
    if (token is None) == (token_id is None):
        raise BasinError(f"{where}.source: give exactly one of token or token_id")
    if token_id is not None and (isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0):
        raise BasinError(f"{where}.source.token_id: expected a non-negative integer, got {token_id!r}")
    return TokenRule(TokenSource("model_token", model, None if token is None else str(token), token_id),
                     force)
