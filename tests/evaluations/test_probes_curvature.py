"""Curvature probes' guarantees against independent references: Lanczos' `converged` over 200 tiny models
(dense eigvalsh), Hessian-vector products through attention (central differences of the gradient), the
train-mode Hessian with BatchNorm batch statistics (an explicit functional forward), Hutch++'s standard error
(the exact trace)."""

import copy
import itertools
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, stack_module_state, vmap
from torch.nn import functional as F

from evaluations.digits import make_mlp
from evaluations.probes import HessianOperator, hutchinson_trace, lanczos
from taxonomy.errors import BasinError

TOL = 1e-3


def _dense_hessians(kind: str, seeds, widths: tuple[int, int], n: int) -> torch.Tensor:
    """[len(seeds), p, p] float64 Hessians of tiny MSE / CE MLPs by torch.func.hessian (vmapped over seeds)."""
    out = 1 if kind == "mse" else 3
    models = [make_mlp([*widths, out], seed=s).double() for s in seeds]
    params, _ = stack_module_state(models)
    names = list(params)
    shapes = [params[k].shape[1:] for k in names]
    flats = torch.cat([params[k].reshape(len(models), -1) for k in names], 1).detach()
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    xs = torch.stack([torch.randn(n, widths[0], generator=g, dtype=torch.float64) for g in gens])
    if kind == "mse":
        ys = torch.stack([torch.randn(n, 1, generator=g, dtype=torch.float64) for g in gens])
    else:
        ys = torch.stack([torch.randint(0, 3, (n,), generator=g) for g in gens])
    loss = F.mse_loss if kind == "mse" else F.cross_entropy

    def f(flat, x, y):
        parts = torch.split(flat, [s.numel() for s in shapes])
        return loss(functional_call(models[0], {k: p.reshape(s) for k, p, s in zip(names, parts, shapes)}, (x,)), y)

    return vmap(hessian(f))(flats, xs, ys)


def _check_converged(eig, ev_desc: torch.Tensor, tol: float, slack: float = 0.0) -> None:
    """What `converged` guarantees: each value within tol relative of the i-th largest eigenvalue, an eigenvalue
    within its error bound, and (interlacing) never above the i-th largest."""
    values = torch.from_numpy(eig.values)
    ref = ev_desc[: len(values)]
    assert bool(((values - ref).abs() <= tol * values.abs() + slack).all()), (values, ref)
    for value, bound in zip(eig.values, eig.extra["error_bounds"]):
        assert bound <= tol * abs(float(value))
        assert float((ev_desc - value).abs().min()) <= bound + 1e-12 + slack
    assert bool((values <= ref + 1e-10 + slack).all())


def test_lanczos_converged_is_right_on_200_tiny_mse_and_ce_models():
    # the issue: the default (gap-estimate) bound reported converged with a 5th eigenvalue 1.4-8.6% off on small
    # MSE MLPs; the residual bound alone (no confirmation run) still failed on 3 of 1,200 such runs (a missed
    # eigenvalue, up to 10% off); here every reported-converged value is checked against eigvalsh
    runs = converged = 0
    for kind in ("mse", "ce"):
        dense = _dense_hessians(kind, range(100), widths=(3, 4), n=16)
        for seed, h in enumerate(dense):
            ev = torch.linalg.eigvalsh(h).flip(0)
            k = 1 + seed % 5
            eig = lanczos(h, k=k, tol=TOL, seed=seed, start="random")
            runs += 1
            if eig.converged:
                converged += 1
                _check_converged(eig, ev, TOL)
    assert runs == 200 and converged >= 190


@pytest.mark.parametrize("kind,seed,k", [("ce", 17, 1), ("ce", 36, 1), ("mse", 19, 5), ("mse", 52, 5)])
def test_lanczos_issue_cases_through_hessian_vector_products(kind, seed, k):
    # float32 4-8-out MLPs, 32 points: the old default reported converged here with errors of 15%, 9%, 2%, 10%
    out = 1 if kind == "mse" else 3
    model = make_mlp([4, 8, out], seed=seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 4, generator=g)
    y = torch.randn(32, 1, generator=g) if kind == "mse" else torch.randint(0, 3, (32,), generator=g)
    loss = nn.MSELoss() if kind == "mse" else nn.CrossEntropyLoss()
    op = HessianOperator(model, loss, (x, y))
    ref = HessianOperator(copy.deepcopy(model).double(), loss, (x.double(), y.double() if kind == "mse" else y))
    ev = torch.linalg.eigvalsh(ref.dense()).flip(0)
    eig = lanczos(op, k=k, tol=TOL)
    assert eig.converged and eig.extra["mode"] == "eval" and eig.to_json()["mode"] == "eval"
    _check_converged(eig, ev, TOL, slack=1e-5)  # float32 products


