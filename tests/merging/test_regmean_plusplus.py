"""RegMean++ against an independent float64 closed form (a 2-layer MLP, a block-structured model)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from merging.modelwise.catalog import merge_models
from merging.modelwise.data_aware import regmean_merge
from merging.modelwise.regmean_plusplus import merge_units, regmean_plusplus_merge, repeated_blocks
from taxonomy.errors import BasinError


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()


def _closed_form(grams, ws, alpha):
    """W* = [(sum G~)^-1 sum G~ W^T]^T, written out in numpy-free float64 torch."""
    scaled = [alpha * g + (1 - alpha) * torch.diag(torch.diag(g)) for g in grams]
    return torch.linalg.solve(sum(scaled), sum(s @ w.T for s, w in zip(scaled, ws))).T


def test_two_layer_mlp_against_the_hand_written_closed_form():
    models = [_mlp(0), _mlp(1)]
    gen = torch.Generator().manual_seed(5)
    data = [torch.randn(20, 3, generator=gen, dtype=torch.float64), torch.randn(15, 3, generator=gen,
                                                                             dtype=torch.float64)]
    alpha = 0.7
    got = regmean_plusplus_merge(models, data, alpha=alpha)
    p = [dict(m.named_parameters()) for m in models]
    # layer 1: inputs are the data themselves, so it is RegMean's layer 1
    w1 = _closed_form([x.T @ x for x in data], [q["0.weight"].detach() for q in p], alpha)
    b1 = (p[0]["0.bias"] + p[1]["0.bias"]).detach() / 2
    # layer 2: inputs through the MERGED layer 1 (RegMean would use each model's own layer 1)
    hidden = [torch.relu(x @ w1.T + b1) for x in data]
    w2 = _closed_form([h.T @ h for h in hidden], [q["2.weight"].detach() for q in p], alpha)
    torch.testing.assert_close(got["0.weight"], w1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got["0.bias"], b1)
    torch.testing.assert_close(got["2.weight"], w2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got["2.bias"], (p[0]["2.bias"] + p[1]["2.bias"]).detach() / 2)
    plain = regmean_merge(models, data, alpha=alpha)
    torch.testing.assert_close(plain["0.weight"], got["0.weight"], rtol=1e-10, atol=1e-12)
    assert (plain["2.weight"] - got["2.weight"]).abs().max() > 1e-3  # layer 2 really differs from RegMean
    via_catalog = merge_models("regmean++", models, data, {"alpha": alpha})
    torch.testing.assert_close(via_catalog["2.weight"], w2, rtol=1e-10, atol=1e-12)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)

    def forward(self, x):
        return x + self.b(torch.tanh(self.a(x)))


class Stack(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList([Block(), Block()])
        self.out = nn.Linear(3, 2)
        self.double()

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return self.out(x)


def test_blocks_use_the_candidates_features_inside_and_the_merged_ones_between():
    models = [Stack(0), Stack(1), Stack(2)]
    assert repeated_blocks(models[0]) == ["layers.0", "layers.1"]
    gen = torch.Generator().manual_seed(3)
    data = [torch.randn(12, 3, generator=gen, dtype=torch.float64) for _ in models]
    assert merge_units(models[0], data[0]) == [("layers.0", ["layers.0.a", "layers.0.b"]),
                                               ("layers.1", ["layers.1.a", "layers.1.b"]), ("out", ["out"])]
    got = regmean_plusplus_merge(models, data, alpha=1.0)
    avg = {k: sum(m.state_dict()[k] for m in models) / 3 for k in models[0].state_dict()}

    def block(prefix, state, x):
        h = torch.tanh(x @ state[f"{prefix}.a.weight"].T + state[f"{prefix}.a.bias"])
        return h, x + h @ state[f"{prefix}.b.weight"].T + state[f"{prefix}.b.bias"]

    inputs = list(data)
    expected = dict(avg)
    for prefix in ("layers.0", "layers.1"):
        hiddens = [block(prefix, m.state_dict(), x)[0] for m, x in zip(models, inputs)]  # candidate's block
        for name, feats in (("a", inputs), ("b", hiddens)):
            key = f"{prefix}.{name}.weight"
            expected[key] = _closed_form([f.T @ f for f in feats], [m.state_dict()[key] for m in models], 1.0)
        inputs = [block(prefix, expected, x)[1] for x in inputs]  # the merged block's output
    expected["out.weight"] = _closed_form([f.T @ f for f in inputs], [m.state_dict()["out.weight"] for m in models],
                                          1.0)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-9, atol=1e-11, msg=key)


def test_bad_alpha_and_models_are_one_line_errors():
    with pytest.raises(BasinError, match="alpha"):
        regmean_plusplus_merge([_mlp(0), _mlp(1)], torch.randn(4, 3, dtype=torch.float64), alpha=1.5)
    with pytest.raises(BasinError, match="at least 2"):
        merge_models("regmean_plusplus", [_mlp(0)], torch.randn(4, 3, dtype=torch.float64))
