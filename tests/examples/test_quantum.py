"""The state-vector simulator against explicit matrices, hand-computed states and parameter-shift."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.func import functional_call, grad, jvp

from evaluations.quantum import (
    CNOT,
    CZ,
    HADAMARD,
    PatchQNN,
    apply_single,
    apply_two,
    circuit_expvals,
    entangle_ring,
    expval_z,
    expval_zz,
    extract_patches,
    kron_layer,
    ring_pairs,
    rot,
    rx,
    ry,
    rz,
    zero_state,
)
from taxonomy.errors import BasinError

C128 = torch.complex128
X = torch.tensor([[0, 1], [1, 0]], dtype=C128)
Y = torch.tensor([[0, -1j], [1j, 0]], dtype=C128)
Z = torch.tensor([[1, 0], [0, -1]], dtype=C128)
I2 = torch.eye(2, dtype=C128)


def random_state(n: int, batch: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    psi = torch.complex(torch.randn(batch, 2**n, generator=g, dtype=torch.float64),
                        torch.randn(batch, 2**n, generator=g, dtype=torch.float64))
    return psi / psi.norm(dim=-1, keepdim=True)


def kron_single(u: torch.Tensor, wire: int, n: int) -> torch.Tensor:
    out = torch.ones(1, 1, dtype=C128)
    for w in range(n):
        out = torch.kron(out, u if w == wire else I2)
    return out


def dense_two(u: torch.Tensor, a: int, b: int, n: int) -> torch.Tensor:
    """Brute force: <i|U_ab|j> = U[(i_a i_b), (j_a j_b)] * prod_{w != a, b} delta(i_w, j_w)."""
    dim = 2**n
    m = torch.zeros(dim, dim, dtype=C128)
    for i, j in itertools.product(range(dim), repeat=2):
        bi = [(i >> (n - 1 - w)) & 1 for w in range(n)]
        bj = [(j >> (n - 1 - w)) & 1 for w in range(n)]
        if all(bi[w] == bj[w] for w in range(n) if w not in (a, b)):
            m[i, j] = u[2 * bi[a] + bi[b], 2 * bj[a] + bj[b]]
    return m


def test_rotation_matrices_are_pauli_exponentials():
    for theta in (0.3, -1.7, 2.9):
        t = torch.tensor(theta, dtype=torch.float64)
        for gate, pauli in ((rx, X), (ry, Y), (rz, Z)):
            torch.testing.assert_close(gate(t), torch.linalg.matrix_exp(-0.5j * theta * pauli))
        angles = torch.tensor([0.4, -1.1, 2.2], dtype=torch.float64)
        expected = rz(angles[2]) @ ry(angles[1]) @ rx(angles[0])
        torch.testing.assert_close(rot(angles), expected)


@pytest.mark.parametrize("wire", [0, 1, 2])
def test_single_qubit_gate_matches_kron_matrix(wire):
    n = 3
    psi = random_state(n)
    for u in (rx(torch.tensor(0.7, dtype=torch.float64)), ry(torch.tensor(-1.3, dtype=torch.float64)),
              rz(torch.tensor(2.1, dtype=torch.float64)), HADAMARD):
        expected = psi @ kron_single(u, wire, n).T
        torch.testing.assert_close(apply_single(psi, u, wire, n), expected)


def test_single_qubit_gate_batched_per_state():
    n = 2
    psi = random_state(n, batch=4)
    thetas = torch.linspace(-2, 2, 4, dtype=torch.float64)
    out = apply_single(psi, ry(thetas), 1, n)
    for k in range(4):
        torch.testing.assert_close(out[k], kron_single(ry(thetas[k]), 1, n) @ psi[k])


@pytest.mark.parametrize("wires", [(0, 1), (1, 0), (0, 2), (2, 1)])
def test_two_qubit_gate_matches_dense_matrix(wires):
    n = 3
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.complex(torch.randn(4, 4, generator=g, dtype=torch.float64),
                                         torch.randn(4, 4, generator=g, dtype=torch.float64)))
    psi = random_state(n)
    for u in (q, CNOT, CZ):
        torch.testing.assert_close(apply_two(psi, u, wires, n), psi @ dense_two(u, *wires, n).T)
    if wires == (0, 1):  # adjacent, in order: the plain Kronecker product
        torch.testing.assert_close(apply_two(psi, q, wires, 3), psi @ torch.kron(q.contiguous(), I2).T)


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("kind,gate", [("cnot", CNOT), ("cz", CZ)])
def test_entangling_ring_is_product_of_gates(n, kind, gate):
    psi = random_state(n)
    full = torch.eye(2**n, dtype=C128)
    for a, b in ring_pairs(n):
        full = dense_two(gate, a, b, n) @ full
    torch.testing.assert_close(entangle_ring(psi, n, kind), psi @ full.T)


def test_expectations_of_hand_computed_states():
    thetas = torch.tensor([0.0, 0.5, 1.9, math.pi], dtype=torch.float64)
    psi = apply_single(zero_state(1, (4,), C128), ry(thetas), 0, 1)
    torch.testing.assert_close(expval_z(psi, 1)[:, 0], torch.cos(thetas))  # RY(t)|0> -> <Z> = cos t
    psi = apply_single(zero_state(1, (4,), C128), rx(thetas), 0, 1)
    torch.testing.assert_close(expval_z(psi, 1)[:, 0], torch.cos(thetas))
    # Bell state (|00> + |11>)/sqrt2 via H then CNOT: <Z0 Z1> = 1, <Z0> = <Z1> = 0
    bell = apply_two(apply_single(zero_state(2, (), C128), HADAMARD, 0, 2), CNOT, (0, 1), 2)
    torch.testing.assert_close(bell, torch.tensor([1, 0, 0, 1], dtype=C128) / math.sqrt(2))
    torch.testing.assert_close(expval_zz(bell, 2, 0, 1), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(expval_z(bell, 2), torch.zeros(2, dtype=torch.float64))
    # |1 0> after X on wire 0: <Z0> = -1, <Z1> = +1, <Z0 Z1> = -1
    one_zero = apply_single(zero_state(2, (), C128), X, 0, 2)
    torch.testing.assert_close(expval_z(one_zero, 2), torch.tensor([-1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(expval_zz(one_zero, 2, 0, 1), torch.tensor(-1.0, dtype=torch.float64))


def dense_circuit(angles: torch.Tensor, weights: torch.Tensor, entangler: str) -> torch.Tensor:
    """The same circuit with full 2^n x 2^n matrices, one input at a time."""
    n = angles.shape[-1]
    gate = CNOT if entangler == "cnot" else CZ
    z_ops = [kron_single(Z, w, n) for w in range(n)]
    outs = []
    for x in angles:
        psi = torch.zeros(2**n, dtype=C128)
        psi[0] = 1
        for w in range(n):
            psi = kron_single(ry(x[w]), w, n) @ psi
        for layer in weights:
            for w in range(n):
                u = rz(layer[w, 2]) @ ry(layer[w, 1]) @ rx(layer[w, 0])
                psi = kron_single(u, w, n) @ psi
            for a, b in ring_pairs(n):
                psi = dense_two(gate, a, b, n) @ psi
        outs.append(torch.stack([(psi.conj() @ zo @ psi).real for zo in z_ops]))
    return torch.stack(outs)


@pytest.mark.parametrize("entangler", ["cnot", "cz"])
def test_circuit_matches_dense_simulation(entangler):
    g = torch.Generator().manual_seed(2)
    angles = torch.rand(5, 3, generator=g, dtype=torch.float64) * math.pi
    weights = torch.randn(2, 3, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(circuit_expvals(angles, weights, entangler), dense_circuit(angles, weights, entangler))


def test_gradients_match_parameter_shift_rule():
    g = torch.Generator().manual_seed(3)
    angles = torch.rand(4, 3, generator=g, dtype=torch.float64) * math.pi
    weights = torch.randn(2, 3, 3, generator=g, dtype=torch.float64)
    readout = torch.randn(4, 3, generator=g, dtype=torch.float64)

    def f(w: torch.Tensor) -> torch.Tensor:  # a fixed linear functional of all expectation values
        return (circuit_expvals(angles, w, "cnot") * readout).sum()

    w = weights.clone().requires_grad_()
    (auto,) = torch.autograd.grad(f(w), w)
    shift = torch.zeros_like(weights)
    for idx in itertools.product(*map(range, weights.shape)):
        e = torch.zeros_like(weights)
        e[idx] = math.pi / 2
        shift[idx] = (f(weights + e) - f(weights - e)) / 2
    torch.testing.assert_close(auto, shift)


def test_kron_layer_is_tensor_product():
    g = torch.Generator().manual_seed(5)
    gates = rot(torch.randn(2, 3, 3, generator=g, dtype=torch.float64))  # [batch 2, wires 3, 2, 2]
    for b in range(2):
        expected = torch.kron(torch.kron(gates[b, 0], gates[b, 1]), gates[b, 2])
        torch.testing.assert_close(kron_layer(gates)[b], expected)


def test_hessian_probes_on_patch_model_match_dense_hessian():
    from evaluations.probes import HessianOperator, hutchinson_trace, lanczos

    model = PatchQNN(n_patches=2, n_qubits=3, depth=1, n_classes=3, seed=1).double()
    g = torch.Generator().manual_seed(6)
    x = torch.rand(12, 2, 3, generator=g, dtype=torch.float64) * math.pi
    y = torch.arange(12) % 3
    w0 = model.weights.detach().clone()

    def loss_of_weights(w: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(functional_call(model, {"weights": w}, (x,)), y)

    dense = torch.autograd.functional.hessian(loss_of_weights, w0).reshape(w0.numel(), w0.numel())
    op = HessianOperator(model, torch.nn.functional.cross_entropy, (x, y), params="weights")
    eig = lanczos(op, k=2, tol=1e-8, v0=torch.randn(op.size, generator=g, dtype=torch.float64))
    torch.testing.assert_close(torch.from_numpy(eig.values), torch.linalg.eigvalsh(dense).flip(0)[:2], rtol=1e-6,
                               atol=1e-8)
    tr = hutchinson_trace(op, rtol=0.0, min_samples=40, max_samples=40, seed=0)
    assert abs(tr.mean - float(dense.trace())) < 4 * tr.stderr + 1e-9


def test_patches_cover_image_and_pool():
    images = torch.arange(2 * 64, dtype=torch.float64).reshape(2, 8, 8)
    for n_patches in (1, 2, 4, 8):
        p = extract_patches(images, n_patches, pooled=2)
        assert p.shape == (n_patches, 2, 4)
    whole = extract_patches(images, 1, pooled=2)[0, 0]
    expected = images[0].reshape(2, 4, 2, 4).mean(dim=(1, 3)).flatten()  # 4x4 block means
    torch.testing.assert_close(whole, expected)
    halves = extract_patches(images, 2, pooled=1)[:, 0, 0]  # left cols 0-4, right cols 3-7 (overlap 3-4)
    torch.testing.assert_close(halves, torch.stack([images[0, :, :5].mean(), images[0, :, 3:].mean()]))


def test_patch_model_works_with_torch_func_hvp():
    model = PatchQNN(n_patches=2, n_qubits=3, depth=2, n_classes=3, seed=0).double()
    g = torch.Generator().manual_seed(4)
    x = torch.rand(6, 2, 3, generator=g, dtype=torch.float64) * math.pi
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p):
        return torch.nn.functional.cross_entropy(functional_call(model, p, (x,)), y)

    # the model's first block equals the plain circuit on each patch
    z = model.features(x).reshape(6, 2, 3)
    for patch in range(2):
        torch.testing.assert_close(z[:, patch], circuit_expvals(x[:, patch], params["weights"][patch]))
    v = {k: torch.randn(t.shape, generator=g, dtype=t.dtype) for k, t in params.items()}
    _, hv = jvp(grad(loss), (params,), (v,))
    # reference: finite difference of autograd gradients along v
    eps = 1e-5

    def g_at(s: float) -> dict[str, torch.Tensor]:
        return grad(loss)({k: params[k] + s * v[k] for k in params})

    plus, minus = g_at(eps), g_at(-eps)
    for k in params:
        torch.testing.assert_close(hv[k], (plus[k] - minus[k]) / (2 * eps), rtol=1e-5, atol=1e-7)


def test_bad_input_raises():
    with pytest.raises(BasinError, match="wire 3"):
        apply_single(zero_state(2), HADAMARD, 3, 2)
    with pytest.raises(BasinError, match="n_patches=3"):
        extract_patches(torch.zeros(1, 8, 8), 3)
    with pytest.raises(BasinError, match="entangler"):
        entangle_ring(zero_state(2), 2, "swap")
    with pytest.raises(BasinError, match="angles"):
        PatchQNN(2, n_qubits=4)(torch.zeros(3, 4, 4))
