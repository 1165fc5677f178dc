import pytest
import torch
from torch import nn
from torch.nn import functional as F

from evaluations.objective import Objective, standard_loss, supervised
from taxonomy.errors import ProbeError


def test_supervised_matches_the_loss_by_hand():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(5, 4), torch.tensor([0, 2, 1, 1, 0])
    loss, n = supervised().batch_loss(model, (x, y))
    logits = x @ model.weight.T + model.bias
    by_hand = -(logits.log_softmax(-1)[torch.arange(5), y]).mean()
    assert n == 5 and torch.allclose(loss, by_hand)
    target = torch.randn(5, 3)
    mse, _ = supervised("mse").batch_loss(model, (x, target))
    assert torch.allclose(mse, ((logits - target) ** 2).mean())
    assert torch.allclose(standard_loss("mse", logits, target), F.mse_loss(logits, target))


def test_unknown_loss_is_refused():
    with pytest.raises(ProbeError, match="loss"):
        Objective(name="x", loss="hinge", predict=lambda m, b: b)
