"""JSON Lines (``.jsonl`` / ``.ndjson``): one record object per non-blank line."""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from visa.readers import safe_json
from visa.readers.base import DEFAULT_MAX_RECORD_BYTES, Input, json_type_name, pick
from visa.run_folder import SUBSET_JSONL, atomic_write
from visa.samples import RawRecord

_SKIP_CHUNK = 1 << 20


class JsonlInput(Input):
    """Each non-blank line is one record; ``line`` is its 1-based line number, ``text`` the line
    without its ``\\n`` (a ``\\r`` before it is kept, so records are copied byte for byte)."""

    format = "jsonl"

    def __init__(self, path: Path, *, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> None:
        super().__init__(path)
        self.max_record_bytes = max_record_bytes

    def files(self) -> list[Path]:
        return [self.path]

    def iter_raw(self) -> Iterator[RawRecord]:
        index = 0
        limit = self.max_record_bytes
        with self.path.open("rb") as f:
            for line_no, data in enumerate(iter(lambda: f.readline(limit + 1), b""), start=1):
                if line_no == 1:
                    data = data.removeprefix(codecs.BOM_UTF8)
                if len(data) > limit and not data.endswith(b"\n"):
                    while (rest := f.readline(_SKIP_CHUNK)) and not rest.endswith(b"\n"):
                        pass
                    yield RawRecord(index, line_no, None, f"line {line_no}: longer than {limit} bytes")
                    index += 1
                    continue
                if not data.strip():
                    continue
                data = data.removesuffix(b"\n")
                record, error = _parse_line(data, line_no)
                yield RawRecord(index, line_no, record, error, data.decode("utf-8", "surrogateescape"))
                index += 1

    def write_subset(self, indices: Iterable[int], out_dir: Path) -> Path:
        target = Path(out_dir) / SUBSET_JSONL

        def write(tmp: Path) -> None:
            with tmp.open("wb") as out:
                for raw in pick(self.iter_raw(), indices):
                    out.write((raw.text or "").encode("utf-8"))
                    out.write(b"\n")

        atomic_write(target, write)
        return target


def _parse_line(data: bytes, line_no: int) -> tuple[dict[str, Any] | None, str | None]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"line {line_no}: invalid UTF-8 at byte {e.start} of the line"
    try:
        obj = safe_json.loads(text)
    except safe_json.PARSE_FAILURES as e:
        return None, f"line {line_no}: {safe_json.failure_message(e)}"
    if not isinstance(obj, dict):
        return None, f"line {line_no}: the line is a JSON {json_type_name(obj)}, expected an object"
    problem = safe_json.check_value(obj)
    if problem is not None:
        return None, f"line {line_no}: {problem}"
    return obj, None
