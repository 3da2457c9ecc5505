"""A JSON file whose top-level value is an array of records (the LLaVA release format), streamed.

The file is never loaded whole. It is decoded in chunks into a sliding window; each element is
parsed in place with the C JSON decoder (``raw_decode``), which also gives its exact span, so the
element's source text and starting line come for free. When that fast path fails (the element is
malformed, or runs past the end of the window) a tolerant scanner takes over: it tracks string
state, escapes and nesting depth with regular expressions that jump straight to the next
interesting character, finds where the element ends (the next ``,`` or ``]`` at depth 0), and the
element is parsed on its own. A malformed element thus becomes one error record and reading goes
on with the next one.
"""

from __future__ import annotations

import codecs
import functools
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from visa.readers import safe_json
from visa.readers.base import (
    DEFAULT_MAX_RECORD_BYTES,
    Input,
    InputError,
    json_type_name,
    pick,
)
from visa.run_folder import SUBSET_JSON, atomic_write
from visa.samples import RawRecord

CHUNK_CHARS = 1 << 20

_WS = re.compile(r"[ \t\n\r]*")
_STRUCTURAL = re.compile(r'[\[\]{},"]')
# A raw newline cannot occur inside a valid JSON string; ending the string there keeps one broken
# quote from swallowing the rest of a pretty-printed or one-element-per-line file.
_IN_STRING = re.compile(r'["\\\n]')
# Undecodable bytes survive decoding as lone surrogates (errors="surrogateescape").
_BAD_BYTES = re.compile("[\udc80-\udcff]")
_raw_decode = safe_json.raw_decode
_RESYNC_OVERLAP = 4096


@functools.lru_cache(maxsize=16)
def _resync_pattern(indent: str) -> re.Pattern[str]:
    """Where an element indented by ``indent`` ends when its own syntax cannot be trusted."""
    next_element = r"(?P<comma>,)[ \t\r]*\n" + re.escape(indent) + r"(?=[{\[])"
    closing_bracket = rf"\n(?=[ \t]{{0,{len(indent)}}}\][ \t\r]*(?:\n|\Z))"
    return re.compile(next_element + "|" + closing_bracket)


_UNPARSED = object()


def check_array_start(path: Path) -> None:
    """Raise InputError unless the file's first non-blank character is ``[``."""
    with path.open("rb") as f:
        head = f.read(1 << 16)
    head = head.removeprefix(codecs.BOM_UTF8).lstrip(b" \t\r\n")
    if not head:
        raise InputError(f"{path}: the file is empty; expected a JSON array of records")
    if head[:1] != b"[":
        hint = " (one JSON object per line? name the file .jsonl)" if head[:1] == b"{" else ""
        raise InputError(f"{path}: the top-level JSON value is not an array{hint}")


class _Window:
    """Decoded text of the file from ``pos`` on, refilled chunk by chunk, with line accounting."""

    def __init__(self, f: IO[bytes], chunk_chars: int) -> None:
        self._f = f
        self._chunk = chunk_chars
        self._decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="surrogateescape")
        self.buf = ""
        self.pos = 0
        self.eof = False
        self.bad_bytes = False
        self._dropped = False  # whether text before buf[0] was discarded
        self._line_pos = 0  # a buf index whose line number is _line
        self._line = 1

    def fill(self) -> bool:
        """Drop ``buf[:pos]``, append the next chunk and set ``pos`` to 0; False once nothing is left."""
        if self.eof:
            return False
        data = self._f.read(self._chunk)
        text = self._decoder.decode(data, final=not data)
        self.eof = not data
        if not self.bad_bytes and _BAD_BYTES.search(text):
            self.bad_bytes = True
        if self.pos:
            self._dropped = True
            self.line_of(self.pos)
            self._line_pos -= self.pos
            self.buf = self.buf[self.pos :] + text
            self.pos = 0
        else:
            self.buf += text
        return bool(text) or not self.eof

    def line_of(self, i: int) -> int:
        """The 1-based line of ``buf[i]``; ``i`` never goes backwards between calls."""
        self._line += self.buf.count("\n", self._line_pos, i)
        self._line_pos = i
        return self._line

    def indentation(self, i: int) -> str | None:
        """The blanks between the start of ``buf[i]``'s line and ``i``; None if ``i`` is not first on it."""
        newline = self.buf.rfind("\n", 0, i)
        if newline < 0 and self._dropped:
            return None
        prefix = self.buf[newline + 1 : i]
        return prefix if not prefix.strip(" \t") else None

    def skip_ws(self) -> bool:
        """Advance ``pos`` past whitespace; False at the end of the file."""
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return True
            if not self.fill():
                return False



