"""Rows of a local `.jsonl`, `.csv` or `.parquet` file, read with the `datasets` library (the `data` extra).

`read_rows(path)` returns column -> list of values. The file is checked first (exists, not empty, text for
jsonl/csv, parquet's magic bytes), then built by `datasets`' packaged json/csv/parquet builders, offline, in
memory, with a throw-away cache folder, so nothing is written outside a temporary directory.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path

from taxonomy.errors import DataError

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
TEXT_SUFFIXES = (".txt",)
SUFFIXES = TEXT_SUFFIXES + tuple(BUILDERS)
SNIFF = 1 << 16


def check_suffix(path: Path) -> str:
    """The lower-cased suffix of `path`, or a one-line error listing the known ones."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unknown data file extension {suffix or '(none)'!r} (expected one of "
                        f"{', '.join(SUFFIXES)})")
    return suffix


def check_file(path: Path) -> None:
    """A one-line error for a missing, empty or binary (non-text, non-parquet) data file."""
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    with path.open("rb") as f:
        head = f.read(SNIFF)
    if not head.strip():
        raise DataError(f"{path}: the data file is empty")
    if path.suffix.lower() == ".parquet":
        if not head.startswith(b"PAR1"):
            raise DataError(f"{path}: not a parquet file (no PAR1 magic bytes)")
        return
    check_text(path, head)


def check_text(path: Path, head: bytes) -> None:
    """A one-line error when `head` (the file's first bytes) is not UTF-8 text."""
    if b"\x00" in head:
        raise DataError(f"{path}: not a text file (it holds NUL bytes)")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        if len(head) < SNIFF or err.start < len(head) - 4:  # not a character cut at the end of the sniffed block
            raise DataError(f"{path}: not a UTF-8 text file (byte {err.start})") from None


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("reading .jsonl/.csv/.parquet data needs the `datasets` package: pip install "
                        "'basin[data]' (or datasets>=2.16)") from None
    return datasets


@contextmanager
def _quiet(datasets):
    """datasets' progress bars and info logging off inside the block, restored after."""
    logging = datasets.utils.logging
    level, bars = logging.get_verbosity(), datasets.is_progress_bar_enabled()
    logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def _first_line(err: BaseException) -> str:
    cause = err.__cause__ or err.__context__ or err
    text = str(err).strip() if str(err).strip() and err is not cause else ""
    text = str(cause).strip() or text
    return ((text.splitlines() or [type(cause).__name__])[0])[:200]


def read_rows(path: str | Path) -> dict[str, list]:
    """column -> values of the rows of a .jsonl/.csv/.parquet file; one-line errors naming the file."""
    path = Path(path)
    check_file(path)
    datasets = _datasets()
    import pyarrow

    errors = (datasets.exceptions.DatasetsError, pyarrow.ArrowException, ValueError, OSError, StopIteration)
    with tempfile.TemporaryDirectory(prefix="basin-data-") as cache, _quiet(datasets):
        try:
            table = datasets.load_dataset(BUILDERS[path.suffix.lower()], data_files=str(path), split="train",
                                          cache_dir=cache, keep_in_memory=True)
        except errors as err:
            raise DataError(f"{path}: cannot read the rows ({_first_line(err)})") from None
        rows = table.to_dict()
    if not rows or not any(len(v) for v in rows.values()):
        raise DataError(f"{path}: the data file has no rows")
    return rows
