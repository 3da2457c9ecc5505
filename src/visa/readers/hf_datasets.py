"""A Hugging Face ``datasets`` folder written by ``Dataset.save_to_disk``.

Reading needs only pyarrow: the folder's ``data-XXXXX-of-XXXXX.arrow`` files (listed in
``state.json``) are Arrow IPC streams, memory-mapped and read batch by batch. Writing a subset in
the same format uses the ``datasets`` package (extra ``visa[datasets]``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa

from visa.readers.base import Input, InputError, ascending
from visa.readers.columnar import ROW_BATCH_BYTES, column_values, iter_rows
from visa.run_folder import SUBSET_FOLDER, atomic_write_folder
from visa.samples import RawRecord

MARKER_FILES = ("state.json", "dataset_info.json")
INSTALL_HINT = "writing a Hugging Face datasets folder needs the datasets package: pip install visa[datasets]"


def is_datasets_folder(folder: Path) -> bool:
    return any((folder / name).is_file() for name in MARKER_FILES) and any(folder.glob("*.arrow"))


def arrow_files(folder: Path) -> list[Path]:
    """The data files in order: as listed in ``state.json``, else the sorted ``*.arrow`` files."""
    state_path = folder / "state.json"
    if state_path.is_file():
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InputError(f"{state_path}: unreadable: {e}") from e
        listed = state.get("_data_files") if isinstance(state, dict) else None
        if listed:
            files = [folder / str(entry.get("filename", "")) for entry in listed if isinstance(entry, dict)]
            outside = [p.name for p in files if p.parent != folder or not p.name.endswith(".arrow")]
            if outside:
                raise InputError(
                    f"{state_path}: data files must be .arrow files of the folder itself, not {outside[0]!r}"
                )
            missing = [p.name for p in files if not p.is_file()]
            if missing:
                raise InputError(
                    f"{folder}: data files listed in state.json are missing: {', '.join(missing)}"
                )
            return files
    return sorted(folder.glob("*.arrow"))


@contextmanager
def _batches(path: Path) -> Iterator[Iterator[pa.RecordBatch]]:
    with pa.memory_map(str(path), "r") as source:
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            source.seek(0)
            try:
                file_reader = pa.ipc.open_file(source)
            except pa.ArrowInvalid as e:
                raise InputError(f"{path}: not an Arrow stream or file: {e}") from e
            yield (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))
            return
        yield iter(reader)


class HFDatasetsInput(Input):
    format = "hf_datasets"

    def __init__(self, path: Path, *, batch_bytes: int = ROW_BATCH_BYTES) -> None:
        super().__init__(path)
        self.batch_bytes = batch_bytes
        self._files = arrow_files(self.path)
        if not self._files:
            raise InputError(f"{self.path}: the datasets folder holds no .arrow data files")

    def files(self) -> list[Path]:
        return list(self._files)

    def num_records(self) -> int:
        total = 0
        for path in self._files:
            with _batches(path) as batches:
                total += sum(b.num_rows for b in batches)
        return total

    def iter_raw(self) -> Iterator[RawRecord]:
        index = 0
        for path in self._files:
            with _batches(path) as batches:
                for batch in batches:
                    for row, error in iter_rows(batch, self.batch_bytes):
                        yield RawRecord(index, index + 1, row, None if error is None else f"line {index + 1}: {error}")
                        index += 1

    def iter_ids(self) -> Iterator[object | None]:
        for path in self._files:
            with _batches(path) as batches:
                for batch in batches:
                    yield from column_values(batch, "id")

    def check_writable(self) -> None:
        try:
            import datasets  # noqa: F401
        except ImportError as e:
            raise ImportError(INSTALL_HINT) from e

    def write_subset(self, indices: Iterable[int], out_dir: Path) -> Path:
        self.check_writable()
        import datasets

        chosen = list(ascending(indices))
        ds = datasets.Dataset.load_from_disk(str(self.path))
        if chosen and chosen[-1] >= ds.num_rows:
            raise ValueError(
                f"subset index {chosen[-1]} is out of range: the input has {ds.num_rows} records"
            )
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / SUBSET_FOLDER
        # one data file: LLaMA-Factory's loader reads a single .arrow file, not a save_to_disk folder
        atomic_write_folder(target, lambda tmp: ds.select(chosen).save_to_disk(str(tmp), num_shards=1))
        return target
