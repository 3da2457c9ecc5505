"""Parquet: one file, or a folder of ``*.parquet`` files read in sorted path order."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from visa.readers.base import Input, InputError, ascending
from visa.readers.columnar import MAX_BATCH_ROWS, ROW_BATCH_BYTES, SubsetWriter, column_values, iter_rows
from visa.run_folder import SUBSET_PARQUET, atomic_write
from visa.samples import RawRecord


def parquet_files(folder: Path) -> list[Path]:
    """The ``*.parquet`` files under ``folder`` (recursively), sorted by relative path; hidden and
    ``_``-prefixed entries (``_SUCCESS``, ``.tmp`` folders) are ignored."""
    found = [
        p
        for p in folder.rglob("*.parquet")
        if p.is_file() and not any(part.startswith((".", "_")) for part in p.relative_to(folder).parts)
    ]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


class ParquetInput(Input):
    """Rows are streamed with ``ParquetFile.iter_batches`` in batches sized from the row-group
    metadata, so a column of image bytes never pulls a whole file into memory. ``line`` is the
    global row number + 1."""

    format = "parquet"

    def __init__(self, path: Path, *, batch_bytes: int = ROW_BATCH_BYTES) -> None:
        super().__init__(path)
        self.batch_bytes = batch_bytes
        self._files = [self.path] if self.path.is_file() else parquet_files(self.path)
        if not self._files:
            raise InputError(f"{self.path}: the folder holds no .parquet files")
        self._open(self._files[0])

    def files(self) -> list[Path]:
        return list(self._files)

    def num_records(self) -> int:
        return sum(self._open(p).metadata.num_rows for p in self._files)

    def iter_raw(self) -> Iterator[RawRecord]:
        index = 0
        for path in self._files:
            pf = self._open(path)
            for batch in pf.iter_batches(batch_size=self._batch_rows(pf)):
                for row, error in iter_rows(batch, self.batch_bytes):
                    yield RawRecord(index, index + 1, row, None if error is None else f"line {index + 1}: {error}")
                    index += 1

    def iter_ids(self) -> Iterator[object | None]:
        for path in self._files:
            pf = self._open(path)
            if "id" not in pf.schema_arrow.names:
                yield from (None for _ in range(pf.metadata.num_rows))
                continue
            for batch in pf.iter_batches(batch_size=65536, columns=["id"]):
                yield from column_values(batch, "id")

    def write_subset(self, indices: Iterable[int], out_dir: Path) -> Path:
        target = Path(out_dir) / SUBSET_PARQUET
        schema = self._open(self._files[0]).schema_arrow

        def write(tmp: Path) -> None:
            with tmp.open("wb") as out:
                self._write_rows(ascending(indices), out, schema)

        atomic_write(target, write)
        return target

    def _write_rows(self, wanted: Iterator[int], sink: BinaryIO, schema: pa.Schema) -> None:
        want = next(wanted, None)
        total = 0
        with pq.ParquetWriter(sink, schema) as writer:
            out = SubsetWriter(writer.write_table, schema)
            for path, pf, group, offset, rows in self._row_groups():
                total = offset + rows
                if want is None or want >= total:
                    continue  # nothing selected in this row group: it is not even read
                for batch in pf.iter_batches(batch_size=self._batch_rows(pf), row_groups=[group]):
                    end = offset + batch.num_rows
                    local = []
                    while want is not None and want < end:
                        local.append(want - offset)
                        want = next(wanted, None)
                    if local:
                        out.add(batch, local, source=path)
                    offset = end
            out.flush()
        if want is not None:
            raise ValueError(f"subset index {want} is out of range: the input has {total} records")

    def _row_groups(self) -> Iterator[tuple[Path, pq.ParquetFile, int, int, int]]:
        """(file, reader, row group, global index of its first row, its number of rows), in order."""
        offset = 0
        for path in self._files:
            pf = self._open(path)
            for group in range(pf.metadata.num_row_groups):
                rows = pf.metadata.row_group(group).num_rows
                yield path, pf, group, offset, rows
                offset += rows

    def _open(self, path: Path) -> pq.ParquetFile:
        try:
            return pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"{path}: not a readable Parquet file: {e}") from e

    def _batch_rows(self, pf: pq.ParquetFile) -> int:
        md = pf.metadata
        groups = [md.row_group(i) for i in range(md.num_row_groups)]
        per_row = max((g.total_byte_size / g.num_rows for g in groups if g.num_rows), default=1.0)
        return int(max(1, min(MAX_BATCH_ROWS, self.batch_bytes // max(per_row, 1.0))))
