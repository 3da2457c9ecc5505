"""The tag vocabulary of the open-vocabulary detectors (OA) and its packing into text prompts.

The bundled vocabulary (``visa/data/tags.txt``, 1,886 everyday object tags selected from the
Apache-2.0 RAM tag list; the file header says how) is read by :func:`load_tags`.

Grounding DINO reads a prompt such as ``"cat. dog. coffee cup. "`` in one pass of at most 256 text
tokens. The reference procedure renders each tag as ``"tag. "``, shuffles the vocabulary (three
repeats with different seeds, so that every tag is seen in three different contexts) and fills
prompts greedily up to 250 tokens. :func:`pack_prompts` does that and records, for every tag of a
prompt, which token positions belong to it, so detections can be read back per tag.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

BUNDLED = "bundled"


def load_tags(source: str | Path | None = None) -> list[str]:
    """Tags from a text file (one per line; ``#`` comments and blank lines skipped).

    ``None`` or ``"bundled"`` reads the bundled vocabulary. Duplicates (after lower-casing and
    whitespace normalisation) keep their first occurrence. Raises ValueError for a missing or empty
    file, naming it.
    """
    if source is None or str(source) == BUNDLED:
        text = (resources.files("visa") / "data" / "tags.txt").read_text(encoding="utf-8")
        label = "bundled tags.txt"
    else:
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"tag file not found: {path}")
        text = path.read_text(encoding="utf-8")
        label = str(path)
    tags: list[str] = []
    seen: set[str] = set()
    for line in text.splitlines():
        tag = " ".join(line.split())
        if not tag or tag.startswith("#"):
            continue
        key = tag.lower()
        if key not in seen:
            seen.add(key)
            tags.append(tag)
    if not tags:
        raise ValueError(f"tag file {label} holds no tags")
    return tags


@dataclass(frozen=True, slots=True)
class TagSpan:
    """One tag inside a prompt: its name and the token positions ``[start, end)`` of its words.

    Positions index the prompt's ``input_ids`` (position 0 is the leading [CLS]); the ``.`` that
    closes the tag is not part of the span.
    """

    tag: str
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Prompt:
    """A packed text prompt: token ids (with [CLS] ... [SEP]), the tags it holds, its repeat index."""

    input_ids: tuple[int, ...]
    spans: tuple[TagSpan, ...]
    repeat: int

    @property
    def text(self) -> str:
        return "".join(f"{span.tag}. " for span in self.spans)

    @property
    def tags(self) -> list[str]:
        return [span.tag for span in self.spans]


def pack_prompts(
    tags: Sequence[str],
    encode: Callable[[str], list[int]],
    cls_id: int,
    sep_id: int,
    max_tokens: int = 250,
    repeats: int = 3,
    seed: int = 0,
) -> list[Prompt]:
    """Shuffle ``tags`` ``repeats`` times (seeds ``seed``, ``seed + 1``, ...) and pack each shuffle
    greedily into prompts of at most ``max_tokens`` tokens.

    ``encode(text)`` returns the token ids of ``text`` without special tokens. A tag costs the tokens
    of ``"tag."`` (its words and the closing period); ``max_tokens`` counts those, not [CLS]/[SEP].
    Every tag appears exactly once per repeat. A tag longer than ``max_tokens`` on its own raises
    ValueError.
    """
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2, got {max_tokens}")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    pieces: dict[str, tuple[list[int], int]] = {}
    for tag in tags:
        if tag in pieces:
            continue
        words = encode(tag)
        with_period = encode(f"{tag}.")
        if not words or len(with_period) <= len(words) or with_period[: len(words)] != words:
            raise ValueError(f"tag {tag!r} does not tokenise as words followed by a period")
        if len(with_period) > max_tokens:
            raise ValueError(
                f"tag {tag!r} needs {len(with_period)} tokens, more than max_tokens={max_tokens}"
            )
        pieces[tag] = (with_period, len(words))

    prompts: list[Prompt] = []
    for repeat in range(repeats):
        order = list(dict.fromkeys(tags))
        random.Random(seed + repeat).shuffle(order)
        ids: list[int] = []
        spans: list[TagSpan] = []
        for tag in order:
            token_ids, n_words = pieces[tag]
            if spans and len(ids) + len(token_ids) > max_tokens:
                prompts.append(Prompt((cls_id, *ids, sep_id), tuple(spans), repeat))
                ids, spans = [], []
            start = 1 + len(ids)  # +1 for the leading [CLS]
            spans.append(TagSpan(tag, start, start + n_words))
            ids.extend(token_ids)
        if spans:
            prompts.append(Prompt((cls_id, *ids, sep_id), tuple(spans), repeat))
    return prompts
