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


# -- normalizing records of every supported dialect ---------------------------------------------------

_ROLES: dict[str, Role] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "system": "system",
}
_TURN_FIELDS = ("conversations", "messages")
_IMAGE_FIELDS = ("image", "images")
_NOT_META = frozenset({"id", *_TURN_FIELDS, *_IMAGE_FIELDS})
_TEXT_PART_TYPES = frozenset({"text", "input_text"})
_IMAGE_PART_TYPES = frozenset({"image", "image_url", "input_image"})
_IMAGE_PART_KEYS = ("image", "path", "url", "image_url")


def normalize(raw: RawRecord) -> Sample:
    """Turn a parsed record into a :class:`Sample`, or raise :class:`RecordError` saying what is wrong.

    Dialects: LLaVA (``conversations`` of ``{from, value}``; ``image`` a path or a list of paths;
    no image for text-only records) and ShareGPT/OpenAI (``messages`` of ``{role, content}``,
    ``content`` a string or a list of ``{type: text, text}`` / ``{type: image, image|path|url}``
    parts; ``images`` a list). An image is a path/URL string, bytes, a ``{bytes, path}`` struct (as
    Parquet and ``datasets`` store them), or a list of these. Top-level images come first, then
    images given inside content parts, in turn order; an image part without a value only marks
    where a top-level image goes. Roles ``human``/``user`` become ``user``; ``gpt``/``assistant``/
    ``bot``/``model`` become ``assistant``. Texts are kept exactly (``<image>`` placeholders
    included). ``meta`` holds every other top-level field whose value is JSON-like.
    """
    rec = raw.record
    if rec is None:
        raise RecordError(raw.error or "the record could not be parsed")
    if not isinstance(rec, dict):
        raise RecordError(f"the record is {_a(rec)}, expected an object")

    turns_field = _one_of(rec, _TURN_FIELDS)
    if turns_field is None:
        raise RecordError("the record has no 'conversations' or 'messages' list")
    messages = rec[turns_field]
    if not isinstance(messages, (list, tuple)):
        raise RecordError(f"'{turns_field}' is {_a(messages)}, expected a list of turns")

    images: list[ImageRef] = []
    image_field = _one_of(rec, _IMAGE_FIELDS)
    if image_field is not None:
        images.extend(_image_refs(rec[image_field], image_field))
    turns = tuple(_turn(turn, f"{turns_field}[{k}]", images) for k, turn in enumerate(messages))
    roles = {t.role for t in turns}
    if "user" not in roles:
        raise RecordError(f"'{turns_field}' has no user turn")
    if "assistant" not in roles:
        raise RecordError(f"'{turns_field}' has no assistant turn")

    record_id = rec.get("id")
    record_id = str(record_id) if record_id is not None and str(record_id) != "" else None
    return Sample(
        index=raw.index,
        line=raw.line,
        record_id=record_id,
        record_hash=_record_hash(rec),
        images=tuple(images),
        turns=turns,
        meta={k: v for k, v in rec.items() if k not in _NOT_META and _json_like(v)},
    )


def sample_id(sample: Sample, duplicates: frozenset[str]) -> str:
    """The key of a sample in every table: its record id when present and unique in the input,
    else ``"h:"`` + its content hash (see :func:`visa.readers.duplicate_ids`)."""
    if sample.record_id is not None and sample.record_id not in duplicates:
        return sample.record_id
    return "h:" + sample.record_hash


def _one_of(rec: dict[str, Any], names: tuple[str, str]) -> str | None:
    """Which of two alternative fields the record uses (a None value counts as absent)."""
    first, second = rec.get(names[0]) is not None, rec.get(names[1]) is not None
    if first and second:
        raise RecordError(f"the record has both '{names[0]}' and '{names[1]}'; expected one")
    return names[0] if first else names[1] if second else None


