"""A small differentiable state-vector simulator and a patch-distributed quantum neural network.

Pure torch with complex tensors, so autograd and torch.func (functional_call, grad, jvp) work
through it and the Hessian probes can run on quantum models. Conventions: wire 0 is the most
significant bit of a basis index (|q0 q1 ... q_{n-1}>), a state has shape [*batch, 2**n], gates
act as psi' = U psi with the usual matrices (Nielsen & Chuang, ch. 4):

    RX(t) = [[c, -i s], [-i s, c]],  RY(t) = [[c, -s], [s, c]],  RZ(t) = diag(e^{-i t/2}, e^{i t/2}),
    c = cos(t/2), s = sin(t/2).

The model follows the patch-distributed quantum networks of the study this example reproduces:
an image is split into overlapping local patches, each patch is angle-encoded (RY) into its own
few-qubit circuit of `depth` layers (a general rotation RZ RY RX on every wire, then a CNOT or CZ
ring; Schuld et al., 2020, "Circuit-centric quantum classifiers"),
every wire's Pauli-Z expectation is read out and a linear layer aggregates all patches'
readouts into class logits. All patch circuits run as one batched simulation.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import nn

from taxonomy.errors import BasinError

# ----------------------------------------------------------------------------- gates


def _cs(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cos(theta / 2), torch.sin(theta / 2)


def _complex_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype in (torch.float64, torch.complex128) else torch.complex64


def _matrix(rows: list[list[torch.Tensor]]) -> torch.Tensor:
    """Stack a 2x2 nested list of same-shaped tensors into [..., 2, 2]."""
    return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)


def rx(theta: torch.Tensor) -> torch.Tensor:
    """RX(theta) = exp(-i theta X / 2), shape [*theta.shape, 2, 2]."""
    c, s = _cs(theta)
    zero = torch.zeros_like(c)
    cc, ms = torch.complex(c, zero), torch.complex(zero, -s)
    return _matrix([[cc, ms], [ms, cc]])


def ry(theta: torch.Tensor) -> torch.Tensor:
    """RY(theta) = exp(-i theta Y / 2), shape [*theta.shape, 2, 2]."""
    c, s = _cs(theta)
    zero = torch.zeros_like(c)
    cc, ss = torch.complex(c, zero), torch.complex(s, zero)
    return _matrix([[cc, -ss], [ss, cc]])


def rz(theta: torch.Tensor) -> torch.Tensor:
    """RZ(theta) = exp(-i theta Z / 2), shape [*theta.shape, 2, 2]."""
    c, s = _cs(theta)
    zero = torch.zeros_like(c)
    zc = torch.complex(zero, zero)
    return _matrix([[torch.complex(c, -s), zc], [zc, torch.complex(c, s)]])


def rot(angles: torch.Tensor) -> torch.Tensor:
    """General single-qubit rotation RZ(w) RY(t) RX(p) for angles [..., 3] = (p, t, w)."""
    return rz(angles[..., 2]) @ ry(angles[..., 1]) @ rx(angles[..., 0])


HADAMARD = torch.tensor([[1, 1], [1, -1]], dtype=torch.complex128) / math.sqrt(2)
CNOT = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]], dtype=torch.complex128)
CZ = torch.diag(torch.tensor([1, 1, 1, -1], dtype=torch.complex128))


# ----------------------------------------------------------------------------- states


def zero_state(n_qubits: int, batch: tuple[int, ...] = (), dtype: torch.dtype = torch.complex64) -> torch.Tensor:
    """|0...0> with shape [*batch, 2**n_qubits]."""
    psi = torch.zeros(*batch, 2**n_qubits, dtype=dtype)
    psi[..., 0] = 1
    return psi


def _check_wire(n_qubits: int, *wires: int) -> None:
    for w in wires:
        if not 0 <= w < n_qubits:
            raise BasinError(f"wire {w} is out of range for {n_qubits} qubits")
    if len(set(wires)) != len(wires):
        raise BasinError(f"wires {wires} must be distinct")


def apply_single(psi: torch.Tensor, gate: torch.Tensor, wire: int, n_qubits: int) -> torch.Tensor:
    """Apply a 2x2 gate (batch shape broadcastable to psi's batch) on `wire` of a [*batch, 2**n] state."""
    _check_wire(n_qubits, wire)
    batch = psi.shape[:-1]
    view = psi.reshape(*batch, 2**wire, 2, 2 ** (n_qubits - wire - 1))
    out = gate.to(psi.dtype).unsqueeze(-3) @ view  # [*gb, 1, 2, 2] @ [*batch, L, 2, R]
    return out.reshape(*out.shape[:-3], 2**n_qubits)


def apply_two(psi: torch.Tensor, gate: torch.Tensor, wires: tuple[int, int], n_qubits: int) -> torch.Tensor:
    """Apply a 4x4 gate (basis |a b>, a on wires[0]) on two wires of a [*batch, 2**n] state."""
    a, b = wires
    _check_wire(n_qubits, a, b)
    batch = psi.shape[:-1]
    t = psi.reshape(*batch, *([2] * n_qubits))
    k = len(batch)
    t = torch.movedim(t, (k + a, k + b), (-2, -1))
    moved = t.shape
    t = t.reshape(*moved[:-2], 4) @ gate.to(psi.dtype).transpose(-1, -2)
    t = torch.movedim(t.reshape(moved), (-2, -1), (k + a, k + b))
    return t.reshape(*batch, 2**n_qubits)


def _bits(n_qubits: int) -> torch.Tensor:
    """[2**n, n] bit table: bits[i, w] is wire w's value in basis state i (wire 0 most significant)."""
    idx = torch.arange(2**n_qubits)
    return (idx[:, None] >> (n_qubits - 1 - torch.arange(n_qubits))[None, :]) & 1


def ring_pairs(n_qubits: int) -> list[tuple[int, int]]:
    """Nearest-neighbour ring (0,1), (1,2), ..., (n-1,0); a single pair for two qubits, none for one."""
    if n_qubits == 1:
        return []
    if n_qubits == 2:
        return [(0, 1)]
    return [(w, (w + 1) % n_qubits) for w in range(n_qubits)]


@lru_cache(maxsize=64)
def _cnot_ring_perm(n_qubits: int) -> torch.Tensor:
    """Index map of the CNOT ring: (ring psi)[i] = psi[perm[i]] (CNOTs are basis permutations)."""
    bits = _bits(n_qubits).clone()
    # the ring's product maps basis |x> to |f(x)>; apply CNOTs in order to the bit table
    for control, target in ring_pairs(n_qubits):
        bits[:, target] ^= bits[:, control]
    weights = 2 ** (n_qubits - 1 - torch.arange(n_qubits))
    image = (bits * weights).sum(-1)  # f(x) for every x
    perm = torch.empty_like(image)
    perm[image] = torch.arange(2**n_qubits)  # out[f(x)] = psi[x]
    return perm


@lru_cache(maxsize=64)
def _cz_ring_phase(n_qubits: int) -> torch.Tensor:
    """Diagonal of the CZ ring: (-1)^(number of ring pairs with both bits 1)."""
    bits = _bits(n_qubits)
    count = torch.zeros(2**n_qubits, dtype=torch.long)
    for a, b in ring_pairs(n_qubits):
        count += bits[:, a] & bits[:, b]
    return (1 - 2 * (count % 2)).to(torch.float64)


def entangle_ring(psi: torch.Tensor, n_qubits: int, kind: str = "cnot") -> torch.Tensor:
    """Apply the ring of CNOT(w, w+1) gates in wire order, or the ring of CZ gates, to [*batch, 2**n]."""
    if kind == "cnot":
        return psi.index_select(-1, _cnot_ring_perm(n_qubits))
    if kind == "cz":
        return psi * _cz_ring_phase(n_qubits).to(psi.real.dtype)
    raise BasinError(f"entangler {kind!r}: expected 'cnot' or 'cz'")


def probabilities(psi: torch.Tensor) -> torch.Tensor:
    return psi.real**2 + psi.imag**2


def expval_z(psi: torch.Tensor, n_qubits: int) -> torch.Tensor:
    """<Z_w> for every wire: [*batch, 2**n] -> [*batch, n]."""
    signs = (1 - 2 * _bits(n_qubits)).to(psi.real.dtype)  # [2**n, n]
    return probabilities(psi) @ signs


def expval_zz(psi: torch.Tensor, n_qubits: int, a: int, b: int) -> torch.Tensor:
    """<Z_a Z_b>: [*batch, 2**n] -> [*batch]."""
    _check_wire(n_qubits, a, b)
    bits = _bits(n_qubits)
    signs = (1 - 2 * (bits[:, a] ^ bits[:, b])).to(psi.real.dtype)
    return probabilities(psi) @ signs


# ----------------------------------------------------------------------------- circuits


def kron_layer(gates: torch.Tensor) -> torch.Tensor:
    """One gate per wire [..., n, 2, 2] -> their tensor product U_0 (x) ... (x) U_{n-1}, [..., 2**n, 2**n]."""
    out = gates[..., 0, :, :]
    for w in range(1, gates.shape[-3]):
        g = gates[..., w, :, :]
        d = out.shape[-1] * 2
        out = (out[..., :, None, :, None] * g[..., None, :, None, :]).reshape(*out.shape[:-2], d, d)
    return out


def circuit_expvals(angles: torch.Tensor, weights: torch.Tensor, entangler: str = "cnot") -> torch.Tensor:
    """Angle-encoded layered circuit, Pauli-Z readout on every wire.

    angles: [..., B, n] input angles (RY encoding on |0...0>); weights: [..., depth, n, 3] rotation
    angles (p, t, w) of RZ(w) RY(t) RX(p) per layer and wire, shared over the B inputs (leading
    dims broadcast, e.g. one circuit per patch: angles [P, B, n], weights [P, depth, n, 3]).
    Each layer applies all its rotations as one 2**n x 2**n product matrix, then the ring.
    Returns [..., B, n] expectations <Z_w>.
    """
    n = angles.shape[-1]
    if weights.dim() < 3 or weights.shape[-2:] != (n, 3):
        raise BasinError(f"weights: expected shape [..., depth, {n}, 3], got {tuple(weights.shape)}")
    dtype = _complex_dtype(weights.dtype)
    # RY(x)|0> = cos(x/2)|0> + sin(x/2)|1>: the encoded product state, built directly
    c, s = _cs(angles.to(weights.dtype))
    psi = torch.ones(*angles.shape[:-1], 1, dtype=weights.dtype)
    for w in range(n):
        pair = torch.stack([c[..., w], s[..., w]], dim=-1)
        psi = (psi.unsqueeze(-1) * pair.unsqueeze(-2)).flatten(-2)
    psi = psi.to(dtype)
    layers = kron_layer(rot(weights))  # [..., depth, 2**n, 2**n]
    for layer in range(weights.shape[-3]):
        psi = entangle_ring(psi @ layers[..., layer, :, :].transpose(-1, -2), n, entangler)
    return expval_z(psi, n)


# ----------------------------------------------------------------------------- patches and model


def patch_grid(n_patches: int) -> tuple[int, int]:
    """Rows x columns of the patch grid: 1 -> 1x1, 2 -> 1x2, 4 -> 2x2, 8 -> 2x4, 16 -> 4x4."""
    grids = {1: (1, 1), 2: (1, 2), 4: (2, 2), 8: (2, 4), 16: (4, 4)}
    if n_patches not in grids:
        raise BasinError(f"n_patches={n_patches}: expected one of {sorted(grids)}")
    return grids[n_patches]


def _windows(length: int, count: int) -> list[tuple[int, int]]:
    """`count` overlapping windows covering [0, length): size ceil(length/count)+1 (whole axis for one)."""
    if count == 1:
        return [(0, length)]
    size = min(length, math.ceil(length / count) + 1)
    starts = [round(i * (length - size) / (count - 1)) for i in range(count)]
    return [(s, s + size) for s in starts]


def extract_patches(images: torch.Tensor, n_patches: int, pooled: int = 2) -> torch.Tensor:
    """Overlapping local patches of [B, H, W] images, each average-pooled to pooled x pooled.

    Returns [n_patches, B, pooled**2] (row-major patch order).
    """
    if images.dim() != 3:
        raise BasinError(f"images: expected [batch, height, width], got {tuple(images.shape)}")
    rows, cols = patch_grid(n_patches)
    out = []
    for r0, r1 in _windows(images.shape[1], rows):
        for c0, c1 in _windows(images.shape[2], cols):
            window = images[:, None, r0:r1, c0:c1]
            out.append(nn.functional.adaptive_avg_pool2d(window, pooled).flatten(1))
    return torch.stack(out)


class PatchQNN(nn.Module):
    """Patch-distributed QNN: one `n_qubits`-qubit circuit per patch, linear readout of all <Z>.

    Input: [B, n_patches, n_qubits] angles (see `extract_patches`, scaled to [0, pi]).
    """

    def __init__(
        self,
        n_patches: int,
        n_qubits: int = 4,
        depth: int = 2,
        n_classes: int = 4,
        entangler: str = "cnot",
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if depth < 1 or n_qubits < 1 or n_patches < 1:
            raise BasinError(f"PatchQNN: n_patches, n_qubits and depth must be >= 1 (got {n_patches}, "
                             f"{n_qubits}, {depth})")
        gen = torch.Generator().manual_seed(0 if seed is None else seed)
        self.n_patches, self.n_qubits, self.depth, self.entangler = n_patches, n_qubits, depth, entangler
        self.weights = nn.Parameter(torch.rand(n_patches, depth, n_qubits, 3, generator=gen) * 2 * math.pi)
        self.readout = nn.Linear(n_patches * n_qubits, n_classes)
        with torch.no_grad():
            bound = 1 / math.sqrt(n_patches * n_qubits)
            self.readout.weight.uniform_(-bound, bound, generator=gen)
            self.readout.bias.zero_()

    def features(self, angles: torch.Tensor) -> torch.Tensor:
        """[B, P, n] angles -> [B, P * n] Pauli-Z readouts."""
        if angles.shape[-2:] != (self.n_patches, self.n_qubits):
            raise BasinError(f"angles: expected [batch, {self.n_patches}, {self.n_qubits}], "
                             f"got {tuple(angles.shape)}")
        z = circuit_expvals(angles.transpose(0, 1), self.weights, self.entangler)  # [P, B, n]
        return z.transpose(0, 1).flatten(1)

    def forward(self, angles: torch.Tensor) -> torch.Tensor:
        return self.readout(self.features(angles))
