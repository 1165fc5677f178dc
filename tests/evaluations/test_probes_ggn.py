"""Issue 21: GGN, empirical and Monte-Carlo Fisher operators on the shared batch loop, the diagonal estimators,
block-diagonal curvature, Hutch++ vs Hutchinson.

References (float64): the GGN from an explicit Jacobian (torch.func.jacrev) and the loss's explicit output
Hessian (torch.func.hessian); the empirical Fisher from explicit per-row gradients (a loop of autograd.grad);
the Hessian from torch.func.hessian; eigenvalues from eigvalsh of the dense matrix."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev
from torch.nn import functional as F

from evaluations.model_losses import CAUSAL_LM, next_token_logits
from evaluations.objective import supervised
from evaluations.probes import (
    BlockDiagonal,
    DenseOperator,
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    MonteCarloFisherOperator,
    curvature_operator,
    diagonal,
    hutchinson_diagonal,
    hutchinson_trace,
    lanczos,
    spectral_density,
)
from evaluations.probes.attention import math_attention
from taxonomy.errors import BasinError, ProbeError


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(20, 5, dtype=torch.float64)
    return model, x, torch.randint(0, 3, (20,))


def _cnn_bn():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3))
    model = model.double()
    with torch.no_grad():  # non-trivial running statistics, so eval mode differs from batch statistics
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(8, 1, 5, 5, dtype=torch.float64)
    return model.eval(), x, torch.randint(0, 3, (8,))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(2)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=7, n_embd=8, n_layer=1, n_head=2, n_positions=16)).double().eval()
    ids = torch.randint(0, 7, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # a padded tail: its positions are not predicted
    labels = ids.masked_fill(mask == 0, -100)
    return model, {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _reference(model, f, targets, params, kind):
    """(dense GGN, dense empirical Fisher, dense Hessian) from an explicit Jacobian, output Hessian, per-row grads."""
    loss = (lambda o, t: F.cross_entropy(o, t)) if kind == "cross_entropy" else (lambda o, t: F.mse_loss(o, t))
    names = list(params)
    out = f(params).detach()
    jac = jacrev(f)(params)
    jmat = torch.cat([jac[n].reshape(out.numel(), -1) for n in names], 1)
    h_out = hessian(lambda o: loss(o, targets))(out).reshape(out.numel(), out.numel())
    ggn = jmat.T @ h_out @ jmat
    rows = []
    for r in range(out.shape[0]):
        leaves = {n: t.clone().requires_grad_(True) for n, t in params.items()}
        o = f(leaves)[r : r + 1]
        t = targets[r : r + 1]
        lr = F.cross_entropy(o, t) if kind == "cross_entropy" else ((o - t) ** 2).sum()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(lr, list(leaves.values()))]))
    grads = torch.stack(rows)
    fisher = grads.T @ grads / (out.shape[0] if kind == "cross_entropy" else out.numel())
    hess = hessian(lambda p: loss(f(p), targets))(params)
    dense_h = torch.cat([torch.cat([hess[a][b].reshape(params[a].numel(), params[b].numel()) for b in names], 1)
                         for a in names])
    return ggn, fisher, dense_h


@functools.cache
def _xy_case(build, kind):
    """(model, data, (GGN, empirical Fisher, Hessian)) -- cached: the models are never changed by the tests."""
    model, x, y = build()
    if kind == "mse":
        y = torch.randn(len(x), 3, dtype=torch.float64)
    params = {n: p.detach() for n, p in model.named_parameters()}
    state = {**params, **{n: b for n, b in model.named_buffers()}}
    f = lambda p: functional_call(model, {**state, **p}, (x,))  # noqa: E731
    return model, (x, y), _reference(model, f, y, params, kind)


@pytest.mark.parametrize("build,kind", [(_mlp, "cross_entropy"), (_mlp, "mse"), (_cnn_bn, "cross_entropy")],
                         ids=["mlp-ce", "mlp-mse", "cnn_bn-ce"])
@pytest.mark.parametrize("batch_size", [None, 3])
def test_operators_equal_dense_definitions_xy(build, kind, batch_size):
    model, data, (ggn, fisher, hess) = _xy_case(build, kind)
    loss = nn.CrossEntropyLoss() if kind == "cross_entropy" else nn.MSELoss()
    for cls, ref in ((GGNOperator, ggn), (EmpiricalFisherOperator, fisher)):
        for form in (loss, supervised(kind)):  # the legacy loss_fn and the Objective form: the same operator
            op = cls(model, form, data, batch_size=batch_size)
            dense = op.dense()
            torch.testing.assert_close(dense, ref, atol=1e-12, rtol=1e-10)
            torch.testing.assert_close(op.exact_diagonal(), ref.diagonal(), atol=1e-12, rtol=1e-10)
            v = torch.randn(op.size, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
            torch.testing.assert_close(op.matvec(v), ref @ v, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(HessianOperator(model, supervised(kind), data, batch_size=batch_size).dense(), hess,
                               atol=1e-12, rtol=1e-10)
    assert torch.linalg.eigvalsh(ggn).min() > -1e-12  # the GGN is positive semi-definite; the Hessian need not be


def test_operators_equal_dense_definitions_gpt2_objective():
    """LayerNorm + attention, token batches with padding, a parameter subset, the causal-LM Objective."""
    model, batch = _gpt2()
    sel = r"transformer\.h\.0\.(ln_1|attn\.c_proj)"
    op = GGNOperator(model, CAUSAL_LM, [batch], params=sel)
    assert op.names == [f"transformer.h.0.{m}.{p}" for m in ("ln_1", "attn.c_proj") for p in ("weight", "bias")]
    assert op.rows == [6 - 1 + 4 - 1]  # predicted tokens: 5 in the full row, 3 before the padding
    state = {**{n: p.detach() for n, p in model.named_parameters()}, **dict(model.named_buffers())}
    params = {n: state[n] for n in op.names}
    keep = batch["labels"][:, 1:] != -100

    def f(p):
        logits = functional_call(model, {**state, **p}, (), {"input_ids": batch["input_ids"],
                                                             "attention_mask": batch["attention_mask"]}).logits
        return logits[:, :-1][keep]

    with math_attention():
        ggn, fisher, hess = _reference(model, f, batch["labels"][:, 1:][keep], params, "cross_entropy")
    torch.testing.assert_close(op.dense(), ggn, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(op.exact_diagonal(), ggn.diagonal(), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(EmpiricalFisherOperator(model, CAUSAL_LM, [batch], params=sel).dense(), fisher,
                               atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(HessianOperator(model, CAUSAL_LM, [batch], params=sel).dense(), hess, atol=1e-12,
                               rtol=1e-10)
    outputs, _ = next_token_logits(model, batch)
    assert outputs.shape == (8, 7)


def test_two_batches_are_row_weighted():
    """Two token batches of different row counts: the operator is the curvature of the row-weighted mean loss."""
    model, batch = _gpt2()
    halves = [{k: v[i : i + 1] for k, v in batch.items()} for i in (0, 1)]
    sel = r"transformer\.h\.0\.attn\.c_proj"
    whole = GGNOperator(model, CAUSAL_LM, [batch], params=sel).dense()
    split = GGNOperator(model, CAUSAL_LM, halves, params=sel)
    assert split.rows == [5, 3] and split.weights == [5 / 8, 3 / 8]
    torch.testing.assert_close(split.dense(), whole, atol=1e-12, rtol=1e-10)


def test_mc_fisher_expectation_is_the_ggn():
    model, data, (ggn, _, _) = _xy_case(_mlp, "cross_entropy")
    errors = {}
    for samples in (4, 1024):
        dense = MonteCarloFisherOperator(model, nn.CrossEntropyLoss(), data, samples=samples, seed=0).dense()
        errors[samples] = float((dense - ggn).norm() / ggn.norm())
        torch.testing.assert_close(dense, dense.T, atol=1e-14, rtol=0)
    assert errors[1024] < 0.03 and errors[1024] < errors[4] / 4, errors
    model, data, (ggn_mse, _, _) = _xy_case(_mlp, "mse")
    dense = MonteCarloFisherOperator(model, nn.MSELoss(), data, samples=1024, seed=1).dense()
    assert float((dense - ggn_mse).norm() / ggn_mse.norm()) < 0.05
    a = MonteCarloFisherOperator(model, nn.MSELoss(), data, samples=2, seed=5)
    b = MonteCarloFisherOperator(model, nn.MSELoss(), data, samples=2, seed=5)
    c = MonteCarloFisherOperator(model, nn.MSELoss(), data, samples=2, seed=6)
    v = torch.randn(a.size, dtype=torch.float64)
    assert torch.equal(a.matvec(v), b.matvec(v)) and not torch.equal(a.matvec(v), c.matvec(v))
    torch.testing.assert_close(a.exact_diagonal(), a.dense().diagonal(), atol=1e-13, rtol=1e-10)


def test_hutchinson_diagonal_matches_the_dense_diagonal_within_its_stderr():
    model, data, (ggn, _, _) = _xy_case(_mlp, "cross_entropy")
    op = GGNOperator(model, nn.CrossEntropyLoss(), data)
    est = hutchinson_diagonal(op, rtol=0.1, max_samples=2000, seed=0)
    assert est.converged and est.error <= 0.1 and est.iterations == est.samples
    values, stderr = torch.from_numpy(est.values), torch.from_numpy(est.stderr)
    z = (values - ggn.diagonal()).abs() / stderr.clamp_min(1e-30)
    assert float((z < 4).double().mean()) >= 0.97
    assert float((values - ggn.diagonal()).norm() / ggn.diagonal().norm()) < 3 * est.error
    exact = diagonal(op)  # auto: the exact diagonal, cheap here (20 rows x 3 classes vjps)
    assert exact.method == "exact" and exact.converged and exact.iterations == 60
    torch.testing.assert_close(torch.from_numpy(exact.values), ggn.diagonal(), atol=1e-12, rtol=1e-10)
    assert diagonal(HessianOperator(model, nn.CrossEntropyLoss(), data), max_samples=20).method == "hutchinson"
    with pytest.raises(ProbeError, match="no exact diagonal"):
        diagonal(HessianOperator(model, nn.CrossEntropyLoss(), data), method="exact")
    with pytest.raises(ProbeError, match="max_vjps"):
        op.exact_diagonal(max_vjps=10)
    assert set(exact.to_json()) >= {"values", "converged", "iterations", "error"}


def test_hutchpp_has_lower_variance_than_hutchinson_at_equal_products():
    """On the MLP's GGN (as a dense matrix: the estimators are under test, 2,400 products in all)."""
    _, _, (ggn, _, _) = _xy_case(_mlp, "cross_entropy")
    op = DenseOperator(ggn)
    exact = float(ggn.trace())
    plain = [hutchinson_trace(op, sketch=0, min_samples=40, max_samples=40, seed=s) for s in range(30)]
    plus = [hutchinson_trace(op, sketch=10, min_samples=20, max_samples=20, seed=s) for s in range(30)]
    assert all(e.products == 40 for e in plain + plus)
    mse = lambda es: sum((e.mean - exact) ** 2 for e in es) / len(es)  # noqa: E731
    assert mse(plus) < mse(plain) / 10, (mse(plus), mse(plain))


