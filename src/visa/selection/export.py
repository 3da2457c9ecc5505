"""What a selection writes besides run.json: the selection table, the selected records in the
input's own format, and a LLaMA-Factory ``dataset_info.json`` entry for them."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from visa.llamafactory import DATASET_NAME as DATASET_NAME  # re-exported as visa.selection.DATASET_NAME
from visa.run_folder import atomic_write_table
from visa.selection.options import SelectionError

if TYPE_CHECKING:
    from visa.readers import Input



def write_selection_table(table: pa.Table, path: Path) -> None:
    """Write selection.parquet atomically, with fixed writer options (byte-identical reruns)."""
    atomic_write_table(
        path,
        table,
        compression="zstd",
        compression_level=1,
        use_dictionary=["reason"],
        write_statistics=True,
    )


def write_subset(source: Input, rows: Iterable[int], out_dir: Path) -> Path:
    """Write the input records at ``rows`` (ascending) unchanged, in the input's format, into ``out_dir``."""
    try:
        return source.write_subset((int(r) for r in rows), out_dir)
    except (ImportError, OSError, ValueError) as err:
        raise SelectionError(f"cannot write the selected records: {err}") from None


def dataset_entry(subset_path: Path, dataset_dir: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """The LLaMA-Factory entry of the written subset, derived from all of its records, and notes;
    None when LLaMA-Factory has no loader for the subset's format (see :mod:`visa.llamafactory`)."""
    from visa.llamafactory import dataset_entry as derive

    try:
        return derive(subset_path, dataset_dir)
    except (OSError, ValueError, pa.ArrowException) as err:
        raise SelectionError(f"cannot read the written subset back to describe it: {err}") from None


def llamafactory_entry(subset_path: Path, dataset_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """A LLaMA-Factory ``dataset_info.json`` entry for the written subset, in its own dialect, derived
    from all of its records; ``file_name`` is relative to ``dataset_dir``. Returns the entry and notes."""
    entry, notes = dataset_entry(subset_path, dataset_dir)
    if entry is None:
        raise SelectionError(notes[-1])
    return entry, notes
