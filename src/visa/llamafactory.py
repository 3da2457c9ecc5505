"""A subset LLaMA-Factory loads: its ``dataset_info.json`` entry, and the shape of the written records.

LLaMA-Factory reads a local dataset through ``datasets.load_dataset(<type>, data_files=...)``, the
type coming from the file extension (``json``/``jsonl``, ``parquet``, ``arrow``, ``csv``); a folder
is read as all of its files, which must then share one extension. It maps records onto its
``sharegpt`` format through the entry's ``columns`` (``messages``, ``images``, ``videos``,
``system``, ``tools``) and ``tags`` (which keys hold a turn's role and text, and which role values
are user, assistant and system).

This module

* derives that entry from **all** records of the written subset (a text-only first record, a
  dialect used by some records only, a ``system`` turn in one conversation are all seen);
* points ``file_name`` at something the loader accepts: the subset file itself, or the single
  ``.arrow`` data file of a ``datasets`` folder (written with one shard for this reason);
* makes a JSON / JSONL subset loadable by ``datasets``, which builds one Arrow schema for the
  whole file: a field that holds a single value in some records and a list in others (LLaVA's
  ``image: "a.jpg"`` beside ``image: ["a.jpg", "b.jpg"]``, the same in nested metadata) is written
  as a list in every record of the subset (an empty string becomes an empty list). Records that
  need no change are copied byte for byte; the input itself is never modified.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visa.run_folder import atomic_write

DATASET_NAME = "visa_selected"
LOADER_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}
"""File types LLaMA-Factory's local-file loader accepts, with the ``datasets`` builder each maps to."""

_MESSAGE_FIELDS = ("conversations", "messages")
_IMAGE_FIELDS = ("image", "images")
_VIDEO_FIELDS = ("video", "videos")
_USER_ROLES = ("human", "user")
_ASSISTANT_ROLES = ("gpt", "assistant")


@dataclass
class DialectScan:
    """What the records of a subset use, counted over all of them."""

    records: int = 0
    messages: Counter[str] = field(default_factory=Counter)
    role_keys: Counter[str] = field(default_factory=Counter)
    content_keys: Counter[str] = field(default_factory=Counter)
    roles: Counter[str] = field(default_factory=Counter)
    images: Counter[str] = field(default_factory=Counter)
    videos: Counter[str] = field(default_factory=Counter)
    system_field: int = 0
    tools_field: int = 0
    non_text_contents: int = 0

    def add(self, record: Mapping[str, Any]) -> None:
        self.records += 1
        name = next((k for k in _MESSAGE_FIELDS if record.get(k) is not None), None)
        if name is not None:
            self.messages[name] += 1
            for turn in record[name] if isinstance(record[name], list) else ():
                self._add_turn(turn)
        for counter, names in ((self.images, _IMAGE_FIELDS), (self.videos, _VIDEO_FIELDS)):
            present = next((k for k in names if _has_value(record.get(k))), None)
            if present is not None:
                counter[present] += 1
        self.system_field += isinstance(record.get("system"), str)
        self.tools_field += record.get("tools") is not None

    def _add_turn(self, turn: Any) -> None:
        if not isinstance(turn, Mapping):
            return
        role_key = next((k for k in ("from", "role") if k in turn), None)
        content_key = next((k for k in ("value", "content") if k in turn), None)
        if role_key is not None:
            self.role_keys[role_key] += 1
            self.roles[str(turn[role_key])] += 1
        if content_key is not None:
            self.content_keys[content_key] += 1
            if not isinstance(turn[content_key], str):
                self.non_text_contents += 1


def scan(records: Iterable[Mapping[str, Any]]) -> DialectScan:
    result = DialectScan()
    for record in records:
        result.add(record)
    return result


def _has_value(value: Any) -> bool:
    return value is not None and value != "" and value != []


def _most(counter: Counter[str], default: str) -> str:
    return counter.most_common(1)[0][0] if counter else default


def entry(found: DialectScan, file_name: str) -> tuple[dict[str, Any], list[str]]:
    """The ``dataset_info.json`` content (one entry, :data:`DATASET_NAME`) and notes for the user."""
    notes: list[str] = []
    messages = _most(found.messages, "conversations")
    role_key = _most(found.role_keys, "from")
    content_key = _most(found.content_keys, "value")
    columns: dict[str, str] = {"messages": messages}
    for column, counter in (("images", found.images), ("videos", found.videos)):
        if counter:
            columns[column] = _most(counter, "")
    if found.system_field:
        columns["system"] = "system"
    if found.tools_field:
        columns["tools"] = "tools"
    openai = any(found.roles[r] for r in ("user", "assistant")) and not any(
        found.roles[r] for r in ("human", "gpt")
    )
    tags = {
        "role_tag": role_key,
        "content_tag": content_key,
        "user_tag": "user" if openai else "human",
        "assistant_tag": "assistant" if openai else "gpt",
    }
    if found.roles["system"]:
        tags["system_tag"] = "system"
    notes.extend(_mixed(found, tags))
    if found.records == 0:
        notes.append("the subset is empty; the LLaMA-Factory entry assumes LLaVA fields")
    info = {DATASET_NAME: {"file_name": file_name, "formatting": "sharegpt", "columns": columns, "tags": tags}}
    return info, notes


