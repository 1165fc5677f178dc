"""KFAC / EKFAC operators against independent references (float64 throughout).

References: the dense GGN J^T H J (torch.func.jacrev for J, torch.func.hessian of the loss in the outputs for
H) where the Kronecker factorisation is exact; for a CNN the factors rebuilt by brute force (every receptive
field sliced out of the padded input by hand, output gradients from the Jacobian of the rest of the network);
EKFAC as the diagonal of the exact GGN in the KFAC eigenbasis (George et al. 2018, eq. 9, with one output row
per example); dense slogdet / trace / inverse / eigvalsh of the operator's own matrix."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.sparse.linalg import eigsh
from torch import nn
from torch.func import functional_call, hessian, jacrev

from evaluations.model_losses import CAUSAL_LM
from evaluations.objective import standard_loss, supervised
from evaluations.probes import lanczos
from evaluations.probes.kfac import KFACInverse, KFACOperator, _squared_projections
from taxonomy.errors import DataError, ProbeError

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mlp(sizes: list[int], seed: int = 0, bias: bool = True) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b, bias=bias)] + ([nn.Tanh()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers).double()


def _targets(loss: str, n: int, k: int, seed: int = 5) -> torch.Tensor:
    if loss == "cross_entropy":
        return torch.randint(0, k, (n,), generator=_gen(seed))
    return torch.randn(n, k, generator=_gen(seed), dtype=F64)


def _dense(op) -> torch.Tensor:
    return op.matmat(torch.eye(op.shape[0], dtype=F64)).T


def _ggn(model: nn.Module, loss: str, x: torch.Tensor, y: torch.Tensor, names: list[str], kind: str = "ggn"):
    """Dense J^T H J of the mean loss (kind="ggn"), or J^T g g^T J with g its gradient in the outputs
    (kind="empirical", one example)."""
    fixed = {n: p.detach() for n, p in model.named_parameters()}
    sel = {n: fixed[n] for n in names}
    out = functional_call(model, fixed, (x,))
    jac = jacrev(lambda p: functional_call(model, {**fixed, **p}, (x,)))(sel)
    j = torch.cat([jac[n].reshape(out.numel(), -1) for n in names], 1)
    loss_of = lambda o: standard_loss(loss, o.reshape(out.shape), y)  # noqa: E731
    if kind == "empirical":
        g = torch.func.grad(loss_of)(out.reshape(-1))
        return j.T @ torch.outer(g, g) @ j
    return j.T @ hessian(loss_of)(out.reshape(-1)) @ j


def _blocks(op: KFACOperator, matrix: torch.Tensor) -> torch.Tensor:
    """`matrix` with every entry outside the operator's per-layer diagonal blocks set to 0."""
    mask = torch.zeros_like(matrix, dtype=torch.bool)
    for block in op.blocks:
        idx = torch.cat([torch.arange(p.offset, p.offset + p.numel) for p in block.layer.pieces])
        mask[idx[:, None], idx[None, :]] = True
    return torch.where(mask, matrix, torch.zeros_like(matrix))


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-10) -> None:
    a, b = a.detach(), b.detach()
    scale = max(float(b.abs().max()), 1e-300)
    assert float((a - b).abs().max()) <= rtol * scale, float((a - b).abs().max()) / scale


# --- exactness where the Kronecker factorisation is exact ------------------------------------------------------


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_one_example_equals_exact_ggn_blocks(kind, loss):
    """One example: every layer's block of a 3-layer MLP is exactly (sum_c g_c g_c^T) (x) a a^T."""
    model = _mlp([4, 5, 3, 3])
    x, y = torch.randn(1, 4, generator=_gen(1), dtype=F64), _targets(loss, 1, 3)
    op = KFACOperator(model, supervised(loss), (x, y), kind=kind)
    assert op.size == sum(p.numel() for p in model.parameters()) and len(op.blocks) == 3
    _close(_dense(op), _blocks(op, _ggn(model, loss, x, y, op.names)))


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_linear_mse_batch_is_exact(kind):
    """One linear layer with mse: the output Hessian (2/k) I is the same for every row, so G (x) A is exact for
    any batch (and several batches: row-weighted)."""
    model = _mlp([5, 4])
    x, y = torch.randn(9, 5, generator=_gen(2), dtype=F64), _targets("mse", 9, 4)
    op = KFACOperator(model, supervised("mse"), [(x[:4], y[:4]), (x[4:], y[4:])], kind=kind)
    dense = _ggn(model, "mse", x, y, op.names)
    _close(_dense(op), dense)
    g = op.blocks[0].G
    _close(g, torch.eye(4, dtype=F64) * 2 / 4)  # the factor itself: (1/R) sum_rows (2/k) I


