"""Data-free statistics of a merge, gathered from the tensors the streaming engine already holds (no extra read).

Per planned tensor, with task vectors tau_i = theta_i - theta_base (Ilharco et al. 2023, "Editing Models with
Task Arithmetic", Sec. 2) when the merge has a base, else the input weights themselves:

- norms |tau_i| and pairwise cosines <tau_i, tau_j> / (|tau_i| |tau_j|), per tensor and over the whole model
  (the model's cosine is the ratio of the summed dots and squared norms: the cosine of the concatenated vectors);
- the sign-conflict rate: the fraction of entries where the non-zero task vectors disagree in sign (some
  tau_i > 0 and some tau_j < 0 at the same entry; the interference TIES resolves, Yadav et al. 2023, Sec. 3);
- the fraction of each task vector the method zeroes: exact for the magnitude trims (TIES: all but the
  int(density n) largest; Breadcrumbs: all but int(density n)), the expected fraction 1 - density for the random
  drops (DARE, DELLA), computed from the density parameters (the masks live inside the fused kernels).

Sums are accumulated in float64 over fixed chunks (`CHUNK` entries), chunk sums added with math.fsum: the same
inputs give bit-identical statistics. Float32/bf16 CPU tensors go through the compiled `stats_chunks`
(merging/methods/_fused.c: numpy's pairwise sum of each chunk replayed in one pass, the same bits). The engine
calls `MergeStats.observe` only inside `merging.engine.observing` (a merge without it pays nothing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

CHUNK = 1 << 16  # entries per float64 buffer
EXACT_SPARSIFIERS = ("magnitude", "outliers")  # TaskVectorMerge.sparsify values with an exact kept count


@dataclass
class TensorStats:
    """Float64 sums over one tensor: squared norms, pairwise dots (i < j), sign conflicts, zeroed entries."""

    name: str
    numel: int
    squares: list[float]
    dots: dict[tuple[int, int], float]
    conflicts: int
    dropped: list[float] | None = None  # entries zeroed per input (exact or expected, see `MergeStats.exact`)

    def cosines(self) -> list[list[float | None]]:
        return cosine_matrix(self.squares, self.dots)

    def to_json(self) -> dict:
        out = {"name": self.name, "numel": self.numel, "norms": [math.sqrt(s) for s in self.squares],
               "cosines": self.cosines(), "sign_conflict_rate": self.conflicts / self.numel if self.numel else 0.0}
        if self.dropped is not None:
            out["dropped"] = [d / self.numel if self.numel else 0.0 for d in self.dropped]
        return out


def cosine_matrix(squares: list[float], dots: dict[tuple[int, int], float]) -> list[list[float | None]]:
    """m x m cosines from squared norms and dots (None where a vector is zero); 1.0 on the diagonal."""
    m = len(squares)
    out: list[list[float | None]] = [[None] * m for _ in range(m)]
    for i in range(m):
        out[i][i] = 1.0 if squares[i] > 0 else None
        for j in range(i + 1, m):
            den = math.sqrt(squares[i] * squares[j])
            out[i][j] = out[j][i] = min(1.0, max(-1.0, dots[i, j] / den)) if den > 0 else None
    return out


def _chunk64(t: torch.Tensor, start: int, stop: int) -> np.ndarray:
    """Entries [start, stop) of flat `t` as a float64 copy (the caller subtracts in it). The conversion is exact
    either way; numpy's runs on this thread, where torch's parallel one costs 14x the CPU time on a 64k chunk
    of a busy machine (OpenMP threads waiting for each other)."""
    c = t[start:stop].detach()
    if c.device.type != "cpu" or c.dtype not in (torch.float32, torch.float16, torch.float64, torch.bfloat16):
        return c.to("cpu", torch.float64, copy=True).numpy()
    if c.dtype == torch.bfloat16:  # the top half of a float32
        return (c.view(torch.int16).numpy().view(np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return c.numpy().astype(np.float64)


def _dot(x: np.ndarray, y: np.ndarray, buffer: np.ndarray) -> float:
    """sum(x * y) by numpy's pairwise sum (not BLAS: thread-independent, and a busy machine's BLAS threads cost
    100x on a 64k dot)."""
    return float(np.multiply(x, y, out=buffer[: len(x)]).sum())


def _compiled_sums(flats: list[torch.Tensor], ref: torch.Tensor | None) -> tuple[np.ndarray, int] | None:
    """(chunk sums [chunks, squares then dots], sign conflicts) from the compiled `stats_chunks` (numpy's pairwise
    sums, the same bits), or None where it cannot read the tensors (no build; not float32/bf16 on the CPU)."""
    from merging.methods import kernels

    n = flats[0].numel()
    if kernels.compiled is None or n == 0 or len(flats) > 64 or not kernels.readable(
            flats + ([] if ref is None else [ref]), n):
        return None
    m = len(flats)
    sums = np.empty((-(-n // CHUNK), m + m * (m - 1) // 2), dtype=np.float64)
    code = kernels.DTYPE_CODES
    conflicts = kernels.compiled.stats_chunks(
        sums.ctypes.data, n, CHUNK, tuple((kernels.address(f), code[f.dtype]) for f in flats),
        None if ref is None else (kernels.address(ref), code[ref.dtype]))
    return sums, conflicts


def tensor_stats(name: str, vectors: list[torch.Tensor], reference: torch.Tensor | None) -> TensorStats:
    """Sums for task vectors `vectors[i] - reference` (the vectors themselves when `reference` is None): in one
    compiled pass where it reads the tensors, else chunk by chunk in numpy; the same bits."""
    flats = [v.detach().reshape(-1) for v in vectors]
    ref = None if reference is None else reference.detach().reshape(-1)
    m, n = len(flats), flats[0].numel()
    compiled = _compiled_sums(flats, ref)
    if compiled is not None:
        sums, conflicts = compiled
        pairs = [(i, j) for i in range(m) for j in range(i + 1, m)]
        return TensorStats(name, n, [math.fsum(sums[:, i].tolist()) for i in range(m)],
                           {k: math.fsum(sums[:, m + p].tolist()) for p, k in enumerate(pairs)}, conflicts)
    squares: list[list[float]] = [[] for _ in range(m)]
    dots: dict[tuple[int, int], list[float]] = {(i, j): [] for i in range(m) for j in range(i + 1, m)}
    buffer = np.empty(min(n, CHUNK), dtype=np.float64)
    conflicts = 0
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        taus = [_chunk64(f, start, stop) for f in flats]
        if ref is not None:
            base = _chunk64(ref, start, stop)
            for tau in taus:
                tau -= base
        for i, tau in enumerate(taus):
            squares[i].append(_dot(tau, tau, buffer))
        for i, j in dots:
            dots[i, j].append(_dot(taus[i], taus[j], buffer))
        conflicts += _conflicts(taus)
    return TensorStats(name, n, [math.fsum(s) for s in squares], {k: math.fsum(v) for k, v in dots.items()},
                       conflicts)


def _conflicts(taus: list[np.ndarray]) -> int:
    """Entries where some task vector is > 0 and another < 0."""
    if len(taus) < 2:
        return 0
    positive = np.zeros(taus[0].shape, dtype=bool)
    negative = np.zeros(taus[0].shape, dtype=bool)
    for tau in taus:
        positive |= tau > 0
        negative |= tau < 0
    return int(np.count_nonzero(positive & negative))


def sparsifier(method: str) -> str | None:
    """How `method` zeroes task-vector entries: 'magnitude' / 'outliers' (exact count), 'random' / 'della'
    (random, expected fraction 1 - density), or None (it zeroes none by density)."""
    from merging.methods.catalog import get_method

    m = get_method(method)
    if "density" not in {p.name for p in m.info.params}:
        return None
    if hasattr(m.fn, "sparsify"):  # a TaskVectorMerge: None, 'magnitude', 'outliers' or 'random'
        return m.fn.sparsify
    return "della" if m.info.name.startswith("della") else "random"


def zeroed(kind: str | None, density: float, n: int) -> float:
    """Entries of an n-entry task vector the sparsifier `kind` zeroes at `density` (expected, for random ones)."""
    if kind is None or density >= 1:
        return 0.0
    if kind in EXACT_SPARSIFIERS:
        return float(n - int(density * n))
    return (1.0 - density) * n


@dataclass
class MergeStats:
    """Collects `TensorStats` per planned tensor (see the module docstring); `base_ref` names the base model so
    methods that take it among their `tensors` (SLERP's t = 0 end, linear) still measure task vectors from it."""

    base_ref: str | None = None
    tensors: dict[str, TensorStats] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    labels: list[str] | None = None
    relative_to: str | None = None
    kind: str | None = None
    calls: int = 0

    def observe(self, plan, k: int, tensors: list[torch.Tensor], base: torch.Tensor | None) -> None:
        """The engine's hook: planned tensor `k` of `plan`, its inputs `tensors` and `base`, as merged."""
        self.calls += 1
        tp = plan.tensors[k]
        if not self.order:
            self.order = [t.name for t in plan.tensors]
            self.kind = sparsifier(plan.method)
        if not tensors or not tensors[0].is_floating_point():
            return
        labels = [plan.inputs[i] for i, _ in tp.sources]
        reference, relative = base, None if tp.base is None else plan.inputs[tp.base[0]]
        if reference is None and self.base_ref in labels and len(labels) > 1:
            reference, relative = tensors[labels.index(self.base_ref)], self.base_ref
        keep = [i for i, label in enumerate(labels) if relative is None or label != relative]
        if not keep:
            return
        stats = tensor_stats(tp.name, [tensors[i] for i in keep], reference)
        if self.kind is not None and "density" in tp.params:
            stats.dropped = [zeroed(self.kind, float(tp.params["density"][i]), stats.numel) for i in keep]
        self.labels = self.labels or [labels[i] for i in keep]
        self.relative_to = self.relative_to or relative
        self.tensors[tp.name] = stats

    @property
    def exact(self) -> bool:
        return self.kind in EXACT_SPARSIFIERS

    def model_totals(self) -> dict:
        """Whole-model norms, cosines, sign-conflict rate and zeroed fractions (sums over tensors, fsum)."""
        rows = [self.tensors[n] for n in self.order if n in self.tensors]
        m = len(self.labels or [])
        rows = [r for r in rows if len(r.squares) == m]
        squares = [math.fsum(r.squares[i] for r in rows) for i in range(m)]
        dots = {(i, j): math.fsum(r.dots[i, j] for r in rows) for i in range(m) for j in range(i + 1, m)}
        entries = sum(r.numel for r in rows)
        out = {"entries": entries, "norms": [math.sqrt(s) for s in squares],
               "cosines": cosine_matrix(squares, dots),
               "sign_conflict_rate": sum(r.conflicts for r in rows) / entries if entries else 0.0}
        sparse = [r for r in rows if r.dropped is not None]
        if sparse:
            total = sum(r.numel for r in sparse)
            out["dropped"] = [math.fsum(r.dropped[i] for r in sparse) / total for i in range(m)]
        return out

    def to_json(self) -> dict:
        dropped = None if self.kind is None else {
            "method_sparsifier": self.kind, "exact": self.exact,
            "how": "exact count int(density n) kept" if self.exact
            else "expected fraction 1 - density, from the density parameters (the random masks are not kept)"}
        return {"inputs": self.labels or [], "relative_to": self.relative_to, "dropped": dropped,
                "model": self.model_totals(),
                "tensors": [self.tensors[n].to_json() for n in self.order if n in self.tensors]}