def test_lanczos_finds_both_copies_of_a_double_eigenvalue():
    # one Krylov sequence sees a single copy of a repeated eigenvalue: the residual bound alone would report
    # (5, 3) as the top 2 with tiny residuals; the confirmation run from a random vector finds the second 5
    n = 40
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    ev = torch.cat([torch.tensor([5.0, 5.0, 3.0], dtype=torch.float64), torch.linspace(-1, 1, n - 3).double()])
    a = q @ torch.diag(ev) @ q.T
    for start in range(3):
        eig = lanczos(a, k=2, tol=1e-6, seed=start)
        assert eig.converged and eig.extra["confirmation_steps"] > 0
        assert np.allclose(eig.values, [5.0, 5.0], atol=1e-5)
    smallest = lanczos(a, k=3, tol=1e-6, which="SA")
    assert smallest.converged and np.allclose(smallest.values, ev.sort().values[:3].numpy(), atol=1e-5)


def _finite_difference_hessian(op: HessianOperator, h: float = 1e-5) -> torch.Tensor:
    """Central differences of the gradient (single backward passes only, any attention kernel): [p, p]."""
    w = op.flat_params()
    cols = []
    for j in range(op.size):
        e = torch.zeros_like(w)
        e[j] = h
        cols.append((_gradient_at(op, w + e) - _gradient_at(op, w - e)) / (2 * h))
    fd = torch.stack(cols, 1)
    return (fd + fd.T) / 2


def _gradient_at(op: HessianOperator, flat: torch.Tensor) -> torch.Tensor:
    p = {n: t.detach().requires_grad_(True) for n, t in op.unflatten(flat).items()}
    op.model.eval()
    loss = op.loss_fn(functional_call(op.model, {**op.fixed, **p}, (op.batches[0][0],)), op.batches[0][1])
    return op.flatten(dict(zip(p, torch.autograd.grad(loss, list(p.values())))))


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.layer(x).mean(1))


def _hf_model(kind: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "bert":
        cfg = transformers.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=16, max_position_embeddings=16, num_labels=3,
                                      attn_implementation="sdpa")
        model = transformers.BertForSequenceClassification(cfg)
        params = "classifier"
    else:
        cfg = transformers.LlamaConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                       num_key_value_heads=2, intermediate_size=16, max_position_embeddings=16,
                                       num_labels=3, attn_implementation="sdpa", pad_token_id=0)
        model = transformers.LlamaForSequenceClassification(cfg)
        params = "score"
    return model.double(), params


@pytest.mark.parametrize("kind", ["encoder", "bert", "llama"])
@pytest.mark.parametrize("method", ["double_backward", "forward_over_reverse"])
def test_hessian_vector_products_through_attention(kind, method):
    # the fused CPU attention kernel has no double backward: HVPs crashed on nn.TransformerEncoderLayer
    gen = torch.Generator().manual_seed(1)
    if kind == "encoder":
        torch.manual_seed(0)
        model, params = _Encoder().double(), ["layer.self_attn.out_proj.bias", "layer.self_attn.in_proj_bias"]
        x = torch.randn(4, 5, 8, generator=gen, dtype=torch.float64)
        loss_fn = nn.CrossEntropyLoss()
    else:
        model, params = _hf_model(kind)
        x = torch.randint(1, 20, (4, 6), generator=gen)

        def loss_fn(out, y):
            return F.cross_entropy(out.logits, y)

    y = torch.randint(0, 3, (4,), generator=gen)
    op = HessianOperator(model, loss_fn, (x, y), params=params, method=method)
    assert 10 <= op.size <= 60
    dense = op.dense()
    ref = _finite_difference_hessian(op)
    assert torch.allclose(dense, ref, atol=1e-6 * float(ref.abs().max()))
    assert float(ref.abs().max()) > 1e-4  # a non-trivial block
    if kind == "encoder":  # attention's own weights too (the part that needs attention's double backward)
        full = HessianOperator(model, loss_fn, (x, y), params="layer.self_attn", method=method)
        v = torch.randn(full.size, generator=gen, dtype=torch.float64)
        fd = (_gradient_at(full, full.flat_params() + 1e-5 * v) - _gradient_at(full, full.flat_params() - 1e-5 * v))
        assert torch.allclose(full.matvec(v), fd / 2e-5, atol=1e-6 * float(fd.abs().max() / 2e-5))


def test_forward_over_reverse_falls_back_where_torch_has_no_rule():
    # torch's forward-mode rule for F.mse_loss's backward fails (ZeroTensors are immutable): the operator warns
    # and takes the same Hessian by double backward
    model = make_mlp([3, 4, 2], seed=0).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    ref = HessianOperator(model, F.mse_loss, (x, y)).dense()
    op = HessianOperator(model, F.mse_loss, (x, y), method="forward_over_reverse")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dense = op.dense()
    assert any("forward_over_reverse failed" in str(w.message) for w in caught)
    assert op.method == "double_backward" and torch.allclose(dense, ref, atol=1e-12)