@dataclass
class _Scan:
    """The state of :meth:`JsonArrayInput._scan_element` over the window's buffer: the element's
    start, the scan position, nesting depth, whether inside a string, and the resync pattern once
    an unclosed string made depth tracking unreliable."""

    start: int
    i: int
    indent: str | None
    depth: int = 0
    in_string: bool = False
    too_large: bool = False
    resync: re.Pattern[str] | None = None

    def text(self, buf: str, start: int, end: int | None) -> str | None:
        return None if self.too_large else buf[start:end].rstrip(" \t\r\n")

    def chunk(self, w: _Window) -> tuple[str | None, str | None] | None:
        """Scan the rest of the buffer: the element and its terminator, or None to read more."""
        buf = w.buf
        n = len(buf)
        while self.i < n:
            if self.resync is not None:
                return self._resync(w, buf, n)
            if self.in_string:
                if not self._string(w, buf, n):
                    return None
                continue
            m = _STRUCTURAL.search(buf, self.i)
            if m is None:
                self.i = n
                return None
            c = m.group()
            self.i = m.end()
            if c == '"':
                self.in_string = True
            elif c == "{" or c == "[":
                self.depth += 1
            elif self.depth == 0 and (c == "," or c == "]"):
                w.pos = self.i - 1
                return self.text(buf, self.start, self.i - 1), c
            elif c == "}" or c == "]":
                self.depth = max(self.depth - 1, 0)
        return None

    def _resync(self, w: _Window, buf: str, n: int) -> tuple[str | None, str | None] | None:
        assert self.resync is not None
        m = self.resync.search(buf, self.i)
        if m is None:
            self.i = max(self.i, n - _RESYNC_OVERLAP)  # a separator may straddle the chunk boundary
            return None
        end = m.start()
        w.pos = end if m.group("comma") else buf.index("]", m.end())
        return self.text(buf, self.start, end), buf[w.pos]

    def _string(self, w: _Window, buf: str, n: int) -> bool:
        """Advance inside a string; False when the rest of it is in the next chunk."""
        m = _IN_STRING.search(buf, self.i)
        if m is None:
            self.i = n
            return False
        c = m.group()
        if c == "\\":
            if m.end() >= n and not w.eof:
                self.i = m.start()  # the escaped character is in the next chunk
                return False
            self.i = min(m.end() + 1, n)
            return True
        self.in_string = False
        self.i = m.end()
        if c == "\n" and self.indent is not None:
            self.resync = _resync_pattern(self.indent)
            self.i = len(buf[self.start : m.start()].rstrip(" \t\r")) + self.start  # the line's own end
            if self.i > self.start and buf[self.i - 1] == ",":
                self.i -= 1
        return True


