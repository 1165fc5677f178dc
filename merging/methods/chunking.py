"""Running a merge method over cache-sized chunks of one tensor.

Two kinds of methods (`merging.methods.registry.RegisteredMethod`) run here:
- elementwise methods (`elementwise=True`): output entry j depends only on the inputs' entries j,
  so `fn` itself runs on each chunk;
- two-phase methods (`fn` has `prepare` and `apply`): `prepare(inputs, params, rng)` gathers whole-tensor
  statistics in passes over the chunks (TIES' top-k thresholds, DARE's drop masks and L1 sums), then
  `apply(chunks, base_chunk, params, state, chunk_index)` is elementwise given that state.

Chunks are float32 copies of `CHUNK_ELEMENTS` consecutive entries of the flat inputs (converted from
the stored dtype one chunk at a time), so the working set stays a few MB whatever the tensor size,
and the inputs are never converted to float32 whole. Chunk boundaries are fixed by the tensor size
alone, and every per-chunk result is combined in chunk order, so results do not depend on the number
of worker threads (torch ops release the GIL, so threads do run in parallel).

Where the compiled kernel applies (the method's `fused(inputs, params)` for elementwise methods,
`fused(inputs, params, state)` for two-phase ones; merging/methods/kernels.py), a chunk is merged by one
call that reads the stored inputs directly, with no float32 copies.

On an accelerator a chunk is up to `ACCELERATOR_CHUNK_ELEMENTS` entries (a whole weight matrix, in
practice): cache-sized chunks there cost a kernel launch per operation and chunk and a device sync per
count (measured on an H200: a TIES merge of 4 x 1 GB bf16 models took 4.96 s with them, 2.42 s with whole
matrices). Methods give the same results for any chunk size (tested on the CPU with large chunks), which is
what lets the size differ between devices.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from merging import profiling

CHUNK_ELEMENTS = 1 << 18
ACCELERATOR_CHUNK_ELEMENTS = 1 << 26  # a multiple of CHUNK_ELEMENTS
T = TypeVar("T")
_pools: dict[int, ThreadPoolExecutor] = {}
_workers = 1


def set_chunk_workers(workers: int) -> int:
    """Spread the chunks of one tensor over `workers` threads; returns the previous value."""
    global _workers
    old, _workers = _workers, max(1, int(workers))
    return old


def chunk_workers() -> int:
    """The threads the chunks of one tensor are spread over (`set_chunk_workers`)."""
    return _workers


def map_threads(fn: Callable[[int], T], n: int, workers: int) -> list[T]:
    """[fn(0), ..., fn(n - 1)], on the shared pool of `workers` threads (not from inside a pool task)."""
    if workers <= 1 or n <= 1:
        return [fn(i) for i in range(n)]
    if workers not in _pools:
        _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="basin-chunk")
    if not profiling.active():
        return list(_pools[workers].map(fn, range(n)))
    spent: list[float] = []  # the tasks' CPU seconds, charged to the caller's open phases

    def timed(i: int) -> T:
        started = time.thread_time()
        try:
            return fn(i)
        finally:
            spent.append(time.thread_time() - started)

    try:
        return list(_pools[workers].map(timed, range(n)))
    finally:
        profiling.charge(sum(spent))


_local = threading.local()


def scratch(count: int, size: int) -> list[torch.Tensor]:
    """`count` float32 buffers of `size` entries, owned by the calling thread and reused by its next call
    (fresh ones above CHUNK_ELEMENTS: only the larger chunks of tests and accelerators ask for those)."""
    if size > CHUNK_ELEMENTS:
        return [torch.empty(size, dtype=torch.float32) for _ in range(count)]
    buffers: list[torch.Tensor] = getattr(_local, "buffers", [])
    while len(buffers) < count:
        buffers.append(torch.empty(CHUNK_ELEMENTS, dtype=torch.float32))
    _local.buffers = buffers
    return [b[:size] for b in buffers[:count]]


@dataclass
class ChunkedInputs:
    """Flat views of one tensor name's inputs (stored dtype) and a way to visit them chunk by chunk."""

    tensors: list[torch.Tensor]
    base: torch.Tensor | None
    workers: int = 1
    chunk_elements: int = CHUNK_ELEMENTS  # a multiple of CHUNK_ELEMENTS
    shape: tuple[int, ...] | None = None  # the tensor's shape (None: flat), for statistics per row (DELLA's ranks)

    @property
    def numel(self) -> int:
        first = self.tensors[0] if self.tensors else self.base
        return first.numel()

    @property
    def nbytes(self) -> int:
        """The bytes one pass over every input and the base reads."""
        return sum(t.nbytes for t in self.tensors) + (0 if self.base is None else self.base.nbytes)

    @property
    def num_chunks(self) -> int:
        return max(1, -(-self.numel // self.chunk_elements))

    def span(self, index: int) -> tuple[int, int]:
        start = index * self.chunk_elements
        return start, min(self.numel, start + self.chunk_elements)

    def chunk(self, index: int) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Float32 copies of chunk `index` of every input and of the base. On CPU they live in this thread's
        scratch buffers, reused by its next call: valid until then (fresh 1 MB blocks per chunk cost a page
        fault per 4 kB when several threads allocate, 5% of a TIES merge's CPU)."""
        start, stop = self.span(index)
        sources = self.tensors + ([] if self.base is None else [self.base])
        if sources[0].device.type == "cpu":
            copies = [buffer.copy_(t[start:stop]) for buffer, t in zip(scratch(len(sources), stop - start), sources)]
        else:
            copies = [t[start:stop].to(torch.float32, copy=True) for t in sources]
        return copies[:len(self.tensors)], None if self.base is None else copies[-1]

    def map(self, fn: Callable[[int, list[torch.Tensor], torch.Tensor | None], T]) -> list[T]:
        """fn(chunk_index, float32 chunks, float32 base chunk) for every chunk; results in chunk order.
        `fn` may modify the chunks but must not return or keep them: their memory is reused."""

        def visit(index: int) -> T:
            chunks, base = self.chunk(index)
            return fn(index, chunks, base)

        return map_threads(visit, self.num_chunks, self.workers)


def empty_like_on(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized tensor of `like`'s shape and device in `dtype`. On CPU the memory comes from numpy,
    which asks Linux for transparent huge pages on large arrays: a merged tensor is then faulted in 2 MB
    at a time instead of 4 kB (measured: a third of the page faults of a 4 GB linear merge)."""
    if like.device.type != "cpu" or like.numel() == 0:
        return torch.empty(like.shape, dtype=dtype, device=like.device)
    raw = np.empty(like.numel() * torch.empty((), dtype=dtype).element_size(), dtype=np.uint8)
    return torch.from_numpy(raw).view(dtype).view(like.shape)


def run_chunked(
    method: Any,
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    params: dict[str, Any],
    rng: torch.Generator,
    out_dtype: torch.dtype,
    workers: int | None = None,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """Merge one tensor chunk by chunk with an elementwise or two-phase method; result in `out_dtype`.
    Chunks of `chunk_elements` entries (default: by device, see the module docstring)."""
    first = tensors[0] if tensors else base
    if chunk_elements is None:
        chunk_elements = CHUNK_ELEMENTS if first.device.type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS
    inputs = ChunkedInputs([t.reshape(-1) for t in tensors], None if base is None else base.reshape(-1),
                           _workers if workers is None else workers, chunk_elements, tuple(first.shape))
    out = empty_like_on(first, out_dtype)
    flat_out = out.view(-1)
    fn, two_phase = method.fn, method.two_phase
    state = fn.prepare(inputs, params, rng) if two_phase else None
    kernel = None
    if method.fused is not None:
        kernel = method.fused(inputs, params, state) if two_phase else method.fused(inputs, params)
    started = profiling.start()
    if kernel is not None:  # one compiled pass per chunk, straight from the stored inputs

        def fused(index: int) -> None:
            start, stop = inputs.span(index)
            flat_out[start:stop] = kernel(index, scratch(1, stop - start)[0])

        map_threads(fused, inputs.num_chunks, inputs.workers)
        profiling.stop("apply", started, inputs.nbytes + out.nbytes)
        return out
    if two_phase:

        def work(index: int, chunks: list[torch.Tensor], b: torch.Tensor | None) -> None:
            start, stop = inputs.span(index)
            flat_out[start:stop] = fn.apply(chunks, b, params, state, index)
    else:

        def work(index: int, chunks: list[torch.Tensor], b: torch.Tensor | None) -> None:
            start, stop = inputs.span(index)
            flat_out[start:stop] = fn(chunks, b, params, rng)

    inputs.map(work)
    profiling.stop("apply", started, inputs.nbytes + out.nbytes)
    return out


class TwoPhase:
    """Base of a two-phase method object (`prepare` gathers whole-tensor statistics over chunks, `apply` merges one
    chunk): the object is its own function, and calling it merges a whole tensor through the same two phases.
    `fused` (the compiled kernel's per-chunk function) is None unless a subclass defines it."""

    two_phase = True  # what run_chunked reads from a bound method
    fused = None

    @property
    def fn(self) -> TwoPhase:
        return self

    def __call__(self, tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict[str, Any],
                 rng: torch.Generator) -> torch.Tensor:
        return run_chunked(self, tensors, base, params, rng, torch.float32, workers=1)