def test_linear_ce_constant_input_outer_product_is_exact():
    """Cross-entropy on one bias-free linear layer, inputs +-x (a a^T the same for every row): exact."""
    model = _mlp([4, 3], bias=False)
    base = torch.randn(1, 4, generator=_gen(3), dtype=F64)
    x = torch.cat([base, -base, base, -2 * base / 2])
    y = _targets("cross_entropy", 4, 3)
    for kind in ("kfac", "ekfac"):
        op = KFACOperator(model, supervised(), (x, y), kind=kind)
        _close(_dense(op), _ggn(model, "cross_entropy", x, y, op.names))


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_empirical_one_example_equals_gradient_outer_product(loss):
    """The empirical Fisher of the row's own loss (mse: |f - y|^2 / k, gradient (2/k)(f - y))."""
    model = _mlp([3, 4, 2])
    x, y = torch.randn(1, 3, generator=_gen(4), dtype=F64), _targets(loss, 1, 2)
    op = KFACOperator(model, supervised(loss), (x, y), fisher_type="empirical")
    _close(_dense(op), _blocks(op, _ggn(model, loss, x, y, op.names, kind="empirical")))


def test_selection_sub_blocks():
    """Weight only / bias only of a layer: the corresponding sub-blocks of the full KFAC block."""
    model = _mlp([4, 5, 3])
    x, y = torch.randn(6, 4, generator=_gen(6), dtype=F64), _targets("cross_entropy", 6, 3)
    full = KFACOperator(model, supervised(), (x, y))
    dense = _dense(full)
    for params, names in [("0.weight", ["0.weight"]), (r".*\.bias", ["0.bias", "2.bias"]), (model[2], ["2.weight",
                                                                                                         "2.bias"])]:
        op = KFACOperator(model, supervised(), (x, y), params=params)
        assert op.names == names
        idx = torch.cat([torch.arange(b.offset, b.offset + b.numel) for blk in full.blocks for b in blk.layer.pieces
                         if b.name in names])
        _close(_dense(op), dense[idx[:, None], idx[None, :]])


# --- EKFAC: the diagonal of the exact GGN in the Kronecker eigenbasis --------------------------------------------


def _eigenbasis(block) -> torch.Tensor:
    """The block's Kronecker eigenvectors Q_G (x) Q_A as columns, rows moved from row-major vec([W | b]) to the
    block's flat parameter order (weight row-major, then bias)."""
    _, qg, _, qa = block.eigen()
    q = torch.kron(qg, qa)
    out, cols = block.layer.out, block.layer.cols
    flat = torch.zeros_like(q)
    first_col, local = 0, 0
    for p in block.layer.pieces:
        for o in range(out):
            for j in range(p.cols):
                flat[local + o * p.cols + j] = q[o * cols + first_col + j]
        first_col, local = first_col + p.cols, local + p.numel
    return flat


