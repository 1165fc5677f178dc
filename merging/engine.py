"""The streaming merge engine: one output tensor at a time, reads prefetched by a thread pool.

For each planned tensor, largest first: read its inputs (a few tensors ahead, on a small thread pool), move
them to the compute device, merge with `merging.methods.apply.merge_tensor` (float32 compute,
per-tensor seeding), and hand the result to a writer thread. At most `prefetch` tensors per
input are in flight, so peak memory is a few tensors per input, never a whole model.
Vocabulary-indexed tensors (embeddings, `lm_head`) are remapped to the output vocabulary right
after their read (`merging.plan.vocab`), one tensor at a time like the rest.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from merging import profiling
from merging.io.checkpoint import Checkpoint
from merging.io.lora import LoraCheckpoint, LoraTensor
from merging.plan.tensors import MergePlan
from taxonomy.errors import BasinError


@dataclass
class EngineStats:
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float

    def to_json(self) -> dict[str, float | int]:
        return {"tensors": self.tensors, "bytes_read": self.bytes_read, "bytes_written": self.bytes_written,
                "seconds": round(self.seconds, 4)}


# observer(plan, k, inputs, base), called with every planned tensor's inputs as read (`merging.merge_stats`); set
# only inside `observing`, so a merge without one pays a single lookup
Observer = Callable[[MergePlan, int, list[torch.Tensor], "torch.Tensor | None"], None]
_OBSERVER: ContextVar[Observer | None] = ContextVar("basin_merge_observer", default=None)


@contextmanager
def observing(observer: Observer) -> Iterator[None]:
    """Merges run inside this block hand each tensor's inputs to `observer` (on the merging thread), after any
    observer of an enclosing block."""
    outer = _OBSERVER.get()

    def both(plan: MergePlan, k: int, tensors: list[torch.Tensor], base: torch.Tensor | None) -> None:
        outer(plan, k, tensors, base)
        observer(plan, k, tensors, base)

    token = _OBSERVER.set(observer if outer is None else both)
    try:
        yield
    finally:
        _OBSERVER.reset(token)


def resolve_device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise BasinError(f"--device {name!r}: not a torch device (cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BasinError(f"--device {name}: CUDA is not available on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise BasinError(f"--device {name}: MPS is not available on this machine")
    return dev


def run_plan(
    plan: MergePlan,
    checkpoints: Sequence[Checkpoint],
    sink: Callable[[str, torch.Tensor], None],
    *,
    device: str = "cpu",
    prefetch: int = 2,
    read_workers: int = 2,
    progress: bool = True,
    skip: frozenset[str] | set[str] = frozenset(),
) -> EngineStats:
    """Merge every tensor of `plan` over `checkpoints` (indexed like `plan.inputs`), calling `sink`.

    Tensors named in `skip` (already written by an interrupted run) are neither read nor merged.
    """
    return run_plans([plan], checkpoints, [sink], device=device, prefetch=prefetch, read_workers=read_workers,
                     progress=progress, skip=skip)


def run_plans(
    plans: Sequence[MergePlan],
    checkpoints: Sequence[Checkpoint],
    sinks: Sequence[Callable[[str, torch.Tensor], None]],
    *,
    device: str = "cpu",
    prefetch: int = 2,
    read_workers: int = 2,
    progress: bool = True,
    skip: frozenset[str] | set[str] = frozenset(),
) -> EngineStats:
    """Several plans over the same inputs and tensors (a sweep): each tensor is read once, merged per plan."""
    from merging.methods.catalog import get_method
    from merging.methods.chunking import set_chunk_workers
    from merging.methods.lowprec import low_precision_method

    lead = plans[0]
    for p in plans[1:]:
        if [(t.name, t.sources, t.base) for t in p.tensors] != [(t.name, t.sources, t.base) for t in lead.tensors]:
            raise BasinError("run_plans: the plans of a sweep must read the same tensors")
    methods = [low_precision_method(get_method(p.method), p.compute_dtype) for p in plans]
    if len({m.info.needs_lora for m in methods}) > 1:
        raise BasinError("run_plans: a sweep cannot mix methods that read LoRA factors (KnOTS) with others")
    dev = resolve_device(device)
    # Elementwise methods run on cache-sized chunks: one intra-op thread is fastest there, and
    # OpenMP's barriers on a busy machine can cost 100x (measured: 1.6 s vs 4.5 ms for 100 adds).
    # The chunks of a tensor are spread over as many Python threads as torch had intra-op threads.
    threads = torch.get_num_threads()
    chunking = dev.type == "cpu" and all(m.chunked for m in methods)
    if chunking:
        torch.set_num_threads(1)
        old_workers = set_chunk_workers(threads)
    try:
        return _run(plans, methods, checkpoints, sinks, dev, prefetch, read_workers, progress, skip)
    finally:
        torch.set_num_threads(threads)
        if chunking:
            set_chunk_workers(old_workers)


def merge_order(plan: MergePlan, skip: frozenset[str] | set[str], prefetch: int) -> list[int]:
    """The order tensors are merged in (the output's layout stays the plan's): largest first, since the writer's
    work on the last tensor merged is what nothing overlaps (measured: a TIES merge of 4 x 1 GB Llamas, whose
    lm_head comes last in the plan, spent 0.35 s writing it after the last merge, 10% of the run). Tensors whose
    rows are remapped onto another vocabulary are fresh copies, not mapped files, so they lead, `prefetch` other
    tensors apart: no two are in flight together (as in plan order, where embeddings come first, lm_head last)."""
    order = sorted((k for k, tp in enumerate(plan.tensors) if tp.name not in skip),
                   key=lambda k: -plan.tensors[k].nbytes)
    if plan.vocab is None:
        return order
    rest = [k for k in order if not plan.tensors[k].vocab]
    spread: list[int] = []
    for k in (k for k in order if plan.tensors[k].vocab):
        spread += [k] + rest[:prefetch]
        rest = rest[prefetch:]
    return spread + rest


def _run(plans: Sequence[MergePlan], methods: list, checkpoints: Sequence[Checkpoint],
         sinks: Sequence[Callable[[str, torch.Tensor], None]], dev: torch.device, prefetch: int, read_workers: int,
         progress: bool, skip: frozenset[str] | set[str]) -> EngineStats:
    """Read (`prefetch` tensors ahead), merge per plan and hand to the writer thread, in `merge_order`."""
    lead = plans[0]
    start = time.perf_counter()
    bytes_read = 0
    work = merge_order(lead, skip, prefetch)
    read = _reader(lead, checkpoints, dev, methods[0].info.needs_lora)
    bar = _progress_bar(plans, work) if progress else None
    observe = _OBSERVER.get()
    with ThreadPoolExecutor(read_workers, thread_name_prefix="basin-read") as readers, \
            ThreadPoolExecutor(1, thread_name_prefix="basin-write") as writer:
        writes = _Writes(writer, bar)
        queue: deque[Future] = deque()
        todo = iter(work)
        for k in todo:
            queue.append(readers.submit(read, k))
            if len(queue) >= prefetch:
                break
        for step, k in enumerate(work):
            tensors, base, copied = queue.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                queue.append(readers.submit(read, nxt))
            bytes_read += _nbytes(tensors) + (0 if base is None else base.nbytes)
            tensors, base = _on_device(tensors, base, copied, dev)
            if observe is not None:
                observe(lead, k, _dense(tensors, base), base)
            for plan, method, sink in zip(plans, methods, sinks):
                writes.submit(sink, plan.tensors[k].name, _merge_one(plan, method, k, tensors, base))
            del tensors, base
            if bar is not None:
                bar.set_postfix_str(f"{step + 1}/{len(work)} tensors", refresh=False)
        writes.finish()
    if bar is not None:
        bar.close()
    return EngineStats(len(work), bytes_read, writes.written, time.perf_counter() - start)


Read = tuple[list[torch.Tensor], torch.Tensor | None, torch.cuda.Event | None]  # inputs, base, copies done


def _nbytes(tensors: list) -> int:
    return sum(t.nbytes for x in tensors for t in (x.tensors() if isinstance(x, LoraTensor) else [x]))


def _dense(tensors: list, base: torch.Tensor | None) -> list[torch.Tensor]:
    """The inputs as full tensors (an observer's view of LoRA inputs read as factors)."""
    return [x.dense(base).to(base.dtype) if isinstance(x, LoraTensor) else x for x in tensors]


def _lora_tensor(checkpoint: Checkpoint, name: str) -> LoraTensor:
    if not isinstance(checkpoint, LoraCheckpoint):
        raise BasinError(f"{checkpoint.label}: not a base+lora reference; this method merges LoRA factors")
    return checkpoint.lora_tensor(name)


def _reader(lead: MergePlan, checkpoints: Sequence[Checkpoint], dev: torch.device, factors: bool = False
            ) -> Callable[[int], Read]:
    """read(k): the inputs of planned tensor k (rows remapped onto the output vocabulary where planned); on CUDA
    copied to the device on a side stream, with the event that marks the copies done. With `factors`, each input
    is read as a `LoraTensor` (its full tensor if the adapter replaces it, and its LoRA factors)."""
    # CUDA: inputs are copied on a side stream by the reader threads, so the copies overlap the merge of the
    # previous tensor and the merge's own syncs never wait on them (measured on an H200: host-to-device
    # copies were a third of the main thread's time in a TIES merge)
    copy_stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None

    def read(k: int) -> Read:
        started = profiling.start()
        tp = lead.tensors[k]
        if factors:
            tensors = [_lora_tensor(checkpoints[i], name) for i, name in tp.sources]
        else:
            tensors = [checkpoints[i].get(name) for i, name in tp.sources]
        base = None if tp.base is None else checkpoints[tp.base[0]].get(tp.base[1])
        if tp.vocab and lead.vocab is not None:  # embedding / lm_head rows onto the output vocabulary
            if factors:
                raise BasinError(f"{tp.name}: LoRA inputs of one base share its vocabulary; no remap applies")
            tensors, base = lead.vocab.remap_inputs(tp.name, tp.sources, tp.base, tensors, base)
        profiling.stop("read", started, _nbytes(tensors) + (0 if base is None else base.nbytes))
        if copy_stream is None:
            return tensors, base, None
        with torch.cuda.stream(copy_stream):
            tensors = [_to(t, dev, non_blocking=True) for t in tensors]
            base = None if base is None else base.to(dev, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(copy_stream)
        return tensors, base, copied

    return read


def _on_device(tensors: list[torch.Tensor], base: torch.Tensor | None, copied: torch.cuda.Event | None,
               dev: torch.device) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The inputs, ready for the merge on `dev`."""
    if copied is not None:  # the merge's stream waits for the copies; their memory stays its own until used
        compute = torch.cuda.current_stream(dev)
        compute.wait_event(copied)
        parts = [t for x in tensors for t in (x.tensors() if isinstance(x, LoraTensor) else [x])]
        for t in parts + ([] if base is None else [base]):
            t.record_stream(compute)
    elif dev.type != "cpu":
        tensors = [_to(t, dev) for t in tensors]
        base = None if base is None else base.to(dev)
    return tensors, base


def _to(x: torch.Tensor | LoraTensor, dev: torch.device, non_blocking: bool = False) -> torch.Tensor | LoraTensor:
    if isinstance(x, LoraTensor):
        return x.map(lambda t: t.to(dev, non_blocking=non_blocking))
    return x.to(dev, non_blocking=non_blocking)


def _merge_one(plan: MergePlan, method, k: int, tensors: list[torch.Tensor], base: torch.Tensor | None
               ) -> torch.Tensor:
    """Planned tensor k of `plan`, merged on the inputs' device and returned on the CPU, its shape checked."""
    from merging.methods.apply import merge_tensor

    tp = plan.tensors[k]
    out = merge_tensor(method, tp.name, tensors, base, tp.params, plan.seed, tp.out_dtype)
    if out.device.type != "cpu":
        out = out.cpu()
    if tuple(out.shape) != tp.shape:
        raise BasinError(f"{tp.name}: method {plan.method!r} returned shape {tuple(out.shape)}, "
                         f"expected {tp.shape}")
    return out


def _progress_bar(plans: Sequence[MergePlan], work: list[int]):
    from tqdm.auto import tqdm

    total = sum(p.tensors[k].nbytes for p in plans for k in work)
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merge", file=sys.stderr,
                dynamic_ncols=True, leave=False)


def _timed_write(sink: Callable[[str, torch.Tensor], None], name: str, out: torch.Tensor) -> None:
    """sink(name, out), its time and bytes counted as the "write" phase under `merging.profiling`."""
    started = profiling.start()
    sink(name, out)
    profiling.stop("write", started, out.nbytes)


class _Writes:
    """Merged tensors handed to the writer thread, at most two waiting (each one tensor's memory)."""

    def __init__(self, writer: ThreadPoolExecutor, bar) -> None:
        self.writer, self.bar = writer, bar
        self.pending: deque[Future] = deque()
        self.written = 0

    def submit(self, sink: Callable[[str, torch.Tensor], None], name: str, out: torch.Tensor) -> None:
        while len(self.pending) >= 2:
            self.pending.popleft().result()
        self.pending.append(self.writer.submit(_timed_write, sink, name, out))
        self.written += out.nbytes
        if self.bar is not None:
            self.bar.update(out.nbytes)

    def finish(self) -> None:
        for f in self.pending:
            f.result()
