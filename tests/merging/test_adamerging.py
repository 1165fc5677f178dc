"""AdaMerging: the entropy objective's gradient against finite differences (float64), and a toy whose
harmful task vector must be switched off."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from merging.modelwise.adamerging import TaskVectors, adamerging, entropy_objective, prediction_entropy
from merging.modelwise.catalog import merge_models
from taxonomy.errors import BasinError


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _perturbed(base: nn.Module, seed: int, scale: float = 0.5) -> nn.Module:
    model = _mlp(0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p, q in zip(model.parameters(), base.parameters()):
            p.copy_(q + scale * torch.randn(q.shape, generator=gen, dtype=q.dtype))
    return model


def test_entropy_by_hand():
    logits = torch.tensor([[0.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    p = torch.sigmoid(torch.tensor(1.0, dtype=torch.float64))
    by_hand = (torch.log(torch.tensor(2.0, dtype=torch.float64)) - (p * p.log() + (1 - p) * (1 - p).log())) / 2
    torch.testing.assert_close(prediction_entropy(logits), by_hand)


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_gradient_matches_central_finite_differences(granularity):
    base = _mlp(0)
    models = [_perturbed(base, 1), _perturbed(base, 2), _perturbed(base, 3)]
    gen = torch.Generator().manual_seed(7)
    batches = [((torch.randn(6, 4, generator=gen, dtype=torch.float64),), {}) for _ in models]
    vectors = TaskVectors(base.state_dict(), models, granularity)
    objective = entropy_objective(vectors, models, batches)
    lam = torch.rand(len(models), len(vectors.groups), generator=gen, dtype=torch.float64).requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(lam), lam)
    eps = 1e-6
    numeric = torch.zeros_like(grad)
    with torch.no_grad():
        for idx in torch.cartesian_prod(*(torch.arange(s) for s in lam.shape)).reshape(-1, 2).tolist():
            step = torch.zeros_like(lam)
            step[tuple(idx)] = eps
            numeric[tuple(idx)] = (objective(lam + step) - objective(lam - step)) / (2 * eps)
    assert grad.shape == (3, 1 if granularity == "task" else 4)
    torch.testing.assert_close(grad, numeric, rtol=1e-6, atol=1e-9)


def test_a_harmful_task_vector_is_switched_off_and_entropy_drops():
    """Logits (1 + 2 l_A - 1.5 l_B) W0 x: tau_A sharpens, tau_B flattens every prediction, so minimising
    the entropy must raise l_A and drive l_B to its lower clamp 0."""
    torch.manual_seed(0)
    base = nn.Linear(4, 3, bias=False).double()
    sharpen, flatten = nn.Linear(4, 3, bias=False).double(), nn.Linear(4, 3, bias=False).double()
    with torch.no_grad():
        sharpen.weight.copy_(3.0 * base.weight)
        flatten.weight.copy_(-0.5 * base.weight)
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(64, 4, generator=gen, dtype=torch.float64) for _ in range(2)]
    before = {k: v.clone() for k, v in sharpen.state_dict().items()}
    result = adamerging(base, [sharpen, flatten], inputs, "task", lr=0.05, steps=60, batch_size=16, seed=0)
    assert result.entropies[-1] < result.entropies[0] - 0.05
    lam_a, lam_b = result.coefficients[:, 0].tolist()
    assert lam_a > 0.9 and lam_b == 0.0
    expected = base.weight.detach() * (1 + 2 * lam_a - 1.5 * lam_b)
    torch.testing.assert_close(result.state["weight"], expected)
    torch.testing.assert_close(sharpen.state_dict()["weight"], before["weight"])  # the inputs are untouched
    again = merge_models("adamerging_task", [sharpen, flatten], inputs,
                         {"lr": 0.05, "steps": 60, "batch_size": 16}, base=base, seed=0)
    assert torch.equal(again["weight"], result.state["weight"])  # deterministic for one seed


def test_layerwise_learns_one_coefficient_per_tensor_and_no_steps_is_task_arithmetic():
    base = _mlp(0)
    models = [_perturbed(base, 1), _perturbed(base, 2)]
    inputs = [torch.randn(10, 4, dtype=torch.float64) for _ in models]
    result = adamerging(base, models, inputs, "layer", steps=3, seed=0)
    assert result.coefficients.shape == (2, 4) and result.groups == ["0.weight", "0.bias", "2.weight", "2.bias"]
    zero = adamerging(base, models, inputs, "layer", steps=0)
    for k, v in base.state_dict().items():
        expected = v + 0.3 * (models[0].state_dict()[k] - v) + 0.3 * (models[1].state_dict()[k] - v)
        torch.testing.assert_close(zero.state[k], expected)


def test_bad_input_is_a_one_line_error():
    base = _mlp(0)
    with pytest.raises(BasinError, match="one per task"):
        adamerging(base, [_perturbed(base, 1)], [torch.randn(3, 4), torch.randn(3, 4)])
    with pytest.raises(BasinError, match="granularity"):
        adamerging(base, [_perturbed(base, 1)], [torch.randn(3, 4)], "block")
    with pytest.raises(BasinError, match="needs a base"):
        merge_models("adamerging_layer", [_perturbed(base, 1)], [torch.randn(3, 4)])
    with pytest.raises(BasinError, match="does not match the base"):
        adamerging(nn.Linear(2, 2), [_perturbed(base, 1)], [torch.randn(3, 4)])
