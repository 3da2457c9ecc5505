"""Parsing one JSON record from hostile text: every failure becomes an error message, never an exception.

Valid JSON can still break a program that reads it. :func:`parse_record` guards the cases that the
standard library lets through or turns into exceptions other than ``JSONDecodeError``:

* **nesting**: the C decoder raises ``RecursionError`` around 1,000 levels, and anything that later
  walks the record recursively (hashing, ``json.dumps``) fails far earlier under a deep stack. A
  record nested deeper than :data:`MAX_DEPTH` levels is refused;
* **huge integers**: a literal of more than ``sys.get_int_max_str_digits()`` digits makes ``int()``
  raise ``ValueError``; such a literal is kept as its text (a string), so the record survives;
* **lone surrogates**: ``"\\ud800"`` is valid JSON but no valid Unicode; a string holding one
  cannot be encoded (UTF-8, Arrow, Parquet) and would crash every write. A record with one is
  refused, naming the field;
* **keys**: a key longer than :data:`MAX_KEY_CHARS` characters is refused (no format uses such keys).

The checks walk the parsed value iteratively (an explicit stack), so they cannot overflow the
Python stack themselves.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from typing import Any

MAX_DEPTH = 64
"""Containers (objects and arrays) nested deeper than this make a record malformed."""

MAX_KEY_CHARS = 4096
"""An object key longer than this makes a record malformed."""

_SURROGATE = re.compile("[\ud800-\udfff]")


def _int_or_text(literal: str) -> int | str:
    """An integer literal as an ``int``; one too long for ``int()`` is kept as its text."""
    limit = sys.get_int_max_str_digits()
    if limit and len(literal.lstrip("-")) > limit:
        return literal
    return int(literal)


DECODER = json.JSONDecoder(parse_int=_int_or_text)
"""The decoder every JSON reader uses (huge integer literals survive as text)."""

raw_decode: Callable[[str, int], tuple[Any, int]] = DECODER.raw_decode

PARSE_FAILURES = (json.JSONDecodeError, RecursionError, ValueError, MemoryError)
"""What ``DECODER`` can raise on hostile text."""


def loads(text: str) -> Any:
    """``json.loads`` with :data:`DECODER` (raises one of :data:`PARSE_FAILURES`)."""
    return DECODER.decode(text)


def failure_message(err: BaseException) -> str:
    """What went wrong in a parse that raised one of :data:`PARSE_FAILURES`, in words."""
    if isinstance(err, json.JSONDecodeError):
        return f"invalid JSON at column {err.colno}: {err.msg}"
    if isinstance(err, RecursionError):
        return f"invalid JSON: nested deeper than {MAX_DEPTH} levels"
    if isinstance(err, MemoryError):
        return "invalid JSON: too large to parse in memory"
    return f"invalid JSON: {str(err).splitlines()[0] if str(err) else type(err).__name__}"


def check_value(obj: Any) -> str | None:
    """Why ``obj`` (a parsed JSON value) cannot be used as a record, or None when it can.

    Walks every container once, without recursion: nesting deeper than :data:`MAX_DEPTH`, a string
    or key holding a lone surrogate, a key longer than :data:`MAX_KEY_CHARS`. The message names the
    top-level field where the problem is.
    """
    stack: list[tuple[Any, int, str]] = [(obj, 1, "")]
    while stack:
        value, depth, field = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return f"{_where(field)} holds a lone surrogate escape (\\ud800-\\udfff), which is not valid Unicode"
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth > MAX_DEPTH:
            return f"{_where(field)} is nested deeper than {MAX_DEPTH} levels"
        if isinstance(value, list):
            stack.extend((item, depth + 1, field) for item in value)
            continue
        for key, item in value.items():
            problem = _check_key(key, field)
            if problem is not None:
                return problem
            stack.append((item, depth + 1, field or key))
    return None


def _where(field: str) -> str:
    if not field:
        return "the record"
    shown = field if len(field) <= 60 else field[:57] + "..."
    return f"field {shown!r}"


def _check_key(key: str, field: str) -> str | None:
    if len(key) > MAX_KEY_CHARS:
        return f"{_where(field)} has a key of {len(key)} characters (more than {MAX_KEY_CHARS})"
    if _SURROGATE.search(key):
        return f"{_where(field)} has a key holding a lone surrogate escape, which is not valid Unicode"
    return None