def test_ekfac_is_exact_diagonal_in_kfac_eigenbasis():
    model = _mlp([4, 6, 3])
    x, y = torch.randn(10, 4, generator=_gen(7), dtype=F64), _targets("cross_entropy", 10, 3)
    op = KFACOperator(model, supervised(), (x, y), kind="ekfac")
    kfac = KFACOperator(model, supervised(), (x, y), kind="kfac")
    dense = _ggn(model, "cross_entropy", x, y, op.names)
    for block, kblock in zip(op.blocks, kfac.blocks):
        _close(block.A, kblock.A, 1e-14)
        _close(block.G, kblock.G, 1e-14)
        idx = torch.cat([torch.arange(p.offset, p.offset + p.numel) for p in block.layer.pieces])
        q = _eigenbasis(block)
        d = torch.diagonal(q.T @ dense[idx[:, None], idx[None, :]] @ q)
        _close(block.refit.reshape(-1), d)
        _close(_dense(op)[idx[:, None], idx[None, :]], (q * d) @ q.T)
    # EKFAC's diagonal fits the GGN in that basis at least as well as KFAC's Kronecker eigenvalues
    err = lambda k: float((_blocks(op, dense) - _dense(k)).norm())  # noqa: E731
    assert err(op) <= err(kfac) + 1e-12


@pytest.mark.parametrize("positions", [1, 3])
def test_ekfac_squared_projections_brute_force(positions):
    """sum_b (sum_t g_bt a_bt^T)^2 by an explicit loop; the one-position matmul and the chunked paths."""
    g = torch.randn(5, positions, 4, generator=_gen(20), dtype=F64)
    a = torch.randn(5, positions, 3, generator=_gen(21), dtype=F64)
    brute = sum(sum(torch.outer(g[b, t], a[b, t]) for t in range(positions)) ** 2 for b in range(5))
    for chunk in (1, 13, 1 << 22):
        _close(_squared_projections(g, a, chunk), brute, 1e-13)


def test_ekfac_conv_several_positions_is_diagonal_in_eigenbasis():
    """A conv over several positions, one example per row: EKFAC is the exact GGN's diagonal in its basis."""
    torch.manual_seed(3)
    model = _CNN(nn.Conv2d(2, 3, 3, padding=1), spatial=4).double()
    x, y = torch.randn(3, 2, 4, 4, generator=_gen(22), dtype=F64), _targets("cross_entropy", 3, 3)
    op = KFACOperator(model, supervised(), (x, y), params="conv", kind="ekfac")
    dense = _ggn(model, "cross_entropy", x, y, op.names)
    q = _eigenbasis(op.blocks[0])
    d = torch.diagonal(q.T @ dense @ q)
    _close(op.blocks[0].refit.reshape(-1), d)
    _close(_dense(op), (q * d) @ q.T)


# --- Conv2d: factors from brute-force patches --------------------------------------------------------------------


