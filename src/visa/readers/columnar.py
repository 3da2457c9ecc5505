"""Helpers shared by the Arrow-based readers (Parquet, Hugging Face datasets folders)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa

ROW_BATCH_BYTES = 32 << 20
"""Roughly how much Arrow data is turned into Python dicts at once (image columns make rows large)."""

MAX_BATCH_ROWS = 4096


def iter_rows(batch: pa.RecordBatch, max_bytes: int = ROW_BATCH_BYTES) -> Iterator[dict[str, Any]]:
    """The rows of ``batch`` as Python dicts, converting slices of about ``max_bytes`` at a time."""
    n = batch.num_rows
    if n == 0:
        return
    step = max(1, min(n, MAX_BATCH_ROWS, max_bytes * n // max(batch.nbytes, 1)))
    for start in range(0, n, step):
        yield from batch.slice(start, step).to_pylist()


def column_values(batch: pa.RecordBatch, name: str) -> list[Any]:
    """One column of ``batch`` as Python values, or all None when the column is absent."""
    if name in batch.schema.names:
        return batch.column(name).to_pylist()
    return [None] * batch.num_rows


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
