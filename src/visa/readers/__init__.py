"""Input readers: open a dataset of any supported format and stream its records.

``open_input(path)`` detects the format from the path:

* ``*.json``: a top-level JSON array of records (streamed, never loaded whole);
* ``*.jsonl`` / ``*.ndjson``: one JSON record per line;
* ``*.parquet``, or a folder of ``*.parquet`` files;
* a folder written by ``datasets.Dataset.save_to_disk`` (``state.json`` / ``dataset_info.json`` and
  ``*.arrow`` files);
* WebDataset ``*.tar`` shards: one file, a folder of them, or a glob such as ``shards/train-*.tar``.

Every reader yields :class:`~visa.samples.RawRecord` in input order (malformed records included,
with ``error`` set) and writes a selected subset back in its own format, records unchanged.
"""

from __future__ import annotations

import stat
from pathlib import Path

from visa.readers.base import Input, InputError
from visa.readers.ids import IdSource, duplicate_ids

__all__ = ["FORMATS", "IdSource", "Input", "InputError", "duplicate_ids", "open_input"]

FORMATS = ("json", "jsonl", "parquet", "hf_datasets", "webdataset")
_JSONL_SUFFIXES = (".jsonl", ".ndjson")


def open_input(path: Path | str) -> Input:
    """Open ``path`` as an :class:`Input`, detecting its format; raise InputError when it is none."""
    path = Path(path)
    if not path.exists():
        from visa.readers.webdataset import WebDatasetInput, is_glob

        if is_glob(str(path)):
            return WebDatasetInput(path)
        raise InputError(f"input not found: {path}")
    if path.is_dir():
        return _open_folder(path)
    if not stat.S_ISREG(path.stat().st_mode):
        raise InputError(f"{path}: not a regular file (a device, FIFO or socket cannot be read as a dataset)")
    suffix = path.suffix.lower()
    if suffix == ".json":
        from visa.readers.json_array import JsonArrayInput, check_array_start

        check_array_start(path)
        return JsonArrayInput(path)
    if suffix in _JSONL_SUFFIXES:
        from visa.readers.jsonl import JsonlInput

        return JsonlInput(path)
    if suffix == ".parquet":
        from visa.readers.parquet import ParquetInput

        return ParquetInput(path)
    if suffix == ".tar":
        from visa.readers.webdataset import WebDatasetInput

        return WebDatasetInput(path)
    raise InputError(
        f"{path}: unsupported input format {suffix or '(no extension)'!r}; expected .json (array), "
        ".jsonl/.ndjson, .parquet, a folder of .parquet files, a datasets save_to_disk folder, "
        "or WebDataset .tar shards"
    )


def _open_folder(path: Path) -> Input:
    from visa.readers.hf_datasets import HFDatasetsInput, is_datasets_folder

    if is_datasets_folder(path):
        return HFDatasetsInput(path)
    if (path / "dataset_dict.json").is_file():
        raise InputError(
            f"{path}: a datasets DatasetDict folder; point at one of its splits (e.g. {path / 'train'})"
        )
    from visa.readers.parquet import ParquetInput, parquet_files

    if parquet_files(path):
        return ParquetInput(path)
    from visa.readers.webdataset import WebDatasetInput, tar_shards

    if tar_shards(path):
        return WebDatasetInput(path)
    raise InputError(
        f"{path}: folder holds neither .parquet files, a datasets save_to_disk dataset "
        "(state.json/dataset_info.json with .arrow files) nor WebDataset .tar shards"
    )
