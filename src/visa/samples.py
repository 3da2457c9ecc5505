"""The typed records that flow from readers to scorers.

A reader yields :class:`RawRecord` objects in input order (one per record of the input, including
records that could not be parsed). :func:`visa.samples.normalize` turns a parsed record of any
supported dialect (LLaVA ``conversations`` with ``from``/``value``, ShareGPT/OpenAI ``messages`` with
``role``/``content``) into a :class:`Sample`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant"]


class RecordError(ValueError):
    """A record that cannot be turned into a sample; becomes an error row of kind ``malformed``."""


@dataclass(frozen=True, slots=True)
class ImageRef:
    """Where a sample's image comes from: a path (relative to the image root, or a URL) and/or bytes."""

    path: str | None = None
    data: bytes | None = None

    def describe(self) -> str:
        if self.path:
            return self.path
        return f"<{len(self.data or b'')} embedded bytes>"


@dataclass(frozen=True, slots=True)
class Turn:
    role: Role
    text: str


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One record of the input, as read.

    ``index`` is the 0-based position among all records of the input (malformed ones included), so
    it is stable across re-reads. ``line`` is the 1-based line where the record starts in a text
    input (row number + 1 for columnar inputs). ``record`` is the parsed object, or None with
    ``error`` set when the record could not be parsed. ``text`` is the record's exact source text
    for JSON/JSONL inputs (used to write selected records unchanged).
    """

    index: int
    line: int
    record: dict[str, Any] | None
    error: str | None = None
    text: str | None = None


@dataclass(frozen=True, slots=True)
class Sample:
    index: int
    line: int
    record_id: str | None
    record_hash: str
    images: tuple[ImageRef, ...]
    turns: tuple[Turn, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def text_only(self) -> bool:
        return not self.images


def stable_hash(obj: Any, *, size: int = 16) -> str:
    """A hex digest of a JSON-like object that does not depend on key order or the Python process."""
    return hashlib.blake2b(_canonical(obj), digest_size=size).hexdigest()


def _canonical(obj: Any) -> bytes:
    def default(o: Any) -> Any:
        if isinstance(o, (bytes, bytearray, memoryview)):
            return {"$bytes": hashlib.blake2b(bytes(o), digest_size=16).hexdigest()}
        if hasattr(o, "tolist"):  # numpy scalars / arrays from columnar readers
            return o.tolist()
        raise TypeError(f"cannot hash value of type {type(o).__name__}")

    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=default).encode()