def _mixed(found: DialectScan, tags: dict[str, str]) -> list[str]:
    """Notes on records that the entry cannot describe (LLaMA-Factory skips or rejects them)."""
    notes = []
    for what, counter in (("message fields", found.messages), ("role keys", found.role_keys),
                          ("image fields", found.images)):
        if len(counter) > 1:
            notes.append(
                f"the subset mixes {what} ({', '.join(sorted(counter))}); LLaMA-Factory reads one, the entry "
                f"names '{_most(counter, '')}'"
            )
    known = {tags["user_tag"], tags["assistant_tag"], "system", "observation", "function_call"}
    odd = sorted(r for r in found.roles if r not in known)
    if odd:
        notes.append(f"roles {', '.join(odd)} are not {tags['user_tag']}/{tags['assistant_tag']}: "
                     "LLaMA-Factory skips those conversations")
    if found.non_text_contents:
        notes.append(
            f"{found.non_text_contents} turns hold content parts, not plain text: LLaMA-Factory's sharegpt "
            "format expects text"
        )
    return notes


def loader_file(subset: Path) -> Path | None:
    """The file LLaMA-Factory's loader should read for a written subset, or None when it reads none
    of its files (WebDataset shards). A ``datasets`` folder must hold exactly one ``.arrow`` file."""
    if subset.is_file():
        return subset if subset.suffix.lower() in LOADER_SUFFIXES else None
    if not subset.is_dir():
        return None
    arrows = sorted(subset.glob("*.arrow"))
    return arrows[0] if len(arrows) == 1 else None


def dataset_entry(subset: Path, dataset_dir: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """Make the written ``subset`` loadable (JSON / JSONL: see :func:`unify_json_subset`) and derive
    its entry, ``file_name`` relative to ``dataset_dir`` (LLaMA-Factory's ``dataset_dir``). Returns
    None and a note when LLaMA-Factory has no loader for the subset's format."""
    from visa.readers import open_input

    notes: list[str] = []
    if subset.is_file() and subset.suffix.lower() in (".json", ".jsonl"):
        notes.extend(unify_json_subset(subset))
    target = loader_file(subset)
    if target is None:
        notes.append(f"LLaMA-Factory cannot load {subset.name} (its loader reads .json, .jsonl, .parquet, .arrow "
                     "and .csv files); no dataset_info.json written")
        return None, notes
    found = scan(raw.record for raw in open_input(subset).iter_raw() if raw.record is not None)
    try:
        file_name = target.relative_to(dataset_dir).as_posix()
    except ValueError:
        file_name = str(target)
    info, more = entry(found, file_name)
    return info, notes + more


# -- schema-consistent JSON subsets -------------------------------------------------------------------

FieldPath = tuple[str, ...]


def list_fields(records: Iterable[Mapping[str, Any]]) -> set[FieldPath]:
    """Field paths (top level, and inside nested objects) that are a list in some records and a
    single value (string, number, boolean) in others."""
    lists: set[FieldPath] = set()
    singles: set[FieldPath] = set()
    for record in records:
        _collect(record, (), lists, singles)
    return lists & singles


def _collect(obj: Mapping[str, Any], prefix: FieldPath, lists: set[FieldPath], singles: set[FieldPath]) -> None:
    for key, value in obj.items():
        path = (*prefix, str(key))
        if isinstance(value, list):
            lists.add(path)
        elif isinstance(value, Mapping):
            _collect(value, path, lists, singles)
        elif value is not None:
            singles.add(path)


def as_lists(record: dict[str, Any], paths: set[FieldPath]) -> bool:
    """Wrap the single values found at ``paths`` into one-element lists (``""`` into ``[]``), in
    place; True when something changed."""
    changed = False
    for path in paths:
        parent: Any = record
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, Mapping) else None
        if not isinstance(parent, dict) or path[-1] not in parent:
            continue
        value = parent[path[-1]]
        if value is None or isinstance(value, (list, Mapping)):
            continue
        parent[path[-1]] = [] if value == "" else [value]
        changed = True
    return changed


def unify_json_subset(subset: Path) -> list[str]:
    """Rewrite a ``selected.json`` / ``selected.jsonl`` so that no field mixes single values and
    lists (see the module doc); returns notes naming the fields that were turned into lists."""
    from visa.readers import open_input

    source = open_input(subset)
    paths = list_fields(raw.record for raw in source.iter_raw() if raw.record is not None)
    if not paths:
        return []
    array = subset.suffix.lower() == ".json"

    def write(tmp: Path) -> None:
        with tmp.open("wb") as out:
            out.write(b"[" if array else b"")
            for k, text in enumerate(_unified_texts(source.iter_raw(), paths)):
                if array:
                    out.write(b"\n" if k == 0 else b",\n")
                out.write(text.encode("utf-8"))
                out.write(b"" if array else b"\n")
            out.write(b"\n]\n" if array else b"")

    atomic_write(subset, write)
    names = ", ".join(sorted(".".join(p) for p in paths))
    return [f"{names}: a single value in some selected records and a list in others; written as lists "
            f"in {subset.name} so that datasets and LLaMA-Factory can load it"]


def _unified_texts(raws: Iterator[Any], paths: set[FieldPath]) -> Iterator[str]:
    for raw in raws:
        record = raw.record
        if record is not None and as_lists(record, paths):
            yield json.dumps(record, ensure_ascii=False)
        else:
            yield raw.text or ""