class _BNNet(nn.Module):
    def __init__(self, conv: bool):
        super().__init__()
        self.conv = conv
        if conv:
            self.body = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Dropout(0.5), nn.Flatten())
            self.head = nn.Linear(2 * 3 * 3, 3)
        else:
            self.body = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Dropout(0.5))
            self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.body(x))


def _explicit_loss(net: _BNNet, flat: torch.Tensor, x, y, batch_stats: bool) -> torch.Tensor:
    """The network written out with F.* (no module, no mode): BatchNorm with the batch's statistics (biased
    variance) or the running ones; dropout off."""
    shapes = [p.shape for p in net.parameters()]
    w1, b1, g, beta, w2, b2 = (t.reshape(s) for t, s in zip(torch.split(flat, [s.numel() for s in shapes]), shapes))
    h = F.conv2d(x, w1, b1) if net.conv else F.linear(x, w1, b1)
    bn = net.body[1]
    if batch_stats:
        dims = [0, 2, 3] if net.conv else [0]
        mean, var = h.mean(dims, keepdim=True), h.var(dims, unbiased=False, keepdim=True)
    else:
        shape = (1, -1, 1, 1) if net.conv else (1, -1)
        mean, var = bn.running_mean.reshape(shape), bn.running_var.reshape(shape)
    scale_shape = (1, -1, 1, 1) if net.conv else (1, -1)
    h = (h - mean) / torch.sqrt(var + bn.eps) * g.reshape(scale_shape) + beta.reshape(scale_shape)
    return F.cross_entropy(F.linear(torch.relu(h).flatten(1), w2, b2), y)


@pytest.mark.parametrize("conv", [False, True])
def test_train_mode_hessian_uses_batch_statistics_and_leaves_running_stats(conv):
    torch.manual_seed(0)
    net = _BNNet(conv).double()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 1, 5, 5, generator=gen, dtype=torch.float64) if conv else torch.randn(8, 4, generator=gen,
                                                                                              dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=gen)
    net.train()
    with torch.no_grad():
        net(x + 1.0)  # running statistics away from the batch's
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    want = {m: torch.autograd.functional.hessian(lambda w, m=m: _explicit_loss(net, w, x, y, m == "train"), flat,
                                                 vectorize=True) for m in ("train", "eval")}
    for mode, method in itertools.product(("train", "eval"), ("double_backward", "forward_over_reverse")):
        op = HessianOperator(net, nn.CrossEntropyLoss(), (x, y), method=method, mode=mode)
        assert torch.allclose(op.dense(), want[mode], atol=1e-10), (mode, method)
        eig = lanczos(op, k=1, tol=1e-6)
        assert eig.extra["mode"] == mode and hutchinson_trace(op, max_samples=12).mode == mode
        assert abs(op.loss() - float(_explicit_loss(net, flat, x, y, mode == "train"))) < 1e-12
    assert not torch.allclose(want["train"], want["eval"], atol=1e-6)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats and num_batches_tracked
    assert net.training and all(m.training for m in net.modules())  # every module's own mode restored
    assert all(m.track_running_stats for m in net.modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d))
    with pytest.raises(BasinError, match="mode"):
        HessianOperator(net, nn.CrossEntropyLoss(), (x, y), mode="double_backward")


def test_hutchinson_defaults_meet_their_stated_stderr_and_cover_the_exact_trace():
    # defaults: Hutch++ with a rank-10 sketch, then Hutchinson samples until stderr <= 5% of the estimate
    # (at least 10); the old defaults (1% relative) ran to their 1,000-sample cap
    covered, products = 0, []
    dense = [h for kind in ("mse", "ce") for h in _dense_hessians(kind, range(20), widths=(4, 8), n=32)]
    for seed, h in enumerate(dense):
        est = hutchinson_trace(h, seed=seed)
        exact = float(h.trace())
        assert est.converged and est.stderr <= 0.05 * abs(est.mean) and est.samples >= 10 and est.sketch == 10
        assert est.products == 20 + est.samples and est.products <= 250
        covered += abs(est.mean - exact) <= 1.96 * est.stderr
        products.append(est.products)
    assert covered >= 34  # of 40: the 95% interval, with binomial slack
    # plain Hutchinson (sketch=0) on the identity is exact; Hutch++ spends fewer products at the same target
    eye = hutchinson_trace(torch.eye(10, dtype=torch.float64), min_samples=5, sketch=0)
    assert eye.mean == 10.0 and eye.stderr == 0.0 and eye.converged and eye.products == 5
    plain = [hutchinson_trace(h, seed=s, sketch=0).products for s, h in enumerate(dense)]
    assert sum(products) < 0.5 * sum(plain)
