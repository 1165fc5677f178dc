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


def test_causal_lm_objective_is_the_next_token_loss():
    transformers = pytest.importorskip("transformers")
    from evaluations.model_losses import objective_for

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    loss, n = objective_for(model).batch_loss(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    logits = model(input_ids=ids, attention_mask=mask).logits
    rows = [(b, t) for b in range(2) for t in range(6) if labels[b, t + 1] != -100]
    by_hand = torch.stack([-logits[b, t].log_softmax(-1)[ids[b, t + 1]] for b, t in rows]).mean()
    assert n == len(rows) == 6 + 4 and torch.allclose(loss, by_hand, atol=1e-6)
    with pytest.raises(Exception, match="no text objective"):
        objective_for(nn.Linear(2, 2))