def test_estimators_take_every_operator():
    model, data, (ggn, fisher, _) = _xy_case(_mlp, "cross_entropy")
    for op, ref in ((GGNOperator(model, nn.CrossEntropyLoss(), data), ggn),
                    (EmpiricalFisherOperator(model, nn.CrossEntropyLoss(), data), fisher)):
        eig = lanczos(op, k=3, tol=1e-8)
        torch.testing.assert_close(torch.from_numpy(eig.values), torch.linalg.eigvalsh(ref).flip(0)[:3], atol=1e-9,
                                   rtol=1e-7)
        assert eig.converged and eig.to_json()["iterations"] == eig.iterations
        dens = spectral_density(op, steps=20, runs=2)
        assert abs(dens.moment(1) * op.size - float(ref.trace())) < 0.5 * float(ref.trace())
        from scipy.sparse.linalg import eigsh

        top = eigsh(op.to_scipy(), k=1, which="LA", return_eigenvectors=False)
        assert abs(top[0] - float(torch.linalg.eigvalsh(ref)[-1])) < 1e-9


def test_block_diagonal_zeroes_cross_layer_blocks():
    model, data, (ggn, _, hess) = _xy_case(_mlp, "cross_entropy")
    op = GGNOperator(model, nn.CrossEntropyLoss(), data)
    blocks = BlockDiagonal(op)
    assert list(blocks.blocks) == ["0", "2"]
    n0 = 5 * 6 + 6
    mask = torch.zeros_like(ggn, dtype=torch.bool)
    mask[:n0, :n0] = mask[n0:, n0:] = True
    torch.testing.assert_close(blocks.matmat(torch.eye(op.size, dtype=torch.float64)), ggn * mask, atol=1e-12,
                               rtol=1e-10)
    weights = BlockDiagonal(HessianOperator(model, nn.CrossEntropyLoss(), data),
                            groups=[["0.weight", "2.weight"], ["0.bias"], ["2.bias"]])
    assert len(weights.blocks) == 3 and callable(weights.gradient)
    eig = lanczos(blocks, k=1, tol=1e-8)
    top = max(float(torch.linalg.eigvalsh(ggn[:n0, :n0])[-1]), float(torch.linalg.eigvalsh(ggn[n0:, n0:])[-1]))
    assert abs(float(eig.values[0]) - top) < 1e-8 * top
    with pytest.raises(ProbeError, match="partition"):
        BlockDiagonal(op, groups=[["0.weight"]])


