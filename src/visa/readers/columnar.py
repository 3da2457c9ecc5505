"""Helpers shared by the Arrow-based readers (Parquet, Hugging Face datasets folders)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa

ROW_BATCH_BYTES = 32 << 20
"""Roughly how much Arrow data is turned into Python dicts at once (image columns make rows large)."""

MAX_BATCH_ROWS = 4096


def iter_rows(
    batch: pa.RecordBatch, max_bytes: int = ROW_BATCH_BYTES
) -> Iterator[tuple[dict[str, Any] | None, str | None]]:
    """The rows of ``batch`` as ``(Python dict, None)``, converting slices of about ``max_bytes`` at a
    time; a row that cannot be converted (a string column holding bytes that are not UTF-8) comes
    as ``(None, what is wrong)`` and the other rows of its slice are kept."""
    n = batch.num_rows
    if n == 0:
        return
    step = max(1, min(n, MAX_BATCH_ROWS, max_bytes * n // max(batch.nbytes, 1)))
    for start in range(0, n, step):
        part = batch.slice(start, step)
        try:
            rows = part.to_pylist()
        except (UnicodeDecodeError, pa.ArrowException, ValueError, OverflowError):
            yield from (_one_row(part.slice(i, 1)) for i in range(part.num_rows))
            continue
        yield from ((row, None) for row in rows)


def _one_row(row: pa.RecordBatch) -> tuple[dict[str, Any] | None, str | None]:
    try:
        return row.to_pylist()[0], None
    except UnicodeDecodeError as err:
        return None, f"a text value holds bytes that are not valid UTF-8 (byte {err.start})"
    except (pa.ArrowException, ValueError, OverflowError) as err:
        return None, f"the row cannot be read: {str(err).splitlines()[0] if str(err) else type(err).__name__}"


def column_values(batch: pa.RecordBatch, name: str) -> list[Any]:
    """One column of ``batch`` as Python values, or all None when the column is absent."""
    if name not in batch.schema.names:
        return [None] * batch.num_rows
    column = batch.column(name)
    try:
        return column.to_pylist()
    except (UnicodeDecodeError, pa.ArrowException, ValueError, OverflowError):
        return [_value_or_none(column, i) for i in range(len(column))]


def _value_or_none(column: pa.Array, i: int) -> Any:
    """One value, or None when it cannot be converted (that row becomes an error record anyway)."""
    try:
        return column[i].as_py()
    except (UnicodeDecodeError, pa.ArrowException, ValueError, OverflowError):
        return None


class SubsetWriter:
    """Collects taken rows and hands them to a writer in tables of a sensible size (few row groups)."""

    def __init__(
        self, write_table: Any, schema: pa.Schema, *, max_rows: int = 8192, max_bytes: int = 64 << 20
    ) -> None:
        self._write = write_table
        self._schema = schema
        self._max_rows = max_rows
        self._max_bytes = max_bytes
        self._pending: list[pa.RecordBatch] = []
        self._rows = 0
        self._bytes = 0

    def add(self, batch: pa.RecordBatch, local_indices: list[int], *, source: object) -> None:
        """Queue the rows of ``batch`` at ``local_indices``; ``source`` names the batch in errors."""
        taken = batch.take(pa.array(local_indices, type=pa.int64()))
        if not taken.schema.equals(self._schema, check_metadata=False):
            try:
                taken = taken.cast(self._schema)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as e:
                raise ValueError(f"{source}: its schema differs from the first file's: {e}") from e
        self._pending.append(taken)
        self._rows += taken.num_rows
        self._bytes += taken.nbytes
        if self._rows >= self._max_rows or self._bytes >= self._max_bytes:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self._write(pa.Table.from_batches(self._pending, schema=self._schema))
        self._pending, self._rows, self._bytes = [], 0, 0