class _CNN(nn.Module):
    def __init__(self, conv: nn.Conv2d, spatial: int, classes: int = 3):
        super().__init__()
        self.conv = conv
        side = conv(torch.zeros(1, conv.in_channels, spatial, spatial)).shape[-1]
        self.head = nn.Linear(conv.out_channels * side * side, classes)

    def rest(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(z).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rest(self.conv(x))


def _brute_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """[B, L, C*kh*kw] by slicing each receptive field out of the padded input (zeros or reflect)."""
    pad = conv.padding
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = nn.functional.pad(x, (pad[1], pad[1], pad[0], pad[0]), mode=mode)
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    rows = []
    for i in range(0, xp.shape[2] - dh * (kh - 1), sh):
        for j in range(0, xp.shape[3] - dw * (kw - 1), sw):
            rows.append(xp[:, :, i : i + dh * (kh - 1) + 1 : dh, j : j + dw * (kw - 1) + 1 : dw].reshape(len(x), -1))
    return torch.stack(rows, 1)


def _conv_reference(model: _CNN, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, G) of the conv layer: A the mean of [patch, 1][patch, 1]^T, G the type-2 sum over classes and positions
    of the output gradients J_rest^T sqrt(p_c)(e_c - p) per example, over the number of examples."""
    conv = model.conv
    patches = _brute_patches(conv, x.detach())
    a = torch.cat([patches, torch.ones(*patches.shape[:2], 1, dtype=F64)], 2).reshape(-1, patches.shape[2] + 1)
    big_a = a.T @ a / len(a)
    g_sum = torch.zeros(conv.out_channels, conv.out_channels, dtype=F64)
    for n in range(len(x)):
        z = conv(x[n : n + 1]).detach()
        jac = jacrev(model.rest)(z)[0]  # [classes, 1, out, H, W]
        p = torch.softmax(model.rest(z)[0].detach(), 0)
        for c in range(len(p)):
            s = p[c].sqrt() * (torch.eye(len(p), dtype=F64)[c] - p)
            g = torch.einsum("k,kohw->ohw", s, jac[:, 0]).reshape(conv.out_channels, -1)
            g_sum += g @ g.T
    return big_a, g_sum / len(x)


@pytest.mark.parametrize("conv_args", [dict(padding=1), dict(padding=1, stride=2, padding_mode="reflect"),
                                       dict(padding=0, dilation=2)])
def test_conv2d_matches_brute_force_patches(conv_args):
    torch.manual_seed(0)
    model = _CNN(nn.Conv2d(2, 3, 3, **conv_args), spatial=6).double()
    x, y = torch.randn(3, 2, 6, 6, generator=_gen(8), dtype=F64), _targets("cross_entropy", 3, 3)
    op = KFACOperator(model, supervised(), (x, y), params="conv")
    big_a, big_g = _conv_reference(model, x)
    _close(op.blocks[0].A, big_a)
    _close(op.blocks[0].G, big_g)
    # the operator: kron(G, A) on row-major [W | b], permuted to the flat order (weight, then bias)
    cols = big_a.shape[0]
    order = [o * cols + j for o in range(3) for j in range(cols - 1)] + [o * cols + cols - 1 for o in range(3)]
    kron = torch.kron(big_g, big_a)[order][:, order]
    _close(_dense(op), kron)


def test_conv2d_single_position_is_exact_and_ekfac_diagonal():
    """A conv whose output is 1x1 per example (one position) with one example: exact GGN block (KFAC and EKFAC)."""
    torch.manual_seed(1)
    model = _CNN(nn.Conv2d(2, 3, 3), spatial=3).double()
    x, y = torch.randn(1, 2, 3, 3, generator=_gen(9), dtype=F64), _targets("cross_entropy", 1, 3)
    for kind in ("kfac", "ekfac"):
        op = KFACOperator(model, supervised(), (x, y), params="conv", kind=kind)
        _close(_dense(op), _ggn(model, "cross_entropy", x, y, op.names))


def test_inplace_relu_after_layer():
    """ReLU(inplace=True) right after a layer rewrites its output; the gradient is still the layer's own."""
    torch.manual_seed(2)
    plain = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    inplace = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)).double()
    inplace.load_state_dict(plain.state_dict())
    x, y = torch.randn(5, 3, generator=_gen(10), dtype=F64), _targets("cross_entropy", 5, 2)
    a = _dense(KFACOperator(plain, supervised(), (x, y)))
    b = _dense(KFACOperator(inplace, supervised(), (x, y)))
    assert torch.equal(a, b)


# --- inverse, logdet, trace, scipy, Lanczos ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp_ops():
    model = _mlp([3, 4, 3])
    x, y = torch.randn(12, 3, generator=_gen(11), dtype=F64), _targets("cross_entropy", 12, 3)
    return {kind: KFACOperator(model, supervised(), (x, y), kind=kind) for kind in ("kfac", "ekfac")}


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_inverse_logdet_trace_against_dense(mlp_ops, kind):
    op = mlp_ops[kind]
    dense = _dense(op)
    assert torch.allclose(dense, dense.T, atol=1e-14)
    eye = torch.eye(op.size, dtype=F64)
    for damping in (1e-3, 0.5):
        inv = op.inverse(damping)
        assert isinstance(inv, KFACInverse)
        _close(_dense(inv) @ (dense + damping * eye), eye, 1e-9)
        sign, logabs = torch.linalg.slogdet(dense + damping * eye)
        assert sign == 1 and math.isclose(op.logdet(damping), float(logabs), rel_tol=1e-10)
    assert math.isclose(op.trace(), float(torch.trace(dense)), rel_tol=1e-12)
    v = torch.randn(op.size, generator=_gen(12), dtype=F64)
    _close(op.matvec(v), dense @ v, 1e-12)
    _close(op @ v, dense @ v, 1e-12)