class JsonArrayInput(Input):
    """A ``.json`` file holding one top-level array of record objects."""

    format = "json"

    def __init__(
        self, path: Path, *, chunk_chars: int = CHUNK_CHARS, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    ) -> None:
        super().__init__(path)
        self.chunk_chars = chunk_chars
        self.max_record_bytes = max_record_bytes

    def files(self) -> list[Path]:
        return [self.path]

    def iter_raw(self) -> Iterator[RawRecord]:
        with self.path.open("rb") as f:
            yield from self._iter(_Window(f, self.chunk_chars))

    def write_subset(self, indices: Iterable[int], out_dir: Path) -> Path:
        target = Path(out_dir) / SUBSET_JSON

        def write(tmp: Path) -> None:
            with tmp.open("wb") as out:
                out.write(b"[")
                separator = b"\n"
                for raw in pick(self.iter_raw(), indices):
                    out.write(separator)
                    out.write((raw.text or "").encode("utf-8"))
                    separator = b",\n"
                out.write(b"]\n" if separator == b"\n" else b"\n]\n")

        atomic_write(target, write)
        return target

    # -- scanning ----------------------------------------------------------------------------------

    def _iter(self, w: _Window) -> Iterator[RawRecord]:
        if not w.skip_ws() or w.buf[w.pos] != "[":
            raise InputError(f"{self.path}: the top-level JSON value is not an array")
        w.pos += 1
        index = 0
        if not w.skip_ws():
            yield RawRecord(index, w.line_of(w.pos), None, "the file ends before the array is closed")
            return
        if w.buf[w.pos] == "]":
            w.pos += 1
            yield from self._trailing(w, index)
            return
        while True:
            line = w.line_of(w.pos)
            fast = self._parse_in_place(w)
            if fast is not None:
                text, obj, terminator = fast
            else:
                text, terminator = self._scan_element(w)
                obj = _UNPARSED
            record, error = self._to_record(
                text, obj, line, truncated=terminator is None, may_have_bad_bytes=w.bad_bytes
            )
            yield RawRecord(index, line, record, error, text)
            index += 1
            if terminator is None:
                if error is None:
                    yield RawRecord(index, w.line_of(w.pos), None, "the file ends before the array is closed")
                return
            w.pos += 1
            if terminator == "]":
                yield from self._trailing(w, index)
                return
            if not w.skip_ws():
                yield RawRecord(index, w.line_of(w.pos), None, "the file ends before the array is closed")
                return
            if w.buf[w.pos] == "]":  # a trailing comma: tolerated
                w.pos += 1
                yield from self._trailing(w, index)
                return

    def _parse_in_place(self, w: _Window) -> tuple[str, Any, str | None] | None:
        """Parse the element at ``pos`` with the C decoder; None when the tolerant scanner must decide."""
        buf, start = w.buf, w.pos
        try:
            obj, end = _raw_decode(buf, start)
        except safe_json.PARSE_FAILURES:
            return None
        after = _WS.match(buf, end).end()
        if after < len(buf):
            terminator = buf[after]
            if terminator != "," and terminator != "]":
                return None
        elif not w.eof:
            return None  # the element may continue in the next chunk (e.g. a number)
        else:
            terminator = None
        w.pos = after
        return buf[start:end], obj, terminator

    def _scan_element(self, w: _Window) -> tuple[str | None, str | None]:
        """Find the end of the element at ``pos``: the next ``,`` or ``]`` outside strings at depth 0.

        Returns the element text (None when it exceeded ``max_record_bytes``) and the terminator
        (None at the end of the file); leaves ``pos`` on the terminator. Once a raw newline shows a
        string was never closed, string and depth tracking can no longer be trusted; the element
        then ends before the next line that starts a value at the element's own indentation after a
        ``,`` (or a line holding the array's closing ``]``).
        """
        scan = _Scan(start=w.pos, i=w.pos, indent=w.indentation(w.pos))
        while True:
            found = scan.chunk(w)
            if found is not None:
                return found
            if not scan.too_large and scan.i - scan.start > self.max_record_bytes:
                scan.too_large = True
            w.pos = scan.i if scan.too_large else scan.start
            shift = w.pos
            if not w.fill():
                w.pos = len(w.buf)
                return scan.text(w.buf, scan.start - shift, None), None
            scan.i -= shift
            scan.start -= shift

    def _to_record(
        self, text: str | None, obj: Any, line: int, *, truncated: bool, may_have_bad_bytes: bool
    ) -> tuple[dict[str, Any] | None, str | None]:
        if text is None:
            return None, f"line {line}: the element is larger than {self.max_record_bytes} bytes"
        if may_have_bad_bytes and _BAD_BYTES.search(text):
            return None, f"line {line}: the element contains bytes that are not valid UTF-8"
        if obj is _UNPARSED:
            try:
                obj = safe_json.loads(text)
            except json.JSONDecodeError as e:
                where = f"line {line + e.lineno - 1}"
                if truncated:
                    return None, f"{where}: the file ends inside this element (truncated?): {e.msg}"
                return None, f"{where}: invalid JSON: {e.msg} (element starts at line {line})"
            except safe_json.PARSE_FAILURES as e:
                return None, f"line {line}: {safe_json.failure_message(e)}"
        if not isinstance(obj, dict):
            return None, f"line {line}: the element is a JSON {json_type_name(obj)}, expected an object"
        problem = safe_json.check_value(obj)
        if problem is not None:
            return None, f"line {line}: {problem}"
        return obj, None

    def _trailing(self, w: _Window, index: int) -> Iterator[RawRecord]:
        if w.skip_ws():
            yield RawRecord(
                index, w.line_of(w.pos), None, "unexpected content after the closing ']' of the array"
            )
