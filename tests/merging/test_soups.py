"""Greedy and uniform soups (Wortsman et al. 2022) on problems whose answer is known by hand."""

import json

import pytest
import torch
from torch.func import functional_call

from evaluations.digits import accuracy, load_digits_split, make_mlp, train_classifier
from merging.modelwise.soups import greedy_soup, uniform_soup
from taxonomy import BasinError


def scalar_models(values):
    return [{"w": torch.tensor([v]), "steps": torch.tensor(i)} for i, v in enumerate(values)]


def closeness_to_zero(sd):
    return -float(sd["w"].mean()) ** 2


def test_greedy_soup_toy_problem_worked_by_hand():
    # individual scores -9, -0.25, -0.01, -0.04: tried in the order 2, 3, 1, 0.
    # {2}: w = 0.1 (score -0.01); + 3: w = -0.05 (-0.0025, kept); + 1: w = 0.1333 (-0.0178, dropped);
    # + 0: w = 0.9667 (-0.934, dropped). The soup is models 2 and 3, w = -0.05.
    calls = []

    def score(sd):
        calls.append(sd)
        return closeness_to_zero(sd)

    result = greedy_soup(scalar_models([3.0, 0.5, 0.1, -0.2]), score, progress=False)
    assert result.order == [2, 3, 1, 0]
    assert result.chosen == [2, 3]
    assert result.individual_scores == pytest.approx([-9.0, -0.25, -0.01, -0.04])
    assert result.trial_scores == pytest.approx([-0.01, -0.0025, -(0.4 / 3) ** 2, -(2.9 / 3) ** 2], rel=1e-5)
    assert result.score == pytest.approx(-0.0025, rel=1e-5)
    assert result.state_dict["w"].item() == pytest.approx(-0.05, rel=1e-6)
    assert result.state_dict["steps"].item() == 2  # integer buffers come from the first ingredient
    assert len(calls) == 4 + 3  # each model alone, then one trial per remaining ingredient
    json.dumps(result.to_json())


def test_greedy_soup_keeps_ties_and_uses_given_individual_scores():
    models = scalar_models([0.25, 0.25, 0.75])  # exact in binary: ties are exact
    calls = []

    def score(sd):
        calls.append(1)
        return closeness_to_zero(sd)

    result = greedy_soup(models, score, individual_scores=[-0.0625, -0.0625, -0.5625], progress=False)
    assert result.order == [0, 1, 2]  # equal scores keep the input order
    assert result.chosen == [0, 1]  # the same 0.25 again ties (kept); 0.75 lowers the score
    assert result.trial_scores == pytest.approx([-0.0625, -0.0625, -(1.25 / 3) ** 2], rel=1e-5)
    assert len(calls) == 2
    with pytest.raises(BasinError, match="2 individual_scores for 3"):
        greedy_soup(models, score, individual_scores=[1.0, 2.0], progress=False)


def test_uniform_soup_mean_and_dtypes():
    g = torch.Generator().manual_seed(0)
    sds = [{"a": torch.randn(3, 4, generator=g).to(torch.bfloat16), "b": torch.randn(5, generator=g),
            "n": torch.tensor([i, 7])} for i in range(3)]
    out = uniform_soup(sds)
    expected = sum(sd["a"].double() for sd in sds) / 3
    torch.testing.assert_close(out["a"], expected.to(torch.bfloat16))
    assert out["a"].dtype == torch.bfloat16
    torch.testing.assert_close(out["b"], sum(sd["b"] for sd in sds) / 3)
    assert torch.equal(out["n"], sds[0]["n"])


def test_soups_refuse_mismatched_models():
    with pytest.raises(BasinError, match="model 1 tensor names differ"):
        uniform_soup([{"a": torch.zeros(2)}, {"b": torch.zeros(2)}])
    with pytest.raises(BasinError, match="a: model 1 has shape"):
        greedy_soup([{"a": torch.zeros(2)}, {"a": torch.zeros(3)}], closeness_to_zero, progress=False)
    with pytest.raises(BasinError, match="no state dicts"):
        uniform_soup([])


def test_greedy_soup_of_digits_mlps_never_loses_to_its_best_ingredient():
    split = load_digits_split(seed=0)
    (x_tr, y_tr), (x_val, y_val) = split.train, split.test
    ingredients = []
    for i, lr in enumerate((1e-2, 5e-3, 2e-3)):  # one shared initialization, fine-tuned three ways
        model = train_classifier(make_mlp([64, 32, 10], seed=0), x_tr, y_tr, epochs=2, lr=lr,
                                 batch_size=256, seed=i)
        ingredients.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    net = make_mlp([64, 32, 10], seed=0)

    def val_accuracy(sd):
        with torch.no_grad():
            return float((functional_call(net, sd, (x_val,)).argmax(-1) == y_val).float().mean())

    result = greedy_soup(ingredients, val_accuracy, progress=False)
    best = max(range(3), key=lambda i: result.individual_scores[i])
    assert result.chosen[0] == best
    assert result.score >= result.individual_scores[best]
    net.load_state_dict(result.state_dict)
    assert accuracy(net, x_val, y_val) == pytest.approx(result.score)
