"""Streaming sharded safetensors output, written into a temporary sibling folder.

The layout (names, shapes, dtypes) is known from the plan before any tensor is computed, so
every shard's header is written up front and each tensor's bytes go straight to their offset
(`os.pwrite`): memory never holds more than the tensor being written. Shards are named as
`transformers` names them (`model.safetensors`, or `model-0000k-of-0000n.safetensors` plus
`model.safetensors.index.json`). `close()` renames the folder into place (an existing output, with
`overwrite`, is moved aside first and deleted only once the new one is in place); on error the
temporary folder is removed. The output is guarded and locked (`merging.io.guard`): it never replaces
an input, and a second run on the same output fails at once. A failed write (ENOSPC, EROFS, EACCES)
is a one-line `BasinError` saying nothing was written.

Resume: with a `resume_key` (a fingerprint of the plan and the inputs' content, see
`merging.pipeline.resume_key`), every finished tensor is
appended with its sha256 to a journal in the temporary folder. An interrupted merge
(Ctrl-C, a killed process) leaves that folder behind; a later writer with the same key and
layout reopens it, re-hashes the journalled tensors on disk, keeps those that match (`done`)
and lets the engine compute only the rest.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from merging.io.guard import OutputLock, check_output, io_error, real, refuse_existing
from merging.io.safetensors_format import DTYPE_NAMES, element_size
from taxonomy.errors import OutputError

DEFAULT_SHARD_SIZE = 5 * 1000**3
MAX_SHARD_SIZE = 1000**5
HASH_APART = 1 << 20  # bytes: a tensor this large is hashed on another thread while its bytes are written


@functools.cache
def _hash_thread() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(1, thread_name_prefix="basin-hash")


DROP_BEHIND_LAG = 64 << 20  # bytes written and not yet on disk, per file, before the oldest are waited for


@functools.cache
def _sync_file_range():
    """libc's sync_file_range (Linux), or None."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range  # the process's own symbols, libc's among them
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    return fn if hasattr(os, "posix_fadvise") else None


class _DropBehind:
    """Written ranges of one file sent to disk as they come (sync_file_range) and, DROP_BEHIND_LAG bytes later,
    waited for and dropped from the page cache (POSIX_FADV_DONTNEED): the page cache holds a few tens of MB of the
    file, not all of it, so its pages are recycled instead of fresh ones taken (measured on the 2-core AMD EPYC
    VM, 3 GB in 8 MB writes: 0.9 s of system time instead of 3.3-7 s). A no-op where the calls are missing."""

    WRITE, WAIT = 2, 1 | 2 | 4  # SYNC_FILE_RANGE_WRITE; WAIT_BEFORE | WRITE | WAIT_AFTER

    def __init__(self, fd: int) -> None:
        self.fd, self.ranges, self.pending = fd, deque(), 0
        self.sync = _sync_file_range()

    def written(self, offset: int, n: int) -> None:
        if self.sync is None or n == 0:
            return
        self.sync(self.fd, offset, n, self.WRITE)
        self.ranges.append((offset, n))
        self.pending += n
        while self.pending > DROP_BEHIND_LAG:
            old, size = self.ranges.popleft()
            self.pending -= size
            self.sync(self.fd, old, size, self.WAIT)
            os.posix_fadvise(self.fd, old, size, os.POSIX_FADV_DONTNEED)


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a byte count: a positive, finite whole number of bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    s = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "B": 1}
    number, mult = s, 1
    for unit, m in units.items():
        if s.endswith(unit):
            number, mult = s[: -len(unit)], m
            break
    try:
        value = float(number) * mult
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 1 or value > MAX_SHARD_SIZE:
        raise OutputError(f"shard size {text!r}: expected e.g. 5GB, 500MB or a byte count (1 B to 1 PB)")
    return int(value)


JOURNAL = ".basin-journal.jsonl"


