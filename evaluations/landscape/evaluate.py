"""Loss and accuracy at many parameter points: a batched `vmap` pass or a loop, with optional BN re-estimation.

`evaluate_points` is the engine shared by paths (`evaluate_path`) and landscape slices. In batched mode a
chunk of P parameter points is stacked and `torch.func.vmap(functional_call)` evaluates all P models on each
data batch in one pass; in loop mode each point is one `functional_call` per batch. Both give the same loss
(mean over all examples of `loss_fn`, batch losses weighted by batch size) and accuracy (argmax match).

BatchNorm re-estimation (`bn_reset_data`), needed for interpolated ResNets (Jordan et al. 2023, REPAIR;
Frankle et al. 2020 reset BN stats along the path): at each point the running statistics are reset and
recomputed as a cumulative average over `bn_reset_data` in train mode, then the point is evaluated in eval mode.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap
from tqdm import tqdm

from evaluations.results import as_float64, fields_json
from merging.batches import xy_batches
from merging.modes import eval_mode
from taxonomy.errors import BasinError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

AUTO_MAX_PARAMS = 200_000
# Both engines take the points a chunk at a time, a chunk's floats under this many (10 MB), so that its tensors
# reuse the heap memory `_keep_freed_memory` keeps: larger ones would be fresh memory, page-faulted in again for
# every chunk. The loop counts a chunk's stacked points; vmap also the activations of its P models,
# P * (parameters + 2 * widest activation * batch rows).
CHUNK_FLOATS = 2_500_000
HEAP_KEEP_BYTES = 30 << 20


def default_loss(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy for integer labels, mean squared error otherwise."""
    if not y.is_floating_point():
        return nn.functional.cross_entropy(outputs, y)
    return nn.functional.mse_loss(outputs, y)


