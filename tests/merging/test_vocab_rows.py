"""`merging.plan.vocab.remap_rows` against a row-by-row reference of the documented fill rules, and the
tokenizer-block parser."""

from __future__ import annotations

import pytest
import torch

from merging.plan.vocab import mean_rows, remap_rows
from merging.recipe.tokenizer import TokenRule, TokenSource, parse_tokenizer
from taxonomy.errors import BasinError


def reference(tensors, perms, own, base, rules):
    """Row by row, model by model, the rules of the merging.plan.vocab docstring, in float64."""
    k, n = len(tensors), len(perms[0])
    out = [torch.zeros((n,) + tuple(t.shape[1:]), dtype=torch.float64) for t in tensors]
    for r in range(n):
        have = [i for i in range(k) if perms[i][r] >= 0]
        rule = rules.get(r)
        for i in range(k):
            if i in have and not (rule and rule[3]):
                out[i][r] = tensors[i][perms[i][r]].double()
                continue
            if rule is not None:
                kind, src, src_row, _ = rule
                fill = (torch.zeros_like(out[i][r]) if kind == "zero" else
                        tensors[src][perms[src][r]].double() if kind == "model" else tensors[src][src_row].double())
            elif len(have) == 1:
                fill = tensors[have[0]][perms[have[0]][r]].double()
            elif len(have) > 1 and base in have:
                fill = tensors[base][perms[base][r]].double()
            elif have:
                fill = sum(tensors[j][perms[j][r]].double() for j in have) / len(have)
            else:
                fill = tensors[i][own[i]].double().mean(0)
            out[i][r] = fill
    return out


def _case(seed: int, rest: tuple[int, ...] = (5,)):
    g = torch.Generator().manual_seed(seed)
    rows = [7, 9, 6]
    tensors = [torch.randn((m,) + rest, generator=g) for m in rows]
    n = 12
    perms = []
    for m in rows:
        p = torch.full((n,), -1, dtype=torch.long)
        where = torch.randperm(n, generator=g)[:m - 1]  # one row of each model carries no output token
        p[where] = torch.randperm(m, generator=g)[:m - 1]
        perms.append(p)
    own = [torch.arange(m) for m in rows]
    return tensors, perms, own


@pytest.mark.parametrize("base", [None, 0, 2])
@pytest.mark.parametrize("rest", [(5,), ()])
def test_remap_rows_matches_reference(base, rest):
    tensors, perms, own = _case(3, rest)
    count = torch.stack([p >= 0 for p in perms]).sum(0)
    assert {0, 1, 2, 3} <= set(count.tolist())  # every fill case occurs
    for rules in ({}, {0: ("zero", None, None, True), 4: ("model_token", 1, 2, False),
                       5: ("model_token", 2, 0, True)}):
        got = remap_rows(tensors, perms, own, base, rules)
        want = reference(tensors, perms, own, base, rules)
        for g, w in zip(got, want):
            assert g.dtype == torch.float32
            torch.testing.assert_close(g.double(), w)


def test_remap_rows_model_rule_and_all_present_rows_are_copies():
    tensors, perms, own = _case(5)
    first_have = next(r for r in range(12) if perms[1][r] >= 0)
    rules = {first_have: ("model", 1, None, True)}
    got = remap_rows(tensors, perms, own, None, rules)
    want = reference(tensors, perms, own, None, rules)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w)
    for i in range(3):  # every model takes model 1's row there
        assert torch.equal(got[i][first_have], tensors[1][perms[1][first_have]])


def test_remap_rows_keeps_dtype_and_copies_present_rows_exactly():
    tensors, perms, own = _case(7)
    half = [t.to(torch.bfloat16) for t in tensors]
    got = remap_rows(half, perms, own)
    for g, t, p in zip(got, half, perms):
        assert g.dtype == torch.bfloat16
        have = p >= 0
        assert torch.equal(g[have], t[p[have]])


def test_mean_rows_chunked(monkeypatch):
    import merging.plan.vocab as vocab

    monkeypatch.setattr(vocab, "ROW_CHUNK", 3)
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    rows = torch.tensor([0, 2, 3, 7, 9])
    torch.testing.assert_close(mean_rows(x, rows), x[rows].mean(0))


def test_parse_tokenizer():
    assert parse_tokenizer(None, None) is None
    spec = parse_tokenizer(None, {"tokens": {"<a>": {"source": "m1"}, "<b>": {"source": {"kind": "zero"},
                                                                                "force": True}},
                                  "pad_to_multiple_of": 64})
    assert spec.source == "union" and spec.pad_to_multiple_of == 64  # mergekit's default source
    assert spec.tokens["<a>"] == TokenRule(TokenSource("model", model="m1"))
    assert spec.tokens["<b>"] == TokenRule(TokenSource("zero"), force=True)
    assert spec.referenced_models() == ["m1"]
    assert parse_tokenizer("org/tok", None).model_ref == "org/tok"
    assert parse_tokenizer("base", None).model_ref is None
    with pytest.raises(BasinError, match="force"):
        parse_tokenizer(None, {"tokens": {"<a>": {"source": "m1", "force": "yes"}}})
    with pytest.raises(BasinError, match="token_id"):
        parse_tokenizer(None, {"tokens": {"<a>": {"source": {"kind": "model_token", "model": "m", "token_id": -1}}}})
