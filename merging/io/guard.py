"""Guards for every command that writes: never replace an input, one writer per output, I/O errors as one line.

The rule (`check_output`): the paths a run reads are *protected*: the recipe file; every input as given and
as resolved (a file, a folder, a Hub-cache snapshot folder, both parts of `base+adapter`); every regular file
directly inside an input folder (weights, index, config, tokenizer: what a merge reads) and the file a
symbolic link there points to (the Hub cache's `blobs/`). After resolving `~`, `.`, `..`, trailing slashes
and symbolic links, an output (and its temporary and lock siblings) may not be a protected path, nor contain
one, nor contain the current folder. An output *inside* an input folder (`model_a/merged`) is allowed: it
replaces nothing the run reads. The check does not depend on `--overwrite`: a refused output is refused
whether or not it exists.

`OutputLock`: an exclusive `fcntl.flock` on `.NAME.basin-lock` beside the output, taken before the temporary
folder is touched and held until the output is renamed into place (missing parent folders are made first, as
mergekit does). A second run on the same output fails at
once with a one-line error (it does not wait); the kernel releases the lock when its holder dies, so a run
killed mid-merge never blocks the rerun that resumes it.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterable
from pathlib import Path

from taxonomy.errors import BasinError, OutputError


def real(path: str | Path) -> Path:
    """`path` with `~`, `.`, `..`, trailing slashes and every symbolic link resolved (need not exist)."""
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def _link_itself(path: Path) -> Path:
    """The path of `path` itself (its parent resolved, its last component kept): a symlink, not its target."""
    p = Path(os.path.abspath(os.path.expanduser(str(path))))
    return real(p.parent) / p.name if p.name else real(p)


def protected_paths(paths: Iterable[str | Path]) -> set[Path]:
    """Every path a run reads (see the module docstring), resolved."""
    out: set[Path] = set()
    for given in paths:
        path = Path(os.path.expanduser(str(given)))
        if not (path.exists() or path.is_symlink()):
            continue
        out |= {real(path), _link_itself(path)}
        if path.is_dir():
            for f in path.iterdir():
                if f.is_file():
                    out |= {real(f), _link_itself(f)}
    return out


def checkpoint_paths(ckpt: object) -> list[Path]:
    """The files and folders an opened checkpoint reads (`merging.io.checkpoint.Checkpoint`, any kind)."""
    paths: list[Path] = []
    base = getattr(ckpt, "base", None)  # LoraCheckpoint: the base, and the adapter folder
    if base is not None:
        paths += checkpoint_paths(base)
    adapter = getattr(getattr(ckpt, "adapter", None), "folder", None)
    if adapter is not None:
        paths.append(Path(adapter))
    folder = getattr(ckpt, "folder", None)
    if folder is not None:
        paths.append(Path(folder))
    file_of = getattr(ckpt, "file_of", None)
    if file_of is not None:
        paths += sorted({file_of(n) for n in ckpt.names()})  # type: ignore[attr-defined]
    return paths


def check_output(out: str | Path, protected: Iterable[Path], *, siblings: Iterable[str | Path] = ()) -> Path:
    """Refuse an output that is, or contains, a path the run reads or the current folder; the resolved output.

    `siblings`: further paths the writer replaces or deletes (its temporary folder), checked the same way.
    """
    target = real(out)
    guarded = set(protected)
    for path in [out, *siblings]:
        resolved = real(path)
        for p in sorted(guarded):
            if p == resolved or p.is_relative_to(resolved):
                what = "is" if p == resolved else "contains"
                raise OutputError(f"{out}: refused: the output {what} {p}, which this run reads "
                                 "(an input, the recipe, or a file of an input folder); choose another output")
    cwd = real(os.getcwd())
    if cwd.is_relative_to(target):
        raise OutputError(f"{out}: refused: the output is, or contains, the current folder {cwd}; "
                         "choose another output")
    return target


def refuse_existing(out: Path, overwrite: bool) -> None:
    """Refuse an existing output unless `overwrite` (the one place this rule is written)."""
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: output folder exists (pass --overwrite / overwrite=True to replace it)")


def planned_output(out_dir: str | Path | None, overwrite: bool, dry_run: bool) -> Path | None:
    """The output folder of a command that writes one, checked before any input is opened: required unless
    `dry_run` (which writes nothing: None), refused when it exists without `overwrite`."""
    if dry_run:
        return None
    if out_dir is None:
        raise BasinError("an output folder is required unless dry_run")
    out = Path(out_dir)
    refuse_existing(out, overwrite)
    return out


def guard_output(out: Path | None, refs: Iterable[object], ckpts: Iterable[object],
                 files: Iterable[object] = ()) -> set[Path]:
    """The paths a run reads (each reference as given and its parts, e.g. both sides of `base+adapter`; every
    opened checkpoint's files; `files`, e.g. the recipe), with `out` (None: a dry run) checked against them
    (`check_output`); the set is what the writer protects."""
    from merging.io.references import parts

    paths: list[object] = [f for f in files if isinstance(f, (str, Path))]
    for ref in refs:
        if isinstance(ref, (str, Path)):
            paths += [ref, *parts(str(ref))]
    for ckpt in ckpts:
        paths += checkpoint_paths(ckpt)
    protected = protected_paths(paths)  # type: ignore[arg-type]
    if out is not None:
        check_output(out, protected)
    return protected


def io_error(out: str | Path, err: OSError) -> BasinError:
    """A failed write (full disk, read-only or forbidden folder, ...) as one line saying nothing was written."""
    reason = err.strerror or type(err).__name__
    where = f": {err.filename}" if err.filename else ""
    hint = {errno.ENOSPC: "free some space", errno.EROFS: "write to a writable file system",
            errno.EACCES: "check the folder's permissions", errno.EPERM: "check the folder's permissions",
            errno.EDQUOT: "free some space"}.get(err.errno or 0, "")
    return BasinError(f"{out}: cannot write the output ({reason}{where}); nothing was written"
                      + (f", {hint} and rerun" if hint else ""))


class OutputLock:
    """An exclusive, non-blocking `flock` on `.NAME.basin-lock` beside `out` (see the module docstring)."""

    def __init__(self, out: Path):
        out = Path(out)
        self.path = out.parent / f".{out.name}.basin-lock"
        self.fd: int | None = None
        try:
            self._make_parents(out)
            self.fd = self._acquire(out)
        except OSError as err:
            raise io_error(out, err) from None

    @staticmethod
    def _make_parents(out: Path) -> None:
        """The output's missing parent folders, as mergekit makes them."""
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise OutputError(f"{out}: cannot write the output: a file stands where its folder {out.parent} or one "
                              "above it would be; nothing was written") from None

    def _acquire(self, out: Path) -> int:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputError(f"{out}: another basin run is writing this output (it holds {self.path}); "
                                 "wait for it to finish, or choose another output") from None
            # the previous holder unlinks the file before releasing it: make sure we hold the file that is there now
            try:
                now = os.stat(self.path, follow_symlinks=False)
            except FileNotFoundError:
                now = None
            held = os.fstat(fd)
            if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                return fd
            os.close(fd)

    def release(self) -> None:
        """Remove the lock file, then drop the lock (in that order: see `_acquire`)."""
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def check_files(files: Iterable[str | Path | None], inputs: Iterable[str | Path | None]) -> None:
    """For commands that write report files (JSON, plots, caches): none of `files` may be, or hold, one of
    `inputs` (resolved as in `protected_paths`). None entries (options not given) are skipped."""
    protect = protected_paths(p for p in inputs if p is not None)
    for f in files:
        if f is None:
            continue
        check_output(f, protect)
        inside = [p for p in protect if real(f).is_relative_to(p) and p.is_file()]
        if inside:
            raise OutputError(f"{f}: refused: would be written inside {inside[0]}, an input file")
