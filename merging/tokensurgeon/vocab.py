"""Which donor tokens the model already has: both vocabularies normalised as mergekit-tokensurgeon does.

A token is keyed by (kind, text): a word-start token ("Ġhello" in byte-level BPE, "▁hello" in SentencePiece) as
("word", "hello"), so the two conventions match; a named special token (bos, eos, unk, sep, pad, cls, mask: the
first role it holds) as ("special", role), so "<s>" and "<|begin_of_text|>" match as the BOS token; any other
token as ("text", token). The word-start marker of a vocabulary is the one more of its tokens begin with. Two
tokens of one vocabulary with the same key: the lower id keeps it (mergekit keeps the one its dict saw last).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MARKERS = ("Ġ", "▁")
ROLES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
Key = tuple[str, str]


def word_marker(tokens: list[str]) -> str:
    """The word-start marker most tokens of the vocabulary begin with ("Ġ" on a tie)."""
    counts = [sum(t.startswith(m) for t in tokens) for m in MARKERS]
    return MARKERS[0] if counts[0] >= counts[1] else MARKERS[1]


def special_roles(tokenizer: Any) -> dict[str, str]:
    """token -> its first named special role."""
    roles: dict[str, str] = {}
    for role in ROLES:
        token = getattr(tokenizer, role, None)
        if isinstance(token, str) and token not in roles:
            roles[token] = role
    return roles


def normalized(vocab: dict[str, int], roles: dict[str, str]) -> dict[Key, int]:
    """key -> id (see the module docstring), ids taken in increasing order."""
    marker = word_marker(list(vocab))
    out: dict[Key, int] = {}
    for token, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
        if token.startswith(marker):
            key = ("word", token[len(marker):])
        elif token in roles:
            key = ("special", roles[token])
        else:
            key = ("text", token)
        out.setdefault(key, idx)
    return out


@dataclass
class TokenMatch:
    """Donor ids -> model ids for the shared tokens; donor ids of the tokens to approximate; the donor's tokens."""

    shared: dict[int, int] = field(default_factory=dict)
    new: list[int] = field(default_factory=list)
    donor_tokens: dict[int, str] = field(default_factory=dict)


def match(model_tok: Any, donor_tok: Any, model_rows: int) -> TokenMatch:
    """Shared and new donor tokens; a model token whose id has no row in the model's embedding is not shared."""
    model_vocab, donor_vocab = model_tok.get_vocab(), donor_tok.get_vocab()
    mine = {k: i for k, i in normalized(model_vocab, special_roles(model_tok)).items() if i < model_rows}
    theirs = normalized(donor_vocab, special_roles(donor_tok))
    out = TokenMatch(donor_tokens={i: t for t, i in donor_vocab.items()})
    for key, d in sorted(theirs.items(), key=lambda kv: kv[1]):
        if key in mine:
            out.shared[d] = mine[key]
        else:
            out.new.append(d)
    known = set(theirs.values())
    out.new += [d for d in sorted(out.donor_tokens) if d not in known]  # a donor token whose key a lower id took
    out.new.sort()
    return out
