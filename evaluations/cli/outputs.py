"""Output files of the evaluation commands: checked before any work, written atomically, never clobbered.

`Outputs` is given every file a command will write (`file` for a path such as `--json`, `folder` for
names inside `--out`) before it reads anything: an existing file is refused unless `--overwrite`, a
missing parent folder of a file option is refused, a folder path that is a file is refused. Writers
then write to `temp(target)` (a hidden name beside the target, same suffix so matplotlib keeps the
format) and `commit()` renames every temporary into place (`os.replace`, atomic per file). On an error
or Ctrl-C (the `with` block exits with an exception) the temporaries and any folder created for them
are removed: no half-written output is ever left under a target's name.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from merging.io.atomic import temp_name
from taxonomy.errors import OutputError


def _nearest_existing(path: Path) -> Path:
    for parent in (path, *path.parents):
        if parent.exists():
            return parent
    return Path(".")


class Outputs:
    """The planned output files of one command run (see the module docstring)."""

    def __init__(self, overwrite: bool = False, inputs: list | None = None) -> None:
        self.overwrite = overwrite
        self.inputs = [p for p in inputs or [] if p is not None]  # files the outputs may never replace
        self._temps: dict[Path, Path] = {}  # target -> temporary
        self._planned: set[Path] = set()
        self._made: list[Path] = []  # folders created for the outputs, removed again on failure

    def _check_target(self, path: Path, option: str) -> None:
        from merging.io.guard import check_files

        check_files([path], self.inputs)  # an output never is, or holds, one of the command's inputs
        if path.is_dir():
            raise OutputError(f"{option} {path}: is a folder, expected a file path")
        if (path.exists() or path.is_symlink()) and not self.overwrite:
            raise OutputError(f"{option} {path}: already exists; pass --overwrite to replace it")
        self._planned.add(path)

    def file(self, path: str | Path, option: str) -> Path:
        """Plan the file `path` given by `option`; its folder must exist."""
        path = Path(path)
        parent = path.parent
        if not parent.is_dir():
            what = "is not a folder" if parent.exists() else "does not exist"
            raise OutputError(f"{option} {path}: folder {parent} {what}")
        self._check_target(path, option)
        return path

    def folder(self, folder: str | Path, names: list[str], option: str) -> Path:
        """Plan files `names` inside `folder` (given by `option`; created when the outputs are written)."""
        from merging.io.guard import check_files

        folder = Path(folder)
        check_files([folder], self.inputs)
        existing = _nearest_existing(folder)
        if not existing.is_dir():
            raise OutputError(f"{option} {folder}: {existing} is a file, not a folder")
        for name in names:
            self._check_target(folder / name, option)
        return folder

    def temp(self, target: Path) -> Path:
        """The temporary file to write for planned `target` (its folder is created now if missing)."""
        if target not in self._planned:
            raise RuntimeError(f"output {target} was not planned")  # a programming error, not bad input
        self._mkdir(target.parent)
        tmp = temp_name(target)
        self._temps[target] = tmp
        return tmp

    def write(self, target: Path, writer: Callable[[Path], object]) -> None:
        """Call `writer(temporary)` for planned `target`; an OSError (full disk, read-only folder) is a BasinError."""
        tmp = self.temp(target)
        try:
            writer(tmp)
        except OSError as err:
            raise OutputError(f"cannot write {target}: {err.strerror or err}; nothing was written") from None

    def write_text(self, target: Path, text: str) -> None:
        self.write(target, lambda tmp: tmp.write_text(text))

    def _mkdir(self, folder: Path) -> None:
        missing = [p for p in (folder, *folder.parents) if not p.exists()]
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputError(f"cannot create folder {folder}: {err.strerror or err}; nothing was written") from None
        self._made.extend(missing)  # deepest first: removed in this order

    def commit(self) -> list[Path]:
        """Rename every written temporary onto its target; returns the targets written, in planning order."""
        done = []
        for target, tmp in self._temps.items():
            if not tmp.exists():  # e.g. a plot skipped without matplotlib
                continue
            try:
                os.replace(tmp, target)
            except OSError as err:
                raise OutputError(f"cannot write {target}: {err.strerror or err}") from None
            done.append(target)
        self._temps.clear()
        self._made.clear()
        return done

    def discard(self) -> None:
        """Remove the temporaries and the folders created for them (if still empty)."""
        for tmp in self._temps.values():
            tmp.unlink(missing_ok=True)
        self._temps.clear()
        for folder in self._made:
            try:
                folder.rmdir()
            except OSError:
                break
        self._made.clear()

    def __enter__(self) -> Outputs:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()
        elif self._temps:
            self.commit()