def test_singular_without_damping(mlp_ops):
    op = mlp_ops["kfac"]  # cross-entropy: G is singular along the all-ones direction
    with pytest.raises(ProbeError, match="singular"):
        op.inverse(0.0)
    assert op.logdet(0.0) == -math.inf
    for bad in (-1.0, float("nan"), "1"):
        with pytest.raises(ProbeError, match="damping"):
            op.inverse(bad)


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_scipy_and_lanczos(mlp_ops, kind):
    op = mlp_ops[kind]
    ev = torch.linalg.eigvalsh(_dense(op))
    top = eigsh(op.to_scipy(), k=2, which="LA", return_eigenvectors=False)
    assert sorted(top) == pytest.approx(ev[-2:].tolist(), rel=1e-8)
    eig = lanczos(op, k=2, tol=1e-8, seed=0)
    assert eig.converged
    assert eig.values.tolist() == pytest.approx(ev[-2:].flip(0).tolist(), rel=1e-7)
    inv = lanczos(op.inverse(0.1), k=1, tol=1e-8, seed=0)
    assert float(inv.values[0]) == pytest.approx(1 / (float(ev[0].clamp_min(0)) + 0.1), rel=1e-6)


# --- Fisher types: MC determinism and its expectation ------------------------------------------------------------


def test_mc_deterministic_with_seed_and_unbiased():
    model = _mlp([3, 4, 3])
    x, y = torch.randn(2, 3, generator=_gen(13), dtype=F64), _targets("cross_entropy", 2, 3)
    obj = supervised()
    a = _dense(KFACOperator(model, obj, (x, y), fisher_type="mc", seed=3, kind="ekfac"))
    b = _dense(KFACOperator(model, obj, (x, y), fisher_type="mc", seed=3, kind="ekfac"))
    c = _dense(KFACOperator(model, obj, (x, y), fisher_type="mc", seed=4, kind="ekfac"))
    assert torch.equal(a, b) and not torch.equal(a, c)
    exact = KFACOperator(model, obj, (x, y))
    many = KFACOperator(model, obj, (x, y), fisher_type="mc", mc_samples=1000, seed=0)
    for e, m in zip(exact.blocks, many.blocks):
        assert torch.equal(e.A, m.A)
        assert float((m.G - e.G).norm() / e.G.norm()) < 0.1  # observed 0.01-0.035 over seeds 0-2


def test_mc_mse_unbiased():
    model = _mlp([3, 2])
    x, y = torch.randn(4, 3, generator=_gen(14), dtype=F64), _targets("mse", 4, 2)
    many = KFACOperator(model, supervised("mse"), (x, y), fisher_type="mc", mc_samples=1000)
    assert float((many.blocks[0].G - torch.eye(2, dtype=F64)).norm()) < 0.12  # (2/k) I, k = 2; observed 0.008-0.038


# --- transformers models, the causal-LM objective -----------------------------------------------------------------


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=12, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1,
                                        max_position_embeddings=16)).double().eval()


