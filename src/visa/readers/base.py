"""The reader contract shared by every input format, and helpers the format modules use."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import ClassVar

from visa.samples import RawRecord

FINGERPRINT_EDGE_BYTES = 1 << 20
"""How much of the start and the end of each input file goes into :meth:`Input.fingerprint`."""

DEFAULT_MAX_RECORD_BYTES = 256 << 20
"""A text record (JSON array element, JSONL line) larger than this becomes an error record."""


class InputError(ValueError):
    """The input path is missing, of an unknown format, or cannot be read as the format it claims."""


class Input(ABC):
    """One dataset on disk, read as a stream of :class:`~visa.samples.RawRecord` in input order.

    Readers never load a whole input: records are produced one at a time (columnar formats are
    converted one small batch at a time), so memory stays flat in the number of records. A record
    that cannot be parsed is yielded with ``record=None`` and ``error`` set; reading continues.
    """

    format: ClassVar[str]

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    @abstractmethod
    def files(self) -> list[Path]:
        """The files that hold the records, in reading order."""

    @abstractmethod
    def iter_raw(self) -> Iterator[RawRecord]:
        """Every record in input order, ``index`` 0..n-1, malformed ones included."""

    @abstractmethod
    def write_subset(self, indices: Iterable[int], out_dir: Path) -> Path:
        """Write the records at ``indices`` (ascending) unchanged, in this input's format.

        Returns the path written (a file, or a folder for Hugging Face datasets). Raises
        ``ValueError`` for indices that are not strictly ascending or not in the input, and for a
        selected record that is malformed (it has no well-formed source to copy).
        """

    def fingerprint(self) -> str:
        """A cheap identity of the input: per file its name, size, mtime and a hash of its edges.

        Two reads of an unchanged input give the same value; a rewritten, appended or truncated
        file gives a different one. It is not a content hash of the whole input.
        """
        return fingerprint_files(self.format, self.path, self.files())

    def num_records(self) -> int | None:
        """The number of records when it is known without reading them all, else None."""
        return None

    def iter_ids(self) -> Iterator[object | None]:
        """The ``id`` field of every record in input order: exactly one value per record, None when
        the record has no id or is malformed. Columnar readers read only the id column."""
        for raw in self.iter_raw():
            yield None if raw.record is None else raw.record.get("id")

    def check_writable(self) -> None:
        """Raise early (before any scoring) if :meth:`write_subset` cannot work in this environment."""


def fingerprint_files(kind: str, root: Path, files: list[Path]) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(kind.encode())
    for path in files:
        st = path.stat()
        name = path.name if path == root else path.relative_to(root).as_posix()
        h.update(f"\0{name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        with path.open("rb") as f:
            h.update(f.read(FINGERPRINT_EDGE_BYTES))
            if st.st_size > FINGERPRINT_EDGE_BYTES:
                f.seek(max(FINGERPRINT_EDGE_BYTES, st.st_size - FINGERPRINT_EDGE_BYTES))
                h.update(f.read(FINGERPRINT_EDGE_BYTES))
    return f"{kind}:{h.hexdigest()}"


def ascending(indices: Iterable[int]) -> Iterator[int]:
    """Pass indices through, raising ValueError unless they are non-negative and strictly ascending."""
    previous = -1
    for i in indices:
        i = int(i)
        if i <= previous:
            raise ValueError(
                f"subset indices must be strictly ascending and non-negative: {i} after {previous}"
            )
        previous = i
        yield i


def pick(records: Iterator[RawRecord], indices: Iterable[int]) -> Iterator[RawRecord]:
    """The records whose index is in ``indices`` (ascending), checking each is well-formed and exists."""
    wanted = ascending(indices)
    target = next(wanted, None)
    if target is None:
        return
    last = -1
    for raw in records:
        last = raw.index
        if raw.index < target:
            continue
        if raw.record is None:
            raise ValueError(
                f"record {raw.index} (line {raw.line}) is malformed and cannot be written: {raw.error}"
            )
        yield raw
        target = next(wanted, None)
        if target is None:
            return
    raise ValueError(f"subset index {target} is out of range: the input has {last + 1} records")


def json_type_name(obj: object) -> str:
    """The JSON name of a parsed value's type, for error messages."""
    if isinstance(obj, dict):
        return "object"
    if isinstance(obj, list):
        return "array"
    if isinstance(obj, str):
        return "string"
    if isinstance(obj, bool):
        return "boolean"
    if obj is None:
        return "null"
    return "number"
