"""Per-task outputs beside a merged model, for methods whose tasks are rebuilt at inference from the task's
identity (TALL masks, EMR-merging: `RegisteredMethod.task_outputs`), and the rebuilding.

While the engine streams, each tensor's inputs go (through `merging.engine.observing`) to the method's
`TaskOutputs.compute`, whose tensors (the shared task vector, every task's bool mask, EMR's per-tensor sums) a
second `ShardWriter` writes into OUT/task_outputs/ as they come: one tensor's worth in memory, never a model's.
Keys are "KIND/TENSOR" ("task_vector/model.layers.0.mlp.up_proj.weight", "mask.2/...", "l1/..."); tasks.json
names the method, the base and the tasks in the recipe's order. `task_tensors(OUT, t)` streams task t's
tensors: base + c_t mask_t * task_vector (c_t = 1 for TALL masks, EMR's rescaler for EMR).
These merges do not resume (the side file is written in one pass) and do not run in parameter sweeps.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from merging.engine import observing
from merging.io.checkpoint import Checkpoint, open_checkpoint
from merging.io.writer import ShardWriter
from merging.methods.registry import Layout, RegisteredMethod, TaskOutputs
from merging.plan.tensors import MergePlan
from taxonomy.errors import BasinError

TASK_FOLDER = "task_outputs"
MANIFEST = "tasks.json"


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


@contextmanager
def recording_task_outputs(method: RegisteredMethod, plan: MergePlan, writer: ShardWriter) -> Iterator[None]:
    """Inside this block, merges of `plan` also write the method's per-task outputs into the output folder."""
    spec = method.task_outputs
    if spec is None:
        yield
        return
    side = ShardWriter(writer.tmp / TASK_FOLDER, side_layout(spec, plan))

    def observe(p: MergePlan, k: int, tensors: list[torch.Tensor], base: torch.Tensor | None) -> None:
        tp = p.tensors[k]
        if not tp.out_dtype.is_floating_point:
            return
        b = base.to(torch.float32)
        task_vectors = [t.to(torch.float32) - b for t in tensors]
        for key, value in spec.compute(task_vectors, tp.params, tp.out_dtype).items():
            side.add(f"{key}/{tp.name}", value.cpu())

    try:
        with observing(observe):
            yield
        side.write_text(MANIFEST, json.dumps(manifest(method, plan), indent=2) + "\n")
        side.close()
    except BaseException:
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
