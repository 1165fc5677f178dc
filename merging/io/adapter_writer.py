"""One safetensors file whose tensors are not known in advance (a LoRA adapter whose ranks come from the SVDs), written
atomically like `merging.io.writer.ShardWriter`.

Each tensor's bytes are appended to a spool file in the temporary sibling folder as it is computed (memory never
holds more than the tensor being written); `close()` writes the header, then copies the spool after it (the kernel
copies: no tensor is read back into memory), writes the side files and renames the folder into place. The output is
guarded and locked as `ShardWriter`'s is (`merging.io.guard`); an existing output is replaced only with `overwrite`;
an error or an interruption removes the temporary folder; a failed write is one line saying nothing was written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

from merging.io.guard import OutputLock, check_output
from merging.io.safetensors_format import DTYPE_NAMES
from merging.io.writer import (
    aborting_on_os_error,
    old_folder,
    output_path,
    prepare_output,
    replace_output,
    temp_folder,
)
from taxonomy.errors import OutputError

SPOOL = ".basin-spool"


class SpoolWriter:
    """`add(name, tensor)` in any number and order, `write_text(...)` for side files, then `close()`."""

    def __init__(self, out_dir: str | Path, file_name: str, *, overwrite: bool = False, protect: Iterable[Path] = ()):
        self.out_dir = output_path(out_dir)
        self.file_name = file_name
        self.overwrite = overwrite
        self.tmp = temp_folder(self.out_dir)
        self.entries: dict[str, dict] = {}
        self._hash = hashlib.sha256()
        self._spool: int | None = None
        self._size = 0
        self._owns_tmp = False
        check_output(self.out_dir, protect, siblings=[self.tmp, old_folder(self.out_dir)])
        self._lock: OutputLock | None = OutputLock(self.out_dir)
        try:
            with self._writing():
                self.tmp = prepare_output(self.out_dir, overwrite, protect=protect)
                self._owns_tmp = True
                self._spool = os.open(self.tmp / SPOOL, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except BaseException:
            self.abort()
            raise

    def _writing(self) -> contextlib.AbstractContextManager[None]:
        return aborting_on_os_error(self.abort, self.out_dir)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.entries:
            raise OutputError(f"writer: tensor {name!r} written twice")
        data = memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        with self._writing():
            done = 0
            while done < len(data):
                done += os.write(self._spool, data[done:])  # type: ignore[arg-type]
        self._hash.update(f"{name}\0{DTYPE_NAMES[tensor.dtype]}\0{list(tensor.shape)}\0".encode())
        self._hash.update(hashlib.sha256(data).digest())
        self.entries[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [self._size, self._size + len(data)]}
        self._size += len(data)

    @property
    def nbytes(self) -> int:
        return self._size

    def content_hash(self) -> str:
        """sha256 over (name, dtype, shape, sha256 of bytes) in the order written."""
        return self._hash.hexdigest()

    def write_text(self, relname: str, text: str) -> None:
        with self._writing():
            (self.tmp / relname).write_text(text)

    def close(self) -> Path:
        with self._writing():
            self._assemble()
            replace_output(self.tmp, self.out_dir, self.overwrite)
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        return self.out_dir

    def _assemble(self) -> None:
        """Header, then the spooled bytes, into `file_name`; the spool removed."""
        os.close(self._spool)  # type: ignore[arg-type]
        self._spool = None
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        with open(self.tmp / self.file_name, "wb") as out, open(self.tmp / SPOOL, "rb") as spool:
            out.write(len(header).to_bytes(8, "little") + header)
            shutil.copyfileobj(spool, out, 1 << 24)
        (self.tmp / SPOOL).unlink()

    def abort(self) -> None:
        if self._spool is not None:
            with contextlib.suppress(OSError):
                os.close(self._spool)
            self._spool = None
        if self._owns_tmp and not self.tmp.is_symlink():
            shutil.rmtree(self.tmp, ignore_errors=True)
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> SpoolWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
