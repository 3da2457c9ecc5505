"""Record ids that occur more than once in an input, found without holding the ids in memory."""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Iterator
from typing import Protocol

import numpy as np


class IdSource(Protocol):
    """Anything that yields one ``id`` value (or None) per record, in order: every :class:`Input`."""

    def iter_ids(self) -> Iterator[object | None]: ...


def _id_text(value: object) -> str | None:
    if value is None:
        return None
    text = str(value)
    return text or None


def duplicate_ids(inp: IdSource) -> frozenset[str]:
    """The ids (a record's ``id`` as ``str``) carried by more than one record of ``inp``.

    First pass: one 64-bit hash per id in a compact array (8 bytes a record), sorted to find the
    hashes that repeat. Second pass, only when some do: the ids with a repeated hash are counted
    exactly, so a hash collision never marks two different ids as duplicates. The hash is Python's
    ``hash(str)``, which is stable within the process that runs both passes. ``iter_ids`` is
    called once, or twice when some hash repeats.
    """
    hashes = array("q")
    for value in inp.iter_ids():
        text = _id_text(value)
        if text is not None:
            hashes.append(hash(text))
    if len(hashes) < 2:
        return frozenset()
    ordered = np.frombuffer(hashes, dtype=np.int64)
    ordered.sort()  # in place, in the array's own buffer
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    del ordered, hashes
    if repeated.size == 0:
        return frozenset()
    candidates = set(np.unique(repeated).tolist())
    counts: Counter[str] = Counter()
    for value in inp.iter_ids():
        text = _id_text(value)
        if text is not None and hash(text) in candidates:
            counts[text] += 1
    return frozenset(text for text, n in counts.items() if n > 1)
