"""KFAC on the shared batch loop: row weighting, `gradient()`, and KFAC-reduce (Eschenhagen et al. 2023).

References: factors summed by hand over the concatenated data; the autograd gradient of the concatenated mean
loss; the dense GGN (jacrev, torch.func.hessian) where KFAC-reduce is exact (one example whose layer output is
summed over its positions, so every position's output gradient is the same); brute-force reduced factors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from evaluations.model_losses import CAUSAL_LM
from evaluations.objective import standard_loss, supervised
from evaluations.probes.kfac import KFACOperator
from taxonomy.errors import ProbeError
from tests.evaluations.test_probes_kfac import _CNN, _close, _dense, _gen, _ggn, _llama, _lm_batch, _mlp, _targets

F64 = torch.float64
SIZES = (4, 6, 3)


def _split(x: torch.Tensor, y: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    cuts = torch.tensor(SIZES).cumsum(0).tolist()
    return [(x[lo:hi], y[lo:hi]) for lo, hi in zip([0, *cuts[:-1]], cuts)]


def test_factors_row_weighted_over_batches():
    """Batches of 4, 6, 3 rows: A and G are the whole data's (features and softmax curvatures over all 13 rows),
    the operator's weights are rows / 13, and the factors do not depend on how the data is split."""
    model = _mlp([3, 4, 2])
    x, y = torch.randn(13, 3, generator=_gen(20), dtype=F64), _targets("cross_entropy", 13, 2)
    op = KFACOperator(model, supervised(), _split(x, y))
    assert op.rows == list(SIZES) and op.weights == [r / 13 for r in SIZES] and len(op.batches) == 3
    a = torch.cat([x, torch.ones(13, 1, dtype=F64)], 1)
    _close(op.blocks[0].A, a.T @ a / 13, 1e-13)
    hidden = torch.tanh(model[0](x)).detach()
    h1 = torch.cat([hidden, torch.ones(13, 1, dtype=F64)], 1)
    _close(op.blocks[1].A, h1.T @ h1 / 13, 1e-13)
    p = torch.softmax(model(x).detach(), 1)
    _close(op.blocks[1].G, (torch.diag(p.sum(0)) - p.T @ p) / 13, 1e-13)
    whole = KFACOperator(model, supervised(), (x, y))
    for b, w in zip(op.blocks, whole.blocks):
        _close(b.A, w.A, 1e-13)
        _close(b.G, w.G, 1e-13)
    v = torch.randn(op.size, generator=_gen(21), dtype=F64)
    assert torch.equal(op @ v, op.matvec(v)) and op.n_products == 2


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_gradient_is_the_mean_loss_gradient(loss):
    """`gradient()` (the protocol's optional method) = autograd of the mean loss over all 13 rows; `loss()` too."""
    model = _mlp([3, 5, 2])
    x, y = torch.randn(13, 3, generator=_gen(22), dtype=F64), _targets(loss, 13, 2)
    op = KFACOperator(model, supervised(loss), _split(x, y), params="2")
    params = dict(model.named_parameters())
    value = standard_loss(loss, model(x), y)
    ref = torch.autograd.grad(value, [params[n] for n in op.names])
    _close(op.gradient(), torch.cat([g.reshape(-1) for g in ref]), 1e-13)
    assert op.loss() == pytest.approx(float(value), rel=1e-13)
    assert op.names == ["2.weight", "2.bias"]


def test_gradient_causal_lm_row_weighted():
    """A tiny Llama on two batches with padding: the gradient of the mean over the 9 predicted tokens."""
    model = _llama()
    batches = [_lm_batch([5, 3]), _lm_batch([4])]
    op = KFACOperator(model, CAUSAL_LM, batches, params="lm_head", fisher_type="mc")
    outs = [CAUSAL_LM.predict(model, b) for b in batches]
    logits, targets = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
    assert op.rows == [6, 3]
    ref = torch.autograd.grad(standard_loss("cross_entropy", logits, targets), [model.lm_head.weight])[0]
    _close(op.gradient(), ref.reshape(-1), 1e-12)


# --- KFAC-reduce -----------------------------------------------------------------------------------------------


class _Pooled(nn.Module):
    """x [B, T, d] -> a Linear at every position, summed over positions -> tanh -> head: the Linear's output
    gradient g is the same at every position, so an example's gradient sum_t g a_t^T = (sum_t g)(mean_t a)^T,
    the reduce factorisation (exact for one example)."""

    def __init__(self, d: int = 3, h: int = 4, c: int = 3):
        super().__init__()
        self.fc, self.head = nn.Linear(d, h), nn.Linear(h, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc(x).sum(1)))