def temp_folder(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.basin-tmp"


def old_folder(out_dir: Path) -> Path:
    """Where an output being replaced waits until its replacement is in place."""
    return out_dir.parent / f".{out_dir.name}.basin-old"


def output_path(out_dir: str | Path) -> Path:
    """The output as an absolute path, `~`, `.`, `..` and trailing slashes resolved (its last component kept)."""
    out = Path(os.path.abspath(os.path.expanduser(str(out_dir))))
    return real(out) if not out.name else real(out.parent) / out.name


def prepare_output(out_dir: Path, overwrite: bool, keep_partial: bool = False,
                   protect: Iterable[Path] = ()) -> Path:
    """Refuse an output that would replace an input (`merging.io.guard.check_output`), an output that is a
    symbolic link, and an existing output unless `overwrite`; return the temporary sibling folder (fresh,
    unless `keep_partial` and an interrupted merge left one). The caller holds the output's lock."""
    tmp = temp_folder(out_dir)
    check_output(out_dir, protect, siblings=[tmp, old_folder(out_dir)])
    if out_dir.is_symlink():
        raise OutputError(f"{out_dir}: the output is a symbolic link (to {os.readlink(out_dir)}); "
                         "give the folder it points to, or remove the link")
    refuse_existing(out_dir, overwrite)
    if not out_dir.parent.is_dir():
        raise OutputError(f"{out_dir.parent}: parent folder of the output does not exist")
    if tmp.is_symlink() or (tmp.exists() and not tmp.is_dir()):
        tmp.unlink()  # our reserved name: removing a link deletes nothing it points to
    elif tmp.exists() and not (keep_partial and (tmp / JOURNAL).is_file()):
        shutil.rmtree(tmp)
    tmp.mkdir(exist_ok=True)
    return tmp


def replace_output(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished `tmp` into place; an existing output (with `overwrite`) is moved aside first and
    deleted only once the new one is in place (restored if the rename fails)."""
    old = None
    if out_dir.exists() or out_dir.is_symlink():
        if not overwrite:
            raise OutputError(f"{out_dir}: output folder appeared during the merge; not replaced")
        old = old_folder(out_dir)
        _remove(old)
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except OSError:
        if old is not None:
            os.replace(old, out_dir)
        raise
    if old is not None:
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


@contextlib.contextmanager
def aborting_on_os_error(abort, out_dir: Path) -> Iterator[None]:
    """An OSError (ENOSPC, EROFS, EACCES, ...) calls `abort` (the partial output is removed) and becomes one line."""
    try:
        yield
    except OSError as err:
        abort()
        raise io_error(out_dir, err) from None


class ShardWriter:
    """`add(name, tensor)` (or `add_part` per part, in order) for each tensor of `layout` (any order), then `close()`.

    `protect`: the paths the run reads (`merging.io.guard.protected_paths`), which the output may not replace.
    The output's lock (`OutputLock`) is held from construction to `close()` / `abort()`. A failed write
    (full disk, read-only folder) removes the temporary folder and raises a one-line `BasinError`.
    `hashed=False`: the tensors' bytes are not hashed (no `content_hash`, no resume), for outputs nothing reads
    a hash of (the side outputs of TALL masks and EMR beside a merged model, three times its bytes);
    `drop_behind=True`: what `add_part` writes goes to disk as it comes and leaves the page cache (`_DropBehind`),
    for outputs not read back by the run.
    """

    def __init__(self, out_dir: Path, layout: list[tuple[str, tuple[int, ...], torch.dtype]],
                 shard_size: int = DEFAULT_SHARD_SIZE, overwrite: bool = False, resume_key: str | None = None,
                 protect: Iterable[Path] = (), hashed: bool = True, drop_behind: bool = False):
        self.out_dir = output_path(out_dir)
        if shard_size <= 0:
            raise OutputError(f"shard size must be positive, got {shard_size}")
        if resume_key is not None and not hashed:
            raise OutputError("writer: a resumable output is hashed")
        self.hashed = hashed
        self._drop: dict[int, _DropBehind] | None = {} if drop_behind else None
        self.tmp = temp_folder(self.out_dir)
        self.overwrite = overwrite
        self._layout = {name: (tuple(shape), dtype) for name, shape, dtype in layout}
        self._hashes: dict[str, str] = {}
        self._parts: dict[str, tuple[int, object]] = {}  # tensors written in parts: entries done, sha256 so far
        self._fds: list[int] = []
        self._journal: int | None = None
        self._lock: OutputLock | None = None
        self._owns_tmp = False
        check_output(self.out_dir, protect, siblings=[self.tmp, old_folder(self.out_dir)])  # before the lock file
        self._lock = OutputLock(self.out_dir)
        key = None if resume_key is None else json.dumps({"key": resume_key, "shard_size": shard_size})
        try:
            with self._writing():
                self.tmp = prepare_output(self.out_dir, overwrite, keep_partial=resume_key is not None,
                                          protect=protect)
                self._owns_tmp = True
                self._open(layout, shard_size, key)
        except BaseException:
            self.abort()
            raise

    def _open(self, layout, shard_size: int, key: str | None) -> None:
        previous = self._read_journal(key)
        self._plan_shards(layout, shard_size, fresh=not previous)
        self.done = self._verify(previous)
        if key is not None:
            path = self.tmp / JOURNAL
            self._journal = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | (0 if previous else os.O_TRUNC))
            if not previous:
                os.write(self._journal, (key + "\n").encode())

    def _writing(self) -> contextlib.AbstractContextManager[None]:
        return aborting_on_os_error(self.abort, self.out_dir)

    def _read_journal(self, key: str | None) -> dict[str, str]:
        """name -> sha256 of the tensors a previous, interrupted run finished (same key), else {}."""
        path = self.tmp / JOURNAL
        if key is None or not path.is_file():
            return {}
        lines = path.read_text().splitlines()
        if not lines or lines[0] != key:
            shutil.rmtree(self.tmp)
            self.tmp.mkdir()
            return {}
        done = {}
        for line in lines[1:]:
            try:
                entry = json.loads(line)
                done[entry["name"]] = entry["sha256"]
            except (json.JSONDecodeError, KeyError, TypeError):
                break  # a torn last line
        return done

    def _verify(self, previous: dict[str, str]) -> set[str]:
        """Keep the journalled tensors whose bytes on disk still hash as recorded."""
        kept = set()
        for name, digest in previous.items():
            if name not in self._where:
                continue
            k, offset, n = self._where[name]
            data = os.pread(self._fds[k], n, offset)
            if len(data) == n and hashlib.sha256(data).hexdigest() == digest:
                self._hashes[name] = digest
                kept.add(name)
        return kept

    def _plan_shards(self, layout, shard_size: int, fresh: bool = True) -> None:
        groups: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
        size = 0
        for name, shape, dtype in layout:
            n = element_size(dtype)
            for s in shape:
                n *= s
            if groups[-1] and size + n > shard_size:
                groups.append([])
                size = 0
            groups[-1].append((name, tuple(shape), dtype, n))
            size += n
        total = len(groups)
        self.shard_names = (["model.safetensors"] if total == 1 else
                            [f"model-{k + 1:05d}-of-{total:05d}.safetensors" for k in range(total)])
        self._where: dict[str, tuple[int, int, int]] = {}  # name -> (fd index, offset, nbytes)
        for k, group in enumerate(groups):
            header: dict[str, object] = {"__metadata__": {"format": "pt"}}
            pos = 0
            for name, shape, dtype, n in group:
                header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
                pos += n
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            fd = os.open(self.tmp / self.shard_names[k], os.O_RDWR | os.O_CREAT | (os.O_TRUNC if fresh else 0), 0o644)
            self._fds.append(fd)
            os.pwrite(fd, len(raw).to_bytes(8, "little") + raw, 0)
            os.ftruncate(fd, 8 + len(raw) + pos)
            start = 8 + len(raw)
            for name, _, _, n in group:
                self._where[name] = (k, start + header[name]["data_offsets"][0], n)
        self.weight_map = {name: self.shard_names[k] for name, (k, _, _) in self._where.items()}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._layout:
            raise OutputError(f"writer: tensor {name!r} is not in the output layout")
        shape, dtype = self._layout[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            got = f"{tuple(tensor.shape)} {tensor.dtype}"
            raise OutputError(f"writer: tensor {name!r} is {got}, expected {shape} {dtype}")
        with self._writing():
            self._write(name, tensor)

    def add_part(self, name: str, start: int, part: torch.Tensor) -> None:
        """Entries [start, start + part.numel()) of tensor `name` in flat order (the layout's dtype), the parts in
        order from entry 0 (each starting where the previous one stopped): a tensor written as it is computed,
        never whole in memory. The last part completes it (hashed and journalled as by `add`)."""
        if name not in self._layout:
            raise OutputError(f"writer: tensor {name!r} is not in the output layout")
        shape, dtype = self._layout[name]
        numel = math.prod(shape)
        done, hasher = self._parts.get(name, (0, None))
        if name in self._hashes or part.dtype != dtype or start != done or start + part.numel() > numel:
            raise OutputError(f"writer: part [{start}, {start + part.numel()}) of {name!r} ({part.dtype}) does not "
                              f"continue it: {done} of {numel} {dtype} entries written")
        with self._writing():
            k, offset, _ = self._where[name]
            data = memoryview(part.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            hasher = hasher or (hashlib.sha256() if self.hashed else None)
            hashing = None
            if hasher is not None and len(data) >= HASH_APART:
                hashing = _hash_thread().submit(hasher.update, data)
            elif hasher is not None:
                hasher.update(data)
            at, written = offset + start * element_size(dtype), 0
            while written < len(data):
                written += os.pwrite(self._fds[k], data[written:], at + written)
            if self._drop is not None:
                self._drop.setdefault(k, _DropBehind(self._fds[k])).written(at, len(data))
            if hashing is not None:
                hashing.result()
            if start + part.numel() < numel:
                self._parts[name] = (start + part.numel(), hasher)
                return
            self._parts.pop(name, None)
            self._finished(name, "" if hasher is None else hasher.hexdigest())

    def _finished(self, name: str, digest: str) -> None:
        self._hashes[name] = digest
        if self._journal is not None:
            os.write(self._journal, (json.dumps({"name": name, "sha256": digest}) + "\n").encode())

    def _write(self, name: str, tensor: torch.Tensor) -> None:
        k, offset, n = self._where[name]
        data = memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        # sha256 and pwrite both release the GIL: side by side they take the time of the longer one (on a writer-bound
        # merge, a linear merge of 2 x 1 GB bf16 models, hashing then writing was the critical path)
        hashing = _hash_thread().submit(hashlib.sha256, data) if n >= HASH_APART and self.hashed else None
        digest = None if hashing is not None or not self.hashed else hashlib.sha256(data)
        done = 0
        while done < n:
            done += os.pwrite(self._fds[k], data[done:], offset + done)
        self._finished(name, "" if not self.hashed else (digest if hashing is None else hashing.result()).hexdigest())

    def content_hash(self) -> str:
        """sha256 over (name, dtype, shape, sha256 of bytes) in name order: order- and shard-independent."""
        if not self.hashed:
            raise OutputError("writer: an output written with hashed=False has no content hash")
        h = hashlib.sha256()
        for name in sorted(self._layout):
            shape, dtype = self._layout[name]
            h.update(f"{name}\0{DTYPE_NAMES[dtype]}\0{list(shape)}\0{self._hashes[name]}\n".encode())
        return h.hexdigest()

    def write_text(self, relname: str, text: str) -> None:
        with self._writing():
            (self.tmp / relname).write_text(text)

    def copy_file(self, src: Path, relname: str | None = None) -> None:
        with self._writing():
            shutil.copyfile(src, self.tmp / (relname or src.name))

    def close(self) -> Path:
        missing = [n for n in self._layout if n not in self._hashes]
        if missing:
            raise OutputError(f"writer: {len(missing)} tensor(s) never written, e.g. {missing[:3]}")
        with self._writing():
            self._close()
        if self._lock is not None:
            self._lock.release()
        return self.out_dir

    def _close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        if self._journal is not None:
            os.close(self._journal)
            self._journal = None
            (self.tmp / JOURNAL).unlink()
        if len(self.shard_names) > 1:
            total = sum(n for _, _, n in self._where.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        replace_output(self.tmp, self.out_dir, self.overwrite)

    def abort(self, keep_partial: bool = False) -> None:
        """Close files; remove the temporary folder unless `keep_partial` (resumable journal); drop the lock."""
        for fd in self._fds + ([self._journal] if self._journal is not None else []):
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds, self._journal = [], None
        if not keep_partial and self._owns_tmp and not self.tmp.is_symlink():
            shutil.rmtree(self.tmp, ignore_errors=True)
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Errors remove the temporary folder; an interruption keeps it when resumable."""
        if exc_type is not None:
            interrupted = issubclass(exc_type, (KeyboardInterrupt, SystemExit))
            self.abort(keep_partial=interrupted and (self.tmp / JOURNAL).is_file())