def test_params_subset_is_the_sub_block():
    model, data, (ggn, _, _) = _xy_case(_mlp, "cross_entropy")
    sub = GGNOperator(model, nn.CrossEntropyLoss(), data, params="2")
    n0 = 5 * 6 + 6
    torch.testing.assert_close(sub.dense(), ggn[n0:, n0:], atol=1e-12, rtol=1e-10)


def test_bad_input_is_one_clear_error():
    model, data, _ = _xy_case(_mlp, "cross_entropy")
    with pytest.raises(ProbeError, match="params: 'encoder' selects no trainable parameter"):
        GGNOperator(model, nn.CrossEntropyLoss(), data, params="encoder")
    custom = lambda out, y: (out.logsumexp(1) - out[range(len(y)), y]).mean()  # noqa: E731
    for cls in (GGNOperator, EmpiricalFisherOperator, MonteCarloFisherOperator):
        with pytest.raises(BasinError, match=r"needs a likelihood loss .*loss <lambda>"):
            cls(model, custom, data)
    with pytest.raises(ProbeError, match="needs a likelihood"):
        GGNOperator(model, nn.CrossEntropyLoss(label_smoothing=0.1), data)
    HessianOperator(model, custom, data)  # the Hessian needs no likelihood
    x, y = data
    with pytest.raises(ProbeError, match="class indices"):
        GGNOperator(model, nn.CrossEntropyLoss(), (x, y.masked_fill(y == 0, -100))).matvec(torch.zeros(57).double())
    with pytest.raises(ProbeError, match="samples"):
        MonteCarloFisherOperator(model, nn.CrossEntropyLoss(), data, samples=0)