class _PooledCNN(_CNN):
    def rest(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(z.sum((2, 3))))


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_reduce_exact_for_shared_weights(kind, loss):
    """One example, a layer applied at 5 positions then summed: KFAC-reduce is the exact GGN block; expand is not."""
    torch.manual_seed(3)
    model = _Pooled().double()
    x, y = torch.randn(1, 5, 3, generator=_gen(23), dtype=F64), _targets(loss, 1, 3)
    exact = _ggn(model, loss, x, y, ["fc.weight", "fc.bias"])
    reduce = KFACOperator(model, supervised(loss), (x, y), params="fc", kind=kind, kfac_approx="reduce")
    _close(_dense(reduce), exact, 1e-10)
    if kind == "kfac":
        expand = KFACOperator(model, supervised(loss), (x, y), params="fc")
        assert float((_dense(expand) - exact).abs().max()) > 1e-3 * float(exact.abs().max())


def test_reduce_exact_conv_pooled():
    """The same for a Conv2d whose feature map is summed over its 4 x 4 locations (averaged patches)."""
    torch.manual_seed(4)
    conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
    model = _PooledCNN(conv, spatial=7).double()
    model.head = nn.Linear(3, 3).double()
    x, y = torch.randn(1, 2, 7, 7, generator=_gen(24), dtype=F64), _targets("cross_entropy", 1, 3)
    op = KFACOperator(model, supervised(), (x, y), params="conv", kfac_approx="reduce")
    _close(_dense(op), _ggn(model, "cross_entropy", x, y, op.names), 1e-10)


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_reduce_equals_expand_with_one_position(kind):
    """An MLP and a conv with a 1 x 1 output (one position per example): expand == reduce, several examples."""
    model = _mlp([4, 5, 3])
    x, y = torch.randn(7, 4, generator=_gen(25), dtype=F64), _targets("cross_entropy", 7, 3)
    a = KFACOperator(model, supervised(), _split(torch.cat([x, x[:6]]), torch.cat([y, y[:6]])), kind=kind)
    b = KFACOperator(model, supervised(), _split(torch.cat([x, x[:6]]), torch.cat([y, y[:6]])), kind=kind,
                     kfac_approx="reduce")
    _close(_dense(a), _dense(b), 1e-14)
    torch.manual_seed(5)
    cnn = _CNN(nn.Conv2d(2, 3, 3), spatial=3).double()
    cx, cy = torch.randn(4, 2, 3, 3, generator=_gen(26), dtype=F64), _targets("cross_entropy", 4, 3)
    _close(_dense(KFACOperator(cnn, supervised(), (cx, cy), kind=kind)),
           _dense(KFACOperator(cnn, supervised(), (cx, cy), kind=kind, kfac_approx="reduce")), 1e-14)


def test_reduce_factors_causal_lm():
    """Llama's lm_head under reduce: A = mean over the 3 sequences of (mean over positions of h)(...)^T, G = the
    type-2 sum over classes of (sum over positions of g)(...)^T / 9 predicted tokens (g by brute force: the
    seed is the softmax curvature's square-root column on every predicted row)."""
    model = _llama()
    batches = [_lm_batch([5, 3]), _lm_batch([4])]
    op = KFACOperator(model, CAUSAL_LM, batches, params="lm_head", kfac_approx="reduce")
    hidden = [model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state.detach()
              for b in batches]
    means = torch.cat([h.mean(1) for h in hidden])
    _close(op.blocks[0].A, means.T @ means / 3, 1e-12)
    g_sum = torch.zeros(12, 12, dtype=F64)
    for b, h in zip(batches, hidden):
        keep = b["labels"][:, 1:] != -100
        p = torch.softmax(model.lm_head(h)[:, :-1][keep], 1).detach()
        for c in range(12):
            seed = p[:, c : c + 1].sqrt() * (torch.eye(12, dtype=F64)[c] - p)
            full = torch.zeros(*h.shape[:2], 12, dtype=F64)
            full[:, :-1][keep] = seed
            g = full.sum(1)  # the lm_head output gradient, summed over each sequence's positions
            g_sum += g.T @ g
    _close(op.blocks[0].G, g_sum / 9, 1e-12)


def test_reduce_bad_argument():
    model = _mlp([3, 2])
    data = (torch.randn(2, 3, dtype=F64), torch.tensor([0, 1]))
    with pytest.raises(ProbeError, match="kfac_approx"):
        KFACOperator(model, supervised(), data, kfac_approx="mean")
