"""Per-task outputs beside a merged model, for methods whose tasks are rebuilt at inference from the task's
identity (TALL masks, EMR-merging: `RegisteredMethod.task_outputs`), and the rebuilding.

While the engine streams, each tensor's inputs go (through `merging.engine.observing`) to the method's
`TaskOutputs.stream`, which computes the shared task vector and every task's bool mask chunk by chunk (EMR: also
the per-block sums of its rescalers); a second `ShardWriter` writes them into OUT/task_outputs/ slab by slab
(`SLAB_BLOCKS` chunks) on its own thread as they come, so memory holds a few slabs, never a whole tensor's side
outputs (a method without `stream`: `TaskOutputs.compute` on the whole tensor).
Keys are "KIND/TENSOR" ("task_vector/model.layers.0.mlp.up_proj.weight", "mask.2/...", "l1/..."); tasks.json
names the method, the base and the tasks in the recipe's order. `task_tensors(OUT, t)` streams task t's
tensors: base + c_t mask_t * task_vector (c_t = 1 for TALL masks, EMR's rescaler for EMR).
These merges do not resume (the side file is written in one pass) and do not run in parameter sweeps.
"""

from __future__ import annotations

import functools
import json
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from merging import profiling
from merging.engine import observing
from merging.io.checkpoint import Checkpoint, open_checkpoint
from merging.io.writer import ShardWriter
from merging.methods.chunking import chunk_workers, map_threads
from merging.methods.registry import Layout, RegisteredMethod, TaskOutputs
from merging.plan.tensors import MergePlan
from taxonomy.errors import BasinError

TASK_FOLDER = "task_outputs"
MANIFEST = "tasks.json"
SLAB_BLOCKS = 16  # chunks (sum blocks) per slab: 4M entries, 24 MB of a bf16 task vector and 4 masks
SLABS_IN_FLIGHT = 2  # slabs waiting for the side writer (their buffers are reused once written)


def side_layout(spec: TaskOutputs, plan: MergePlan) -> Layout:
    """Every per-task tensor of the merge, from the plan alone."""
    out: Layout = []
    for tp in plan.tensors:
        if tp.out_dtype.is_floating_point:
            out += [(f"{key}/{tp.name}", shape, dtype)
                    for key, shape, dtype in spec.layout(tp.shape, len(tp.sources), tp.out_dtype)]
    return out


def manifest(method: RegisteredMethod, plan: MergePlan) -> dict[str, object]:
    first = plan.tensors[0]
    return {"method": method.info.name, "base": plan.inputs[first.base[0]] if first.base is not None else None,
            "tasks": [plan.inputs[i] for i, _ in first.sources], "rescale": method.task_outputs.rescale}