def test_products_are_deterministic_and_matmat_matches_matvec():
    model, data, _ = _xy_case(_cnn_bn, "cross_entropy")
    for cls in (GGNOperator, EmpiricalFisherOperator, MonteCarloFisherOperator):
        op = cls(model, nn.CrossEntropyLoss(), data, batch_size=3)
        vs = torch.randn(4, op.size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        first = op.matmat(vs)
        assert torch.equal(first, op.matmat(vs))
        torch.testing.assert_close(first, torch.stack([op.matvec(v) for v in vs]), atol=1e-13, rtol=1e-11)
        assert op.n_products == 3 * 4


@pytest.mark.parametrize("name", ["ggn", "fisher", "mc_fisher"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_output_hessian_product_chunked_over_rows(monkeypatch, name, loss):
    """A tiny CHUNK_ELEMENTS (3 rows of 7 outputs per chunk, 4 chunks for 10 rows): the same products (matvec and
    matmat) as one chunk, each chunk's part computed on its rows only."""
    from evaluations.probes import ggn as ggn_module

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 7)).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(10, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 7, (10,), generator=gen) if loss == "cross_entropy" else torch.randn(10, 7, generator=gen,
                                                                                            dtype=torch.float64)
    fn = nn.CrossEntropyLoss() if loss == "cross_entropy" else nn.MSELoss()
    vs = torch.randn(3, sum(p.numel() for p in model.parameters()), generator=gen, dtype=torch.float64)
    whole = curvature_operator(name, model, fn, (x, y))
    expected = whole.matmat(vs), whole.matvec(vs[0])
    calls = []
    real = ggn_module.by_rows

    def spy(u, rows, part):
        calls.append(rows)
        return real(u, rows, lambda r: (calls.append(r), part(r))[1])

    monkeypatch.setattr(ggn_module, "CHUNK_ELEMENTS", 21)
    monkeypatch.setattr(ggn_module, "by_rows", spy)
    chunked = curvature_operator(name, model, fn, (x, y))
    torch.testing.assert_close(chunked.matvec(vs[0]), expected[1], rtol=1e-14, atol=1e-16)
    torch.testing.assert_close(chunked.matmat(vs), expected[0], rtol=1e-14, atol=1e-16)
    if name == "ggn" and loss == "mse":  # M = 2 I / (rows C): scaled in place, no temporary at all
        assert calls == []
        return
    slices = [c for c in calls if isinstance(c, slice)]
    assert slices[:4] == [slice(lo, lo + 3) for lo in (0, 3, 6, 9)]  # matvec: 3 rows x 7 outputs a chunk
    assert slices[4:] == [slice(lo, lo + 1) for lo in range(10)]  # matmat, 3 vectors: 1 row a chunk
