"""Which samples the report shows, and their thumbnails and texts.

Galleries are small samples of the run (top, bottom and random rows per score, dropped rows per
reason), so the report costs the same at 3M records as at 3K. The shown records are read back from
the input in one streaming pass that stops after the last wanted record; their images go through the
same confined, size-checked reader and decoder as scoring (URLs are never fetched here).
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from visa.images import ImageSource
    from visa.readers import Input
    from visa.run_folder import RunRecord
    from visa.samples import ImageRef, RawRecord

THUMB_PX = 160
JPEG_QUALITY = 72
QUESTION_CHARS = 220
ANSWER_CHARS = 280
_PLACEHOLDER = re.compile(r"<image>\s*", re.IGNORECASE)


@dataclass
class Shown:
    """What the report knows about one record it shows."""

    row: int
    thumb: str | None = None  # data URI of a JPEG thumbnail
    image_note: str | None = None  # why there is no thumbnail
    more_images: int = 0
    question: str = ""
    answer: str = ""
    record_note: str | None = None


def top(
    values: np.ndarray, rows: np.ndarray, candidates: np.ndarray, k: int, *, highest: bool = True
) -> np.ndarray:
    """Positions of the ``k`` candidates with the highest (or lowest) value, best first; ties by row.

    Uses a partial partition, so picking 12 of 3M rows does not sort them all.
    """
    if k <= 0 or candidates.size == 0:
        return np.zeros(0, dtype=np.int64)
    v = values[candidates]
    key = -v if highest else v
    if candidates.size > k:
        kth = np.partition(key, k - 1)[k - 1]
        candidates = candidates[key <= kth]
        v = values[candidates]
        key = -v if highest else v
    order = np.lexsort((rows[candidates], key))
    return candidates[order[:k]]


def sample(candidates: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``k`` candidates drawn without replacement, in their original order."""
    if k <= 0 or candidates.size == 0:
        return np.zeros(0, dtype=np.int64)
    if candidates.size <= k:
        return candidates
    return np.sort(rng.choice(candidates, size=k, replace=False))


class ImageIndex:
    """Finds the first row of every image among any subset of rows, after one sort of the image codes."""

    def __init__(self, image_codes: np.ndarray) -> None:
        self.order = np.argsort(image_codes, kind="stable")  # rows of one image stay in row order
        self.sorted_codes = image_codes[self.order]

    def first(self, mask: np.ndarray) -> np.ndarray:
        """Sorted positions of the first ``mask`` row of each image (rows without an image are dropped)."""
        keep = mask[self.order] & (self.sorted_codes >= 0)
        codes = self.sorted_codes[keep]
        positions = self.order[keep]
        if codes.size == 0:
            return np.zeros(0, dtype=np.int64)
        starts = np.ones(codes.size, dtype=bool)
        starts[1:] = codes[1:] != codes[:-1]
        return np.sort(positions[starts])


def strip_text(text: str, limit: int) -> str:
    text = _PLACEHOLDER.sub("", text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def thumbnail(data: bytes, limits: Any) -> str:
    """A JPEG data URI of at most THUMB_PX on the long side, via the safe decoder."""
    from visa.images import decode_image

    image = decode_image(data, limits)
    image.thumbnail((THUMB_PX, THUMB_PX), Image.Resampling.LANCZOS, reducing_gap=3.0)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def load_shown(
    run: RunRecord,
    wanted: Mapping[int, tuple[str, str | None]],
    notes: list[str],
) -> dict[int, Shown]:
    """Read the records at input indices ``wanted`` (``{row: (sample_id, image_key)}``) in one pass.

    Returns a :class:`Shown` for every wanted row; a record that cannot be read, or that no longer
    matches its sample id (the input changed since the run), gets a note instead of content.
    """
    from visa.readers import InputError

    shown = {row: Shown(row) for row in wanted}
    if not wanted:
        return shown
    opened = _open_input(run, shown, notes)
    if opened is None:
        return shown
    source, images = opened
    cache: dict[str, tuple[str | None, str | None]] = {}
    last = max(wanted)
    seen: set[int] = set()
    try:
        for raw in source.iter_raw():
            if raw.index > last:
                break
            if raw.index in wanted:
                seen.add(raw.index)
                _fill(shown[raw.index], raw, wanted[raw.index], images, cache)
    except (InputError, OSError, ValueError) as err:
        notes.append(f"reading the input stopped early ({_first_line(err)})")
    for row in set(wanted) - seen:
        if shown[row].record_note is None:
            shown[row].record_note = "record not found in the input"
    return shown


def _open_input(run: RunRecord, shown: Mapping[int, Shown], notes: list[str]) -> tuple[Input, ImageSource] | None:
    """The run's input and its images (read-only, no URLs), or None with a note on every card."""
    from visa.images import ImageLimits, ImageSource
    from visa.readers import InputError
    from visa.run_folder import NoInputRecorded, reopen_input

    try:
        source, changed = reopen_input(run)
    except NoInputRecorded:
        _note_all(shown, "the run records no input path")
        notes.append("run.json names no input: galleries show scores without images or texts")
        return None
    except (InputError, OSError) as err:
        _note_all(shown, "input not readable")
        notes.append(f"the input cannot be read ({_first_line(err)}): galleries show scores only")
        return None
    if changed:
        notes.append("the input changed since the run: each shown record is checked against its sample id")
    spec = run.input
    assert spec is not None and spec.path is not None  # reopen_input checked it
    root = Path(spec.image_root) if spec.image_root else Path(spec.path).parent
    return source, ImageSource(root, ImageLimits(allow_urls=False))


def _fill(
    item: Shown,
    raw: RawRecord,
    expected: tuple[str, str | None],
    images: ImageSource,
    cache: dict[str, tuple[str | None, str | None]],
) -> None:
    """One card's question, answer and thumbnail, after checking the record is still the sample."""
    from visa.samples import RecordError, normalize

    sample_id, image_key = expected
    try:
        sample = normalize(raw)
    except RecordError as err:
        item.record_note = f"malformed record: {_first_line(err)}"
        return
    ids = {"h:" + sample.record_hash}
    if sample.record_id is not None:
        ids.add(sample.record_id)
    if sample_id not in ids:
        item.record_note = "the input record at this position is no longer this sample"
        return
    user = next((t for t in sample.turns if t.role == "user"), None)
    if user is not None:
        item.question = strip_text(user.text, QUESTION_CHARS)
        after = sample.turns[sample.turns.index(user) + 1 :]
        answer = next((t for t in after if t.role == "assistant"), None)
        if answer is not None:
            item.answer = strip_text(answer.text, ANSWER_CHARS)
    if not sample.images:
        item.image_note = "text only"
        return
    item.more_images = len(sample.images) - 1
    ref = sample.images[0]
    key = image_key or (ref.path if ref.path else None)
    if key is not None and key in cache:
        item.thumb, item.image_note = cache[key]
        return
    _fill_thumb(item, ref, images)
    if key is not None:
        cache[key] = (item.thumb, item.image_note)


def _fill_thumb(item: Shown, ref: ImageRef, images: ImageSource) -> None:
    from visa.images import ImageError

    try:
        item.thumb = thumbnail(images.read_bytes(ref), images.limits)
    except ImageError as err:
        item.image_note = f"image unavailable: {err.kind}"
    except OSError as err:
        item.image_note = f"image unavailable: {_first_line(err)}"


def _note_all(shown: Mapping[int, Shown], note: str) -> None:
    for item in shown.values():
        item.record_note = note


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def unique_in_order(groups: Iterable[Iterable[int]]) -> list[int]:
    return list(dict.fromkeys(int(p) for group in groups for p in group))