def iter_batches(data: object, batch_size: int | None = None, generator: torch.Generator | None = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) tensors (one batch, or minibatches, shuffled by `generator`) or an iterable of batches
    (`merging.batches.xy_batches`)."""
    return iter(xy_batches(data, batch_size, generator))


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _accuracy_hits(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if out.dim() >= 2 and not y.is_floating_point() and out.shape[:-1] == y.shape:
        return (out.argmax(-1) == y).sum().to(torch.float64)
    return torch.tensor(float("nan"), dtype=torch.float64)


def _choose_batched(model: nn.Module, batched: bool | str, bn_reset: bool, n_params: int) -> bool:
    if batched == "auto":
        return not bn_reset and not has_batchnorm(model) and n_params <= AUTO_MAX_PARAMS
    if batched and bn_reset:
        raise BasinError("batched=True cannot re-estimate BatchNorm statistics per point; use batched=False")
    return bool(batched)


def _keep_freed_memory() -> None:
    """Let glibc's malloc keep freed blocks up to HEAP_KEEP_BYTES (30 MiB) for reuse, and a free heap top of twice
    that, as it does once the process has freed one such block (mallopt(3), dynamic mmap threshold): before that
    it hands every larger block back to the kernel, and each chunk page-faults its tensors in afresh, so the time
    depended on what the process had run before. Allocating and freeing one untouched block of that size does it
    (no page is touched; a no-op once done, and for other allocators)."""
    torch.empty(HEAP_KEEP_BYTES, dtype=torch.uint8)  # freed at once


def _chunk_size(n_params: int, n_points: int, batch_rows: int, widest: int) -> int:
    per_point = n_params + batch_rows * max(widest, 1) * 2
    return max(1, min(n_points, CHUNK_FLOATS // max(per_point, 1)))


def _widest(model: nn.Module, x: object) -> int:
    """Floats of the largest activation one example produces (forward hooks on the leaf modules; a conv
    layer's output counts channels x positions). Falls back to the widest parameter's leading dimension
    when the model cannot run on one row of `x`."""
    sizes: list[int] = []

    def record(_module: nn.Module, _inputs: object, output: object) -> None:
        if isinstance(output, torch.Tensor):
            sizes.append(output.numel())

    hooks = [m.register_forward_hook(record) for m in model.modules() if not any(True for _ in m.children())]
    try:
        if isinstance(x, torch.Tensor) and len(x) > 0:
            model(x[:1])
    except Exception:  # noqa: BLE001 - only a size estimate; the real pass reports real errors
        sizes.clear()
    finally:
        for h in hooks:
            h.remove()
    if sizes:
        return max(sizes)
    return max((p.shape[0] for p in model.parameters() if p.dim() >= 1), default=1)


def reset_batchnorm(model: nn.Module, data: object) -> None:
    """Recompute BatchNorm running statistics of `model` as the cumulative average over `data`."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for x, _ in iter_batches(data):
            model(x)
    for m, mom in saved:
        m.momentum = mom
    model.eval()


def evaluate_points(
    model: nn.Module,
    n_points: int,
    points: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    data: object,
    loss_fn: LossFn | None = None,
    batched: bool | str = "auto",
    bn_reset_data: object = None,
    chunk: int | None = None,
    progress: bool = False,
    desc: str = "points",
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Loss and accuracy at `n_points` parameter points; `points(idx)` returns the stacked points `idx`.

    Returns (loss[n_points], accuracy[n_points], batched_used).
    """
    loss_fn = loss_fn or default_loss
    _keep_freed_memory()
    first = points(torch.arange(1))
    n_params = sum(v[0].numel() for v in first.values() if v.is_floating_point())
    use_vmap = _choose_batched(model, batched, bn_reset_data is not None, n_params)
    batches = list(iter_batches(data))
    if not batches:
        raise BasinError("data: no batches")
    n_total = sum(len(y) for _, y in batches)
    loss = np.zeros(n_points)
    hits = np.zeros(n_points)
    bar = tqdm(total=n_points, desc=desc, disable=not progress)
    try:
        with torch.no_grad(), eval_mode(model):
            if use_vmap:
                rows = max(len(y) for _, y in batches)
                size = chunk or _chunk_size(n_params, n_points, rows, _widest(model, batches[0][0]))

                def one(p, x, y):
                    out = functional_call(model, p, (x,))
                    return loss_fn(out, y), _accuracy_hits(out, y)

                fn = vmap(one, in_dims=(0, None, None))
                for s in range(0, n_points, size):
                    idx = torch.arange(s, min(s + size, n_points))
                    stacked = points(idx)
                    for x, y in batches:
                        lv, hv = fn(stacked, x, y)
                        loss[idx.numpy()] += lv.double().cpu().numpy() * len(y)
                        hits[idx.numpy()] += hv.cpu().numpy()
                    bar.update(len(idx))
            else:
                # points are still built a chunk at a time (few large tensor ops instead of many small ones
                # per point); each point is then one functional_call per batch
                work = copy.deepcopy(model) if bn_reset_data is not None else model
                size = chunk or max(1, min(n_points, CHUNK_FLOATS // max(n_params, 1)))
                for s in range(0, n_points, size):
                    idx = torch.arange(s, min(s + size, n_points))
                    stacked = points(idx)
                    for j, i in enumerate(idx.tolist()):
                        p = {k: v[j] for k, v in stacked.items()}
                        if bn_reset_data is not None:
                            work.load_state_dict(p, strict=False)
                            reset_batchnorm(work, bn_reset_data)
                            p = {**p, **{k: v.detach() for k, v in work.named_buffers()}}
                        lv = torch.zeros((), dtype=torch.float64)
                        hv = torch.zeros((), dtype=torch.float64)
                        for x, y in batches:
                            out = functional_call(work, p, (x,))
                            lv = lv + loss_fn(out, y).double() * len(y)
                            hv = hv + _accuracy_hits(out, y)
                        loss[i], hits[i] = float(lv), float(hv)
                        bar.update(1)
    finally:
        bar.close()
    return loss / n_total, hits / n_total, use_vmap


def alpha_grid(alphas: int | Iterable[float], lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    if isinstance(alphas, int):
        if alphas < 2:
            raise BasinError(f"alphas={alphas}: need at least 2 points")
        return torch.linspace(lo, hi, alphas, dtype=torch.float64)
    return torch.as_tensor(list(alphas) if not isinstance(alphas, torch.Tensor) else alphas, dtype=torch.float64)


@dataclass
class PathResult:
    alphas: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray
    batched: bool = False

    def __post_init__(self) -> None:  # evaluations.results: result arrays are numpy float64
        self.alphas, self.loss, self.accuracy = (as_float64(v) for v in (self.alphas, self.loss, self.accuracy))

    @property
    def error(self) -> np.ndarray:
        return 1.0 - self.accuracy

    def to_json(self) -> dict:
        """The fields (a subclass's too) and `error`."""
        return fields_json(self) | {"error": self.error.tolist()}


def evaluate_path(
    model: nn.Module,
    path: Callable[[float], dict[str, torch.Tensor]],
    data: object,
    alphas: int | Iterable[float] = 25,
    loss_fn: LossFn | None = None,
    batched: bool | str = "auto",
    bn_reset_data: object = None,
    progress: bool = False,
) -> PathResult:
    """Loss and accuracy of `model` with parameters `path(alpha)` at each alpha (K evenly spaced when an int).

    A `CheckpointPath` (`linear_path` / `chain_path` of checkpoint references) is streamed instead: its
    checkpoints stay memory-mapped and each point is written into `model` itself (`evaluations.lm_path`), measured
    with the model's objective (`objective_for`) on dict batches such as `load_text_data`'s, or `loss_fn` on
    (x, y) batches; the result then also carries tokens, examples and the objective's name."""
    from evaluations.landscape.checkpoint_paths import CheckpointPath

    if isinstance(path, CheckpointPath):
        return _streamed(model, path, data, alphas, loss_fn, bn_reset_data, progress)
    grid = alpha_grid(alphas)
    if hasattr(path, "stacked"):
        def points(idx):
            return path.stacked(grid[idx])
    else:
        def points(idx):
            pts = [path(float(grid[i])) for i in idx]
            return {k: torch.stack([p[k] for p in pts]) for k in pts[0]}
    loss, acc, used = evaluate_points(model, len(grid), points, data, loss_fn, batched, bn_reset_data,
                                      progress=progress, desc="path")
    return PathResult(alphas=grid.numpy(), loss=loss, accuracy=acc, batched=used)


def _streamed(model: nn.Module, path, data: object, alphas, loss_fn: LossFn | None, bn_reset_data: object,
              progress: bool) -> PathResult:
    """`evaluate_path` for a CheckpointPath (see there)."""
    from evaluations.lm_path import evaluate_weighted_path

    if loss_fn is not None:
        raise BasinError("a streamed checkpoint path measures the model's own objective: loss_fn is not supported "
                         "there")
    batches = list(getattr(data, "batches", data))  # TextData from evaluations.text_data, or a list of batches
    if not (batches and isinstance(batches[0], dict)):
        batches = list(iter_batches(data))
    return evaluate_weighted_path(model, path, batches, alphas, progress=progress, bn_reset_data=bn_reset_data)