def _turn(turn: Any, where: str, images: list[ImageRef]) -> Turn:
    if not isinstance(turn, dict):
        raise RecordError(f"{where} is {_a(turn)}, expected an object")
    role_name = turn.get("from") if turn.get("from") is not None else turn.get("role")
    if not isinstance(role_name, str):
        raise RecordError(f"{where} has no 'from' or 'role' string")
    role = _ROLES.get(role_name.strip().lower())
    if role is None:
        raise RecordError(f"{where} has unknown role {role_name!r}")
    content = turn.get("value") if turn.get("value") is not None else turn.get("content")
    if isinstance(content, str):
        return Turn(role, content)
    if isinstance(content, (list, tuple)):
        return Turn(role, _parts_text(content, where, images))
    raise RecordError(
        f"{where} ({role_name}) text is {'missing' if content is None else _a(content)}, expected a string"
    )


def _parts_text(parts: list[Any] | tuple[Any, ...], where: str, images: list[ImageRef]) -> str:
    texts: list[str] = []
    for k, part in enumerate(parts):
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise RecordError(f"{where}.content[{k}] is {_a(part)}, expected an object")
        kind = part.get("type")
        if kind is None:
            kind = "text" if part.get("text") is not None else "image"
        if kind in _TEXT_PART_TYPES:
            text = part.get("text")
            if not isinstance(text, str):
                raise RecordError(f"{where}.content[{k}] text is {_a(text)}, expected a string")
            texts.append(text)
        elif kind in _IMAGE_PART_TYPES:
            value = next((part[key] for key in _IMAGE_PART_KEYS if part.get(key) is not None), None)
            if isinstance(value, dict) and "url" in value and "bytes" not in value and "path" not in value:
                value = value["url"]  # OpenAI {"image_url": {"url": ...}}
            if value is not None:
                images.extend(_image_refs(value, f"{where}.content[{k}]", allow_empty=False))
        else:
            raise RecordError(f"{where}.content[{k}] has unsupported type {kind!r}")
    return "\n".join(texts)


def _image_refs(value: Any, where: str, *, allow_empty: bool = True) -> list[ImageRef]:
    """The images of one image field; an absent value ("" / None / []) means a text-only record."""
    if value is None or (allow_empty and (value == "" or value == [])):
        return []
    if isinstance(value, (list, tuple)):
        return [_image_ref(item, f"{where}[{k}]") for k, item in enumerate(value)]
    return [_image_ref(value, where)]


def _image_ref(value: Any, where: str) -> ImageRef:
    if isinstance(value, str):
        if not value:
            raise RecordError(f"'{where}' is an empty image path")
        return ImageRef(path=value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        if not value:
            raise RecordError(f"'{where}' holds empty image bytes")
        return ImageRef(data=bytes(value))
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        data, path = value.get("bytes"), value.get("path")
        if data is not None and not isinstance(data, (bytes, bytearray, memoryview)):
            raise RecordError(f"'{where}' bytes is {_a(data)}, expected bytes")
        if path is not None and not isinstance(path, str):
            raise RecordError(f"'{where}' path is {_a(path)}, expected a string")
        if not data and not path:
            raise RecordError(f"'{where}' has neither image bytes nor a path")
        return ImageRef(path=path or None, data=bytes(data) if data else None)
    raise RecordError(
        f"'{where}' is {_a(value)}; expected an image path, bytes, a {{bytes, path}} "
        "struct, or a list of these"
    )


def _a(value: Any) -> str:
    """A value's type for messages: "a str", "an int", "null"."""
    if value is None:
        return "null"
    name = type(value).__name__
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def _json_like(value: Any) -> bool:
    if value is None or isinstance(value, (str, bool, int, float)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_json_like(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_like(v) for k, v in value.items())
    return False


def _record_hash(rec: dict[str, Any]) -> str:
    try:
        return stable_hash(rec)
    except TypeError:  # values JSON cannot carry (timestamps, decimals from Parquet): hash their text
        return stable_hash(_hashable(rec))


def _hashable(value: Any) -> Any:
    if value is None or isinstance(value, (str, bool, int, float, bytes, bytearray, memoryview)):
        return value
    if isinstance(value, dict):
        return {str(k): _hashable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_hashable(v) for v in value]
    if hasattr(value, "tolist"):
        return _hashable(value.tolist())
    return {"$" + type(value).__name__: str(value)}
