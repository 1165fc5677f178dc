"""What makes curvature products and Lanczos cheap, checked against the plain computation: the scalar-output
vjp (bit-identical to torch.autograd.grad with grad_outputs, and no lazy sympy / torch._dynamo import on a
first product), and the Gram-matrix residual screen (never rejects a pair whose explicit residual passes)."""

import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from evaluations.digits import make_mlp
from evaluations.probes import curvature_operator, lanczos
from evaluations.probes.curvature import batched_vjp, vjp
from evaluations.probes.lanczos import _next_vector, _Subspace
from taxonomy.errors import ProbeError


def _mlp_gradient(seed: int):
    """A float64 MLP, its data, parameters and the loss gradient kept differentiable (for second-order vjps)."""
    model = make_mlp([5, 7, 3], seed=seed).double()
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,), generator=gen)
    params = list(model.parameters())
    return model, gen, x, params, torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)


def test_vjp_is_bit_identical_to_autograd_grad_with_grad_outputs():
    model, gen, x, params, g = _mlp_gradient(0)
    vs = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    ref = torch.autograd.grad(g, params, grad_outputs=vs, retain_graph=True)
    ours = vjp(g, params, vs, retain_graph=True)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))
    out = model(x)  # a first-order vjp with an unused input
    extra = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    cot = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    ref = torch.autograd.grad(out, [*params, extra], cot, retain_graph=True, allow_unused=True)
    ours = vjp([out], [*params, extra], [cot])
    assert ours[-1] is None and ref[-1] is None
    assert all(torch.equal(a, b) for a, b in zip(ours[:-1], ref[:-1]))
    assert vjp([torch.ones(3)], params, [torch.ones(3)]) == (None,) * len(params)  # nothing requires grad


def test_batched_vjp_is_bit_identical_to_autograd_grad_with_batched_grad_outputs():
    model, gen, x, params, g = _mlp_gradient(1)
    vs = [torch.randn(4, *p.shape, generator=gen, dtype=torch.float64) for p in params]
    ref = torch.autograd.grad(g, params, grad_outputs=vs, retain_graph=True, is_grads_batched=True)
    ours = batched_vjp(g, params, vs, retain_graph=True)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))
    out = model(x)
    extra = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    cot = torch.randn(3, *out.shape, generator=gen, dtype=torch.float64)
    ref = torch.autograd.grad(out, [*params, extra], cot, retain_graph=True, allow_unused=True, is_grads_batched=True)
    ours = batched_vjp([out], [*params, extra], [cot], retain_graph=True)
    assert ours[-1] is None and ref[-1] is None
    assert all(torch.equal(a, b) for a, b in zip(ours[:-1], ref[:-1]))
    with pytest.raises(ProbeError, match="cotangent of shape"):
        batched_vjp([out], params, [cot[:, :3]])


CHILD = """
import sys
import torch
from torch import nn
from evaluations.digits import make_mlp
from evaluations.objective import supervised
from evaluations.probes import KFACOperator, curvature_operator, hutchinson_trace, xtrace
model = make_mlp([4, 6, 3], seed=0)
x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
for name in ("hessian", "ggn", "fisher", "mc_fisher"):
    op = curvature_operator(name, model, nn.CrossEntropyLoss(), (x, y), batch_size=16)
    op.matvec(torch.ones(op.size)), op.gradient(), op.loss(), op.matmat(torch.ones(3, op.size)), op.dense()
    hutchinson_trace(op, max_samples=12), xtrace(op, matvecs=12)
kfac = KFACOperator(model, supervised(), [(x[:16], y[:16]), (x[16:], y[16:])])
kfac.matvec(torch.ones(kfac.size)), kfac.matmat(torch.ones(2, kfac.size)), kfac.gradient()
print(sorted(m for m in ("sympy", "torch._dynamo") if m in sys.modules))
"""


def test_first_products_and_gradients_import_neither_sympy_nor_dynamo():
    # torch imports sympy (1.5-2.5 s) for a tensor grad_outputs (batched ones too: matmat, dense(), Hutch++,
    # XTrace, KFAC's factor pass) and torch._dynamo inside torch.func.grad
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300, check=True)
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout + proc.stderr


def _subspace(a: torch.Tensor, m: int, restarts: tuple[int, ...], seed: int) -> _Subspace:
    """A Lanczos basis of `a` grown like `lanczos` does, with fresh random vectors at the steps in `restarts`."""
    n = len(a)
    gen = torch.Generator().manual_seed(seed)
    sub = _Subspace(n, 4)  # small capacity: growth is exercised too
    q = torch.randn(n, generator=gen, dtype=torch.float64)
    q = q / q.norm()
    for j in range(m):
        w = a @ q
        sub.add(q, w)
        q = _next_vector(sub, w, gen, j in restarts)
    return sub


@pytest.mark.parametrize("seed", range(4))
def test_residual_screen_never_rejects_an_explicit_pass(seed):
    gen = torch.Generator().manual_seed(seed)
    n = 60
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    ev = torch.cat([torch.tensor([9.0, 8.0, 8.0 + 1e-9, 3.0], dtype=torch.float64), torch.randn(n - 4, generator=gen)])
    a = u @ torch.diag(ev) @ u.T
    checked = rejected = 0
    for m, restarts, lo in ((12, (), 0), (30, (11,), 12), (58, (20, 40), 21), (60, (), 30)):
        sub = _subspace(a, m, restarts, seed)
        assert torch.allclose(sub.g[:m, :m], sub.w[:m] @ sub.w[:m].T, rtol=0, atol=1e-12)
        for deflate in (False, True):
            theta, s = sub.ritz(lo)
            for i in range(len(theta)):
                exact = sub.residuals(s[:, i : i + 1], theta[i : i + 1], lo, deflate)
                assert sub.screen(s[:, i : i + 1], theta[i : i + 1], exact, lo, deflate)  # an exact pass passes
                checked += 1
                if float(exact[0]) > 1e-3:  # and a bound well below the residual is rejected: not vacuous
                    rejected += not sub.screen(s[:, i : i + 1], theta[i : i + 1], exact / 2, lo, deflate)
    assert checked == 194 and rejected >= 100, rejected


def test_lanczos_on_an_operator_with_converged_pairs_matches_eigvalsh_and_reports_non_convergence():
    model = make_mlp([6, 10, 4], seed=3).double()
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(40, 6, generator=gen, dtype=torch.float64), torch.randint(0, 4, (40,), generator=gen)
    for name in ("hessian", "ggn"):
        op = curvature_operator(name, model, nn.CrossEntropyLoss(), (x, y))
        ev = torch.linalg.eigvalsh(op.dense()).flip(0)
        eig = lanczos(op, k=4, tol=1e-6)
        assert eig.converged and eig.extra["confirmation_steps"] > 0
        assert torch.allclose(torch.as_tensor(eig.values), ev[:4], rtol=1e-6, atol=0)
        for value, bound in zip(eig.values, eig.extra["error_bounds"]):
            assert bound <= 1e-6 * abs(float(value)) and float((ev - value).abs().min()) <= bound + 1e-12
        short = lanczos(op, k=4, tol=1e-6, max_iter=6)
        assert not short.converged and short.iterations == 6