def _lm_batch(lengths: list[int]) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 12, (len(lengths), max(lengths)), generator=_gen(15))
    mask = torch.tensor([[1] * n + [0] * (max(lengths) - n) for n in lengths])
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def test_causal_lm_llama_blocks():
    """A tiny Llama, the causal-LM objective, MLP projections and lm_head: symmetric PSD, deterministic, and the
    factor scaling of the module docstring (A a mean over every position, G normalised by predicted rows)."""
    model = _llama()
    batches = [_lm_batch([5, 3]), _lm_batch([4])]
    op = KFACOperator(model, CAUSAL_LM, batches, params=[r"model.layers.0.mlp", "lm_head"], fisher_type="mc")
    assert [b.module for b in op.blocks] == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
                                             "model.layers.0.mlp.down_proj", "lm_head"]
    dense = _dense(op)
    assert torch.allclose(dense, dense.T, atol=1e-14) and float(torch.linalg.eigvalsh(dense)[0]) > -1e-12
    again = KFACOperator(model, CAUSAL_LM, batches, params=[r"model.layers.0.mlp", "lm_head"], fisher_type="mc")
    assert torch.equal(dense, _dense(again))
    # lm_head's input features: the final hidden states at all 2 * 5 + 4 positions (padding included)
    hidden = [model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
              for b in batches]
    flat = torch.cat([h.reshape(-1, 8) for h in hidden]).detach()
    _close(op.blocks[-1].A, flat.T @ flat / 14)
    # its type-2 G: sum over predicted rows r of (diag(p_r) - p_r p_r^T), over the 4 + 2 + 3 rows
    exact = KFACOperator(model, CAUSAL_LM, batches, params="lm_head")
    rows = [CAUSAL_LM.predict(model, b)[0].detach() for b in batches]
    p = torch.softmax(torch.cat(rows), 1)
    _close(exact.blocks[0].G, (torch.diag(p.sum(0)) - p.T @ p) / len(p))


# --- bad input ------------------------------------------------------------------------------------------------------


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.fc(x)))


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x[:, None], x[:, None], x[:, None])[0][:, 0]


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=12, n_embd=8, n_layer=1, n_head=2, n_positions=16)).eval()


@pytest.mark.parametrize("build, params, match", [
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 3)), None, r"module '1' \(LayerNorm\)"),
    (lambda: nn.Sequential(nn.Conv2d(2, 2, 1, groups=2)), None, "grouped convolution"),
    (_Twice, None, "'fc' is called 2 times"),
    (_Attn, "attn.out_proj", "'attn.out_proj' was not called"),
    (_Attn, None, r"module 'attn' \(MultiheadAttention\)"),
    (_Tied, None, "tied"),
    (_gpt2, r"transformer\.h\.0\.mlp\.c_fc", r"\(Conv1D\) is not supported"),
])
def test_unsupported_layers_one_line_error(build, params, match):
    model = build()
    x = torch.randn(2, 2, 3, 3) if isinstance(model, nn.Sequential) and isinstance(model[0], nn.Conv2d) else (
        torch.randn(2, 4) if isinstance(model, _Attn) else torch.randn(2, 3))
    data = [_lm_batch([4])] if params and "transformer" in params else (x, torch.zeros(2, dtype=torch.long))
    objective = CAUSAL_LM if params and "transformer" in params else supervised()
    with pytest.raises(ProbeError, match=match) as err:
        KFACOperator(model, objective, data, params=params)
    assert "\n" not in str(err.value)


def test_bad_arguments():
    model = _mlp([3, 2])
    data = (torch.randn(2, 3, dtype=F64), torch.tensor([0, 1]))
    for kwargs, match in [(dict(kind="kfc"), "kind"), (dict(fisher_type="exact"), "fisher_type"),
                          (dict(mc_samples=0), "mc_samples"), (dict(params="nope"), "selects no"),
                          (dict(seed=1.5), "seed")]:
        with pytest.raises(ProbeError, match=match):
            KFACOperator(model, supervised(), data, **kwargs)
    with pytest.raises(ProbeError, match="objective"):
        KFACOperator(model, nn.CrossEntropyLoss(), data)
    with pytest.raises(DataError, match="no batches"):  # the shared batch list's error, as for every operator
        KFACOperator(model, supervised(), [])
    with pytest.raises(ProbeError, match=r"outside \[0, 2\)"):
        KFACOperator(model, supervised(), (data[0], torch.tensor([0, 5])), fisher_type="empirical")
    with pytest.raises(ProbeError, match=r"2-D outputs \[rows, C\], got \(2, 1, 2\)"):
        KFACOperator(nn.Sequential(model, nn.Unflatten(1, (1, 2))), supervised(), data)
    op = KFACOperator(model, supervised(), data)
    with pytest.raises(ProbeError, match="expected"):
        op.matvec(torch.zeros(op.size + 1, dtype=F64))