class SideWrites:
    """Writes handed to one thread in order, at most SLABS_IN_FLIGHT slabs waiting; each slab's buffers (a task
    vector and n masks of a slab's entries) come back for reuse once written, so they are faulted in once per merge,
    not once per slab."""

    def __init__(self, side: ShardWriter) -> None:
        self.side = side
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="basin-side-write")
        self.pending: deque[tuple[Future, Any]] = deque()
        self.free: list[tuple[torch.Tensor, list[torch.Tensor]]] = []

    def buffers(self, dtype: torch.dtype, n: int, size: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """A free slab's buffers (a task vector in `dtype`, n bool masks, `size` entries each)."""
        while len(self.pending) >= SLABS_IN_FLIGHT:
            self._retire()
        for i, (vector, masks) in enumerate(self.free):
            if vector.dtype == dtype and len(masks) == n and vector.numel() == size:
                del self.free[i]
                return vector, masks
        return torch.empty(size, dtype=dtype), [torch.empty(size, dtype=torch.bool) for _ in range(n)]

    def submit(self, fn: Callable[[], None], buffers: Any = None) -> None:
        self.pending.append((self.pool.submit(self._timed, fn), buffers))

    @staticmethod
    def _timed(fn: Callable[[], None]) -> None:
        started = profiling.start()
        fn()
        profiling.stop("side_write", started)

    def _retire(self) -> None:
        future, buffers = self.pending.popleft()
        if buffers is not None:
            self.free.append(buffers)
        future.result()

    def finish(self) -> None:
        """Wait for every write (raising the first error)."""
        try:
            while self.pending:
                self._retire()
        finally:
            self.close()

    def close(self) -> None:
        """Wait for the writes in flight (their errors dropped: the side output is being aborted) and stop."""
        for future, _ in self.pending:
            future.exception()
        self.pending.clear()
        self.pool.shutdown(wait=True)


def stream_side_outputs(spec: TaskOutputs, writes: SideWrites, name: str, tensors: list[torch.Tensor],
                        base: torch.Tensor, params: dict[str, Any], dtype: torch.dtype) -> None:
    """Tensor `name`'s side outputs, chunk by chunk (`spec.stream`, the chunks of a slab spread over the chunk
    workers), each slab handed to `writes` as it is done; EMR's per-block sums are folded at the end."""
    stream = spec.stream([t.reshape(-1) for t in tensors], base.reshape(-1), params, dtype)
    numel, n, block = base.numel(), len(tensors), stream.block
    keys = [f"task_vector/{name}"] + [f"mask.{t}/{name}" for t in range(n)]
    side, slab = writes.side, SLAB_BLOCKS * block
    block_sums: list[tuple[float, ...]] = []
    started = profiling.start()
    for first in range(0, numel, slab):
        size = min(numel, first + slab) - first
        buffers = writes.buffers(dtype, n, slab)
        vector, masks = buffers[0][:size], [m[:size] for m in buffers[1]]

        def chunk(c: int, first: int = first, size: int = size, vector: torch.Tensor = vector,
                  masks: list[torch.Tensor] = masks) -> tuple[float, ...]:
            a, z = c * block, min(size, (c + 1) * block)
            return stream.chunk(first + a, first + z, vector[a:z], [m[a:z] for m in masks])

        block_sums += map_threads(chunk, -(-size // block), chunk_workers())
        parts = [vector] + masks
        writes.submit(functools.partial(_write_parts, side, keys, first, parts), buffers)
    if numel == 0:
        writes.submit(functools.partial(_write_parts, side, keys, 0, [torch.empty(0, dtype=dtype)] +
                                        [torch.empty(0, dtype=torch.bool)] * n))
    finals = stream.finish(block_sums, numel)
    profiling.stop("side", started, sum(t.nbytes for t in tensors) + base.nbytes)
    for key, value in finals.items():
        writes.submit(functools.partial(side.add, f"{key}/{name}", value))


def _write_parts(side: ShardWriter, keys: list[str], start: int, parts: list[torch.Tensor]) -> None:
    for key, part in zip(keys, parts):
        side.add_part(key, start, part)


@contextmanager
def recording_task_outputs(method: RegisteredMethod, plan: MergePlan, writer: ShardWriter) -> Iterator[None]:
    """Inside this block, merges of `plan` also write the method's per-task outputs into the output folder."""
    spec = method.task_outputs
    if spec is None:
        yield
        return
    side = ShardWriter(writer.tmp / TASK_FOLDER, side_layout(spec, plan), hashed=False, drop_behind=True)
    writes = SideWrites(side)

    def observe(p: MergePlan, k: int, tensors: list[torch.Tensor], base: torch.Tensor | None) -> None:
        tp = p.tensors[k]
        if not tp.out_dtype.is_floating_point:
            return
        if spec.stream is not None:
            stream_side_outputs(spec, writes, tp.name, tensors, base, tp.params, tp.out_dtype)
            return
        b = base.to(torch.float32)
        task_vectors = [t.to(torch.float32) - b for t in tensors]
        for key, value in spec.compute(task_vectors, tp.params, tp.out_dtype).items():
            side.add(f"{key}/{tp.name}", value.cpu())

    try:
        with observing(observe):
            yield
        writes.finish()
        side.write_text(MANIFEST, json.dumps(manifest(method, plan), indent=2) + "\n")
        side.close()
    except BaseException:
        writes.close()
        side.abort()
        raise


def read_manifest(out_dir: str | Path) -> dict:
    path = Path(out_dir) / TASK_FOLDER / MANIFEST
    if not path.is_file():
        raise BasinError(f"{out_dir}: no {TASK_FOLDER}/{MANIFEST} (not the output of a tall_masks or emr merge)")
    return json.loads(path.read_text())


def task_index(info: dict, task: int | str) -> int:
    """The position of `task` (an index, or a model reference as the recipe wrote it) among the tasks."""
    tasks = info["tasks"]
    if isinstance(task, str) and task in tasks:
        return tasks.index(task)
    if isinstance(task, int) and not isinstance(task, bool) and 0 <= task < len(tasks):
        return task
    raise BasinError(f"task {task!r}: not one of the {len(tasks)} tasks (0..{len(tasks) - 1} or {tasks})")


def rescaler(side: Checkpoint, names: list[str], task: int) -> float:
    """EMR's c_t: sum over tensors of mean |tau_t| over sum of mean |M_t tau_uni| (float64), 1 when that is 0."""
    num = den = 0.0
    for name in names:
        numel = float(side.get(f"numel/{name}")[0])
        num += float(side.get(f"l1/{name}")[task]) / numel
        den += float(side.get(f"masked_l1/{name}")[task]) / numel
    return num / den if den > 0 else 1.0


def task_tensors(out_dir: str | Path, task: int | str, base: object = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Task `task`'s model, tensor by tensor: base + c_t mask_t * task_vector, in the output's dtype. `base`: the
    merge's base (default: the reference tasks.json records), any form `open_checkpoint` opens."""
    info = read_manifest(out_dir)
    t = task_index(info, task)
    side = open_checkpoint(Path(out_dir) / TASK_FOLDER)
    base_ckpt = open_checkpoint(info["base"] if base is None else base)
    names = [key.split("/", 1)[1] for key in side.names() if key.startswith("task_vector/")]
    scale = rescaler(side, names, t) if info["rescale"] else 1.0
    for name in names:
        vector = side.get(f"task_vector/{name}")
        b = base_ckpt.get(name)
        if b.shape != vector.shape:
            raise BasinError(f"{name}: base has shape {tuple(b.shape)}, the task vector {tuple(vector.shape)}")
        mask = side.get(f"mask.{t}/{name}")
        yield name, (b.to(torch.float32) + scale * (vector.to(torch.float32) * mask)).to(vector.dtype)
