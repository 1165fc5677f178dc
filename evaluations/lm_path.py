"""The loss of a model at weighted combinations of memory-mapped checkpoints, streamed into one live model.

A point is a weight vector w over N sources (checkpoints, or seeded random directions around one):
theta = sum_i w_i source_i. `write_point` computes it in float64, one row chunk of one tensor at a time
(`CHUNK_ELEMENTS`; float32 targets from float32/bf16 checkpoints in one pass of the compiled `point_chunk`,
merging/methods/_fused.c, with the bits of the torch ops), into the model's own tensor, so a path holds one
model plus a few chunks,
whatever N: checkpoints stay memory-mapped (`merging.io.checkpoint.open_checkpoint`, file pages, not anonymous
memory). The model is then measured with its `Objective` (`evaluations.model_losses.objective_for`, or
`supervised()` for (x, y) batches): row-weighted mean loss (float64 sums) and, for cross-entropy, accuracy.

- `evaluate_checkpoint_points(model, sources, weights, data)`: the loss at each row of `weights` [P, N].
- `evaluate_checkpoint_path(model, a, b, data, alphas)`: the line (1 - alpha) A + alpha B; `evaluate_weighted_path`
  any `CheckpointPath` (chain, Bezier through a third checkpoint). Results are `PathResult`s, so
  `evaluations.landscape.barrier` applies unchanged.
- `plane_weights`: Garipov et al. 2018 Sec. 5's plane through three checkpoints, as weights over them.
- `SeededDirection`: a filter-normalised Gaussian direction (Li et al. 2018, Eq. 1) regenerated chunk by chunk
  from its seed, so a landscape slice needs no copy of its directions.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from evaluations.landscape.evaluate import PathResult, alpha_grid, reset_batchnorm
from evaluations.load_names import FusedView, fused_view
from evaluations.models import check_names, tied_groups
from evaluations.objective import Objective, supervised
from evaluations.results import as_float64
from taxonomy.errors import CheckpointError, DataError, ProbeError

CHUNK_ELEMENTS = 1 << 20  # float64 elements per chunk of a point (8 MB): bounds the arithmetic's extra memory


@dataclass
class CheckpointPathResult(PathResult):
    """A path's loss and accuracy plus what was measured: `tokens` = output rows, `unit` = what a row is
    (predicted or masked tokens, examples, pairs: the objective's `unit`), `examples` = input rows, `objective` =
    the loss's name."""

    perplexity: np.ndarray = field(default_factory=lambda: np.zeros(0))
    tokens: int = 0
    examples: int = 0
    objective: str = ""
    unit: str = "rows"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.perplexity = as_float64(self.perplexity)


LMPathResult = CheckpointPathResult  # the name of the causal-LM-only first version


@dataclass(frozen=True)
class Measure:
    loss: float
    accuracy: float
    rows: int
    examples: int


class CheckpointSource:
    """Rows of the model's tensors read from one memory-mapped checkpoint (names mapped by `check_names`)."""

    def __init__(self, model: nn.Module, ref: object, label: str, allow_pickle: bool = False):
        from merging.io.checkpoint import open_checkpoint

        self.ckpt = open_checkpoint(ref, allow_pickle=allow_pickle,
                                    label=None if isinstance(ref, (str, Path)) else label)
        self.label = self.ckpt.label
        self.ckpt = fused_view(model, self.ckpt)
        self.names = check_names(model, self.ckpt, self.label)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        if isinstance(self.ckpt, FusedView):  # a fused tensor reads only the parts of these rows
            return self.ckpt.rows(self.names[name], start, stop)
        t = self.ckpt.get(self.names[name])
        return t if t.dim() == 0 else t[start:stop]


def _seed_of(*parts: object) -> int:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class SeededDirection:
    """A Gaussian direction around `center` (a CheckpointSource), filter-normalised row by row (Li et al. 2018,
    Eq. 1: each row -- a Linear output unit, a conv output channel -- scaled to the norm of the center's row).

    Chunk c of tensor `name` is drawn from a generator seeded by (seed, index, name, c), so the direction is a
    pure function of the seed. Only `parameters` move; 1-D tensors are zero (`ignore="biasbn"`, as Li et al.)
    or equal to the center (`ignore=None`, what their code does); buffers never move."""

    def __init__(self, center: CheckpointSource, parameters: set[str], seed: int, index: int,
                 ignore: str | None = "biasbn"):
        self.center, self.parameters, self.seed, self.index, self.ignore = center, parameters, seed, index, ignore
        self.label = f"direction {index} (seed {seed})"

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        c = self.center.rows(name, start, stop).to(torch.float64)
        if name not in self.parameters or c.dim() <= 1:
            return c if (name in self.parameters and self.ignore is None) else torch.zeros_like(c)
        gen = torch.Generator().manual_seed(_seed_of(self.seed, self.index, name, start))
        d = torch.randn(c.shape, generator=gen, dtype=torch.float32).to(torch.float64)
        dn = d.reshape(len(d), -1).norm(dim=1)
        cn = c.reshape(len(c), -1).norm(dim=1)
        return d * (cn / dn.clamp(min=1e-30)).reshape(-1, *([1] * (d.dim() - 1)))


def unique_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of each storage of the state dict once (a tied head is written with its embedding)."""
    state = model.state_dict()
    groups = tied_groups(model)
    return [(name, t) for name, t in state.items() if groups[name][0] == name]


def _row_chunks(t: torch.Tensor) -> list[tuple[int, int]]:
    if t.dim() == 0:
        return [(0, 1)]
    per_row = max(1, t[0].numel()) if len(t) else 1
    step = max(1, CHUNK_ELEMENTS // per_row)
    return [(s, min(s + step, len(t))) for s in range(0, len(t), step)]


def _not_finite(sources: Sequence, name: str, start: int, stop: int) -> CheckpointError:
    for src in sources:
        if not bool(torch.isfinite(src.rows(name, start, stop)).all()):
            return CheckpointError(f"{src.label}: tensor {name!r} has NaN or infinite values")
    return CheckpointError(f"tensor {name!r} is not finite at this point (weights too large?)")


def _work_buffers(tensors: list[tuple[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float64 buffers of one chunk (the sum and the current term), reused for every tensor of a point so the
    allocator never churns (fresh temporaries per tensor left several MB of freed heap per point behind)."""
    def chunk_numel(t: torch.Tensor) -> int:
        per_row = t.numel() // len(t) if t.dim() and len(t) else 1
        return max(((stop - start) * per_row for start, stop in _row_chunks(t)), default=1)

    largest = max((chunk_numel(t) for _, t in tensors if t.is_floating_point()), default=1)
    return torch.empty(largest, dtype=torch.float64), torch.empty(largest, dtype=torch.float64)


def _compiled_terms(target: torch.Tensor, sources: Sequence, weights: Sequence[float], name: str, start: int,
                    stop: int) -> tuple[list[torch.Tensor], tuple] | None:
    """The chunk's rows (held while the kernel reads them) and the compiled kernel's (address, dtype, weight)
    terms, or None where the torch ops run: no kernel, a target other than a float32 CPU tensor, or a source that
    is not a checkpoint stored in float32 or bf16 on the CPU."""
    from merging.methods import kernels

    if kernels.compiled is None or target.device.type != "cpu" or target.dtype != torch.float32 \
            or not target.is_contiguous() or not all(isinstance(src, CheckpointSource) for src in sources):
        return None
    rows = [src.rows(name, start, stop) for src in sources]
    if not kernels.readable(rows, target.numel()):
        return None
    return rows, tuple((kernels.address(r), kernels.DTYPE_CODES[r.dtype], float(w)) for r, w in zip(rows, weights))


def _torch_chunk(target: torch.Tensor, sources: Sequence, weights: Sequence[float], name: str, start: int,
                 stop: int, buffers: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """The chunk in float64 torch ops (the sum, then add_(term, alpha=w): a fused multiply-add); whether finite."""
    acc, term = (b[: target.numel()].view(target.shape) for b in buffers)
    acc.copy_(sources[0].rows(name, start, stop)).mul_(weights[0])
    for src, w in zip(sources[1:], weights[1:]):
        acc.add_(term.copy_(src.rows(name, start, stop)), alpha=w)
    finite = math.isfinite(float(acc.sum()))  # a NaN/inf anywhere; float64 cannot overflow here
    target.copy_(acc)
    return finite


def write_point(model: nn.Module, sources: Sequence, weights: Sequence[float]) -> None:
    """theta = sum_i weights[i] sources[i] into `model`'s tensors in place: float64 arithmetic, one row chunk at a
    time (one pass of the compiled `point_chunk` where it can read the chunk, else torch ops; the same bits);
    integer tensors (counters) are taken from sources[0]. Compiled chunks run on up to torch's thread count of
    threads (the kernel releases the GIL; each chunk owns its slice, so the bits do not depend on the count), at
    most two per thread in flight; a non-finite chunk is reported in chunk order."""
    from merging.methods import kernels

    tensors = unique_tensors(model)
    buffers = None  # the torch path's, made when a chunk needs them
    threads = max(1, min(2, torch.get_num_threads()))
    pending: deque = deque()  # (future, terms kept alive, name, start, stop), in chunk order

    def settle(keep: int) -> None:
        while len(pending) > keep:
            future, _, name, start, stop = pending.popleft()
            if not future.result():
                raise _not_finite(sources, name, start, stop)

    with torch.no_grad(), ThreadPoolExecutor(threads) as pool:
        for name, t in tensors:
            if not t.is_floating_point():
                t.copy_(sources[0].rows(name, 0, len(t) if t.dim() else 1))
                continue
            for start, stop in _row_chunks(t):
                target = t if t.dim() == 0 else t[start:stop]
                compiled = _compiled_terms(target, sources, weights, name, start, stop)
                if compiled is not None:
                    future = pool.submit(kernels.compiled.point_chunk, kernels.address(target), target.numel(),
                                         compiled[1])
                    pending.append((future, compiled, name, start, stop))
                    settle(2 * threads)
                    continue
                buffers = buffers or _work_buffers(tensors)
                finite = _torch_chunk(target, sources, weights, name, start, stop, buffers)
                if not finite:
                    settle(0)  # an earlier chunk's problem first
                    raise _not_finite(sources, name, start, stop)
        settle(0)


def _examples(batch: object) -> int:
    first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return len(first)


def objective_of(model: nn.Module, data: Sequence, objective: Objective | None = None) -> Objective:
    """`objective`, else the model's own (`objective_for`) for dict batches, else `supervised()` for (x, y)."""
    if objective is not None:
        return objective
    if not data:
        raise DataError("data: no batches")
    if isinstance(data[0], dict):
        from evaluations.model_losses import objective_for

        return objective_for(model)
    y = data[0][1]
    return supervised("mse" if y.is_floating_point() else "cross_entropy")


def loss_sum64(kind: str, outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """n x the standard mean loss of `kind` on n rows, per-row losses summed in float64 (cross-entropy: per row;
    squared error: per element, divided by the elements per row, as `F.mse_loss`'s mean over all of them)."""
    if kind == "cross_entropy":
        return float(F.cross_entropy(outputs, targets, reduction="none").to(torch.float64).sum())
    per_row = outputs[0].numel() if len(outputs) else 1
    return float(F.mse_loss(outputs, targets, reduction="none").to(torch.float64).sum()) / per_row


def measure(model: nn.Module, objective: Objective, data: Sequence) -> Measure:
    """Row-weighted mean loss over `data` (float64 sums) and argmax accuracy (NaN for a squared error)."""
    total, hits, rows, examples = 0.0, 0, 0, 0
    with torch.no_grad():
        for batch in data:
            out, target = objective.predict(model, batch)
            n = int(out.shape[0])
            total += loss_sum64(objective.loss, out, target)
            if objective.loss == "cross_entropy":
                hits += int((out.argmax(-1) == target).sum())
            rows, examples = rows + n, examples + _examples(batch)
    if rows == 0:
        raise DataError("the data has no rows to measure (e.g. every text block is a single token)")
    accuracy = hits / rows if objective.loss == "cross_entropy" else float("nan")
    return Measure(loss=total / rows, accuracy=accuracy, rows=rows, examples=examples)


def open_sources(model: nn.Module, refs: Sequence[object], allow_pickle: bool = False) -> list[CheckpointSource]:
    """Each reference opened memory-mapped and checked against `model` (a mismatch names the tensor)."""
    labels = [chr(ord("A") + i) if i < 26 else f"checkpoint {i}" for i in range(len(refs))]
    return [r if isinstance(r, CheckpointSource) else CheckpointSource(model, r, lab, allow_pickle)
            for r, lab in zip(refs, labels)]


def evaluate_checkpoint_points(model: nn.Module, sources: Sequence[object], weights: np.ndarray, data: Sequence,
                               objective: Objective | None = None, progress: bool = False,
                               desc: str = "points", bn_reset_data: object = None) -> tuple[list[Measure], Objective]:
    """The model's loss at theta_p = sum_i weights[p, i] sources[i] for each row p (sources: checkpoint references,
    CheckpointSources or SeededDirections). The model's weights are overwritten (it holds the last point). With
    `bn_reset_data`, BatchNorm statistics are re-estimated on it at each point (`reset_batchnorm`; Jordan et al.
    2023) before the point is measured."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 2 or weights.shape[1] != len(sources) or not np.isfinite(weights).all():
        raise CheckpointError(f"weights: expected a finite [points, {len(sources)}] array, got shape "
                              f"{weights.shape}")
    objective = objective_of(model, data, objective)
    srcs = [s if isinstance(s, (CheckpointSource, SeededDirection)) else open_sources(model, [s])[0]
            for s in sources]
    out = []
    for w in tqdm(weights.tolist(), desc=desc, disable=not progress):
        write_point(model, srcs, w)
        if bn_reset_data is not None:
            reset_batchnorm(model, bn_reset_data)
        out.append(measure(model, objective, data))
        if not math.isfinite(out[-1].loss):
            raise ProbeError(f"the loss at weights {[round(x, 6) for x in w]} is not finite ({out[-1].loss}); "
                             "with --dtype float16/bfloat16 try float32")
    return out, objective


def path_result(alphas: np.ndarray, measures: list[Measure], objective: Objective) -> CheckpointPathResult:
    loss = np.array([m.loss for m in measures])
    ppl = np.exp(loss) if objective.loss == "cross_entropy" else np.full(len(loss), np.nan)
    return CheckpointPathResult(alphas=np.asarray(alphas), loss=loss, accuracy=np.array([m.accuracy for m in measures]),
                                perplexity=ppl, tokens=measures[0].rows, examples=measures[0].examples,
                                objective=objective.name, unit=objective.unit)


def evaluate_weighted_path(model: nn.Module, path, data: Sequence, alphas: int | Iterable[float] = 25,
                           objective: Objective | None = None, progress: bool = False,
                           allow_pickle: bool = False, bn_reset_data: object = None) -> CheckpointPathResult:
    """Loss along a `CheckpointPath` (evaluations.landscape.checkpoint_paths), streamed (`bn_reset_data`: as
    `evaluate_checkpoint_points`)."""
    grid = alpha_grid(alphas)
    weights = np.array([path.weights(a) for a in grid.tolist()])
    sources = open_sources(model, path.refs, allow_pickle)
    measures, objective = evaluate_checkpoint_points(model, sources, weights, data, objective, progress, "path",
                                                     bn_reset_data)
    return path_result(grid.numpy(), measures, objective)


def evaluate_checkpoint_path(model: nn.Module, ckpt_a: object, ckpt_b: object, data: Sequence,
                             alphas: int | Iterable[float] = 25, objective: Objective | None = None,
                             progress: bool = False) -> CheckpointPathResult:
    """Loss, accuracy (for a language model: 1 - next-token error) and perplexity of `model` at each alpha on
    the line A -> B. The model's own weights are overwritten (it holds theta(alphas[-1]) on return)."""
    from evaluations.landscape.checkpoint_paths import CheckpointPath

    grid = alpha_grid(alphas)
    if ((grid < 0) | (grid > 1)).any() or torch.isnan(grid).any():
        raise CheckpointError(f"alphas={grid.tolist()}: every alpha must lie in [0, 1]")
    return evaluate_weighted_path(model, CheckpointPath([ckpt_a, ckpt_b]), data, grid, objective, progress)


def gram64(model: nn.Module, origin: CheckpointSource, others: Sequence[CheckpointSource]) -> np.ndarray:
    """G[i, j] = <other_i - origin, other_j - origin> over every floating tensor, accumulated in float64."""
    g = np.zeros((len(others), len(others)))
    for name, t in unique_tensors(model):
        if not t.is_floating_point():
            continue
        for start, stop in _row_chunks(t):
            o = origin.rows(name, start, stop).to(torch.float64).reshape(-1)
            diffs = torch.stack([s.rows(name, start, stop).to(torch.float64).reshape(-1) - o for s in others])
            g += (diffs @ diffs.T).numpy()
    return g


@dataclass(frozen=True)
class PlaneWeights:
    """The plane through origin O and checkpoints A, B (Garipov et al. 2018, Sec. 5): orthonormal axes
    u = (A - O)/|A - O|, v = the unit part of B - O orthogonal to u; `points` = in-plane (x, y) of O, A, B."""

    norm_a: float
    along: float  # <B - O, u>
    norm_v: float
    points: np.ndarray

    def weights(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """[P, 3] weights over (O, A, B) of the points O + x u + y v."""
        ka = x / self.norm_a - y * self.along / (self.norm_a * self.norm_v)
        kb = y / self.norm_v
        return np.stack([1.0 - ka - kb, ka, kb], axis=1)


def plane_weights(model: nn.Module, origin: CheckpointSource, a: CheckpointSource,
                  b: CheckpointSource) -> PlaneWeights:
    """The plane through three checkpoints, from their float64 Gram matrix (one streamed pass)."""
    g = gram64(model, origin, [a, b])
    norm_a = math.sqrt(g[0, 0])
    if norm_a == 0:
        raise CheckpointError(f"{origin.label} and {a.label} are the same point: no plane through them")
    along = g[0, 1] / norm_a
    norm_v = math.sqrt(max(g[1, 1] - along**2, 0.0))
    if norm_v <= 1e-12 * math.sqrt(g[1, 1]):
        raise CheckpointError(f"{origin.label}, {a.label} and {b.label} are collinear: no plane through them")
    pts = np.array([[0.0, 0.0], [norm_a, 0.0], [along, norm_v]])
    return PlaneWeights(norm_a=norm_a, along=along, norm_v=norm_v, points=pts)
