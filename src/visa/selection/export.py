"""What a selection writes besides run.json: the selection table, the selected records in the
input's own format, and a LLaMA-Factory ``dataset_info.json`` entry for them."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from visa.run_folder import atomic_write_table
from visa.selection.options import SelectionError

if TYPE_CHECKING:
    from visa.readers import Input

#: The dataset's name in the LLaMA-Factory entry.
DATASET_NAME = "visa_selected"


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


def _first_record(path: Path) -> dict[str, Any] | None:
    if path.is_dir():  # a datasets save_to_disk folder: Arrow IPC streams
        for file in sorted(path.glob("*.arrow")):
            with pa.memory_map(str(file), "r") as source:
                for batch in pa.ipc.open_stream(source):
                    if batch.num_rows:
                        return batch.slice(0, 1).to_pylist()[0]
        return None
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=1):
            if batch.num_rows:
                return batch.to_pylist()[0]
        return None
    if suffix in (".jsonl", ".ndjson"):
        with path.open("rb") as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    return record if isinstance(record, dict) else None
        return None
    if suffix == ".json":
        import ijson

        with path.open("rb") as f:
            for record in ijson.items(f, "item"):
                return record if isinstance(record, dict) else None
    return None


def llamafactory_entry(subset_path: Path, dataset_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """A LLaMA-Factory ``dataset_info.json`` entry for the written subset, in its own dialect.

    LLaVA records (``conversations`` with ``from``/``value``, ``human``/``gpt``, ``image``) and
    ShareGPT/OpenAI records (``messages`` with ``role``/``content``, ``user``/``assistant``,
    ``images``) map onto LLaMA-Factory's ``sharegpt`` formatting. ``file_name`` is relative to
    ``dataset_dir`` (LLaMA-Factory's ``dataset_dir``). Returns the entry and notes for the user.
    """
    notes: list[str] = []
    try:
        record = _first_record(subset_path)
    except (OSError, ValueError, pa.ArrowException) as err:
        record = None
        notes.append(f"could not read the written subset to detect its dialect ({err}); assumed LLaVA")
    messages_key, role_key, content_key = "conversations", "from", "value"
    user_tag, assistant_tag, system_tag = "human", "gpt", None
    images_key: str | None = "image"
    if record is not None:
        messages_key = next((k for k in ("conversations", "messages") if k in record), messages_key)
        turns = record.get(messages_key) or []
        first = next((t for t in turns if isinstance(t, dict)), {})
        role_key = next((k for k in ("from", "role") if k in first), role_key)
        content_key = next((k for k in ("value", "content") if k in first), content_key)
        roles = {t.get(role_key) for t in turns if isinstance(t, dict)}
        if roles & {"user", "assistant"} and not roles & {"human", "gpt"}:
            user_tag, assistant_tag = "user", "assistant"
        if "system" in roles:
            system_tag = "system"
        images_key = next((k for k in ("image", "images") if record.get(k) is not None), None)
        if any(isinstance(t, dict) and not isinstance(t.get(content_key), str) for t in turns):
            notes.append(
                "some turn contents are not plain strings: LLaMA-Factory's sharegpt format expects text"
            )
    elif subset_path.exists():
        notes.append("the subset is empty; the LLaMA-Factory entry assumes LLaVA fields")
    columns: dict[str, str] = {"messages": messages_key}
    if images_key:
        columns["images"] = images_key
    tags = {
        "role_tag": role_key,
        "content_tag": content_key,
        "user_tag": user_tag,
        "assistant_tag": assistant_tag,
    }
    if system_tag:
        tags["system_tag"] = system_tag
    try:
        file_name = subset_path.relative_to(dataset_dir).as_posix()
    except ValueError:
        file_name = str(subset_path)
    entry = {
        DATASET_NAME: {"file_name": file_name, "formatting": "sharegpt", "columns": columns, "tags": tags}
    }
    return entry, notes
