"""Trainer-side readers of an export, written from the trainers' documented behaviour (not their code).

* :func:`load_llamafactory` reads a ``dataset_info.json`` entry the way LLaMA-Factory's local-file
  loader does: ``file_name`` under the dataset folder (a folder means all of its files, which must
  share one file type), ``datasets.load_dataset(<type>, data_files=..., split="train")``, then the
  ``sharegpt`` conversion through the entry's ``columns`` and ``tags``: an optional leading system
  turn, then user/assistant turns strictly alternating and even in number (else the example is
  skipped as broken), images resolved under ``media_dir`` (paths), or taken as bytes, ``{bytes,
  path}`` structs or decoded images, and as many images as ``<image>`` placeholders.
* :func:`load_llava` reads a LLaVA training file the way LLaVA(-NeXT)'s ``train.py`` does: the whole
  JSON array (or JSON lines), ``conversations`` of ``{from, value}`` with human/gpt turns, and when
  a record has an ``image`` key, one path or a list of paths opened under the image folder.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

from PIL import Image

FILE_TYPES = {"arrow": "arrow", "csv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet", "txt": "text"}
DEFAULT_TAGS = {
    "role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt", "system_tag": "system",
}
PLACEHOLDER = "<image>"


class BrokenExample(AssertionError):
    """An example the trainer would skip or fail on."""


def load_llamafactory(dataset_dir: Path, name: str, media_dir: Path, cache_dir: Path) -> list[dict[str, Any]]:
    """Every example of dataset ``name`` as LLaMA-Factory sees it: prompt, response, system, images."""
    import datasets

    info = json.loads((dataset_dir / "dataset_info.json").read_text(encoding="utf-8"))[name]
    local = dataset_dir / info["file_name"]
    files = sorted(local.iterdir()) if local.is_dir() else [local]
    kinds = {FILE_TYPES.get(f.suffix[1:]) for f in files}
    if None in kinds or len(kinds) != 1:
        raise BrokenExample(f"{local}: file types should be identical and known, got {sorted(map(str, kinds))}")
    table = datasets.load_dataset(
        kinds.pop(), data_files=[str(f) for f in files], split="train", cache_dir=str(cache_dir)
    )
    columns = info.get("columns", {})
    tags = {**DEFAULT_TAGS, **info.get("tags", {})}
    return [_sharegpt(example, columns, tags, media_dir) for example in table]


def _sharegpt(example: dict[str, Any], columns: dict[str, str], tags: dict[str, str], media_dir: Path) -> dict[str, Any]:
    messages = list(example[columns.get("messages", "conversations")])
    system = example[columns["system"]] if "system" in columns else ""
    if messages and messages[0][tags["role_tag"]] == tags["system_tag"]:
        system = messages.pop(0)[tags["content_tag"]]
    accepted = (tags["user_tag"], tags["assistant_tag"])
    turns = []
    for k, message in enumerate(messages):
        role, content = message[tags["role_tag"]], message[tags["content_tag"]]
        if role != accepted[k % 2]:
            raise BrokenExample(f"invalid role tag {role!r} at turn {k}")
        if not isinstance(content, str):
            raise BrokenExample(f"turn {k} content is {type(content).__name__}, not text")
        turns.append({"role": "user" if k % 2 == 0 else "assistant", "content": content})
    if not turns or len(turns) % 2:
        raise BrokenExample(f"invalid message count {len(turns)}")
    images = _media(example[columns["images"]], media_dir) if "images" in columns else []
    placeholders = sum(t["content"].count(PLACEHOLDER) for t in turns)
    if images and placeholders != len(images):
        raise BrokenExample(f"{len(images)} images but {placeholders} {PLACEHOLDER} placeholders")
    return {"prompt": turns[:-1], "response": turns[-1:], "system": system, "images": images}


def _media(value: Any, media_dir: Path) -> list[Image.Image]:
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    return [_open(item, media_dir) for item in items]


def _open(item: Any, media_dir: Path) -> Image.Image:
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, str):
        joined = os.path.join(media_dir, item)
        return _decoded(Image.open(joined if os.path.isfile(joined) else item))
    if isinstance(item, bytes):
        return _decoded(Image.open(io.BytesIO(item)))
    if isinstance(item, dict):
        if item.get("bytes") is not None:
            return _decoded(Image.open(io.BytesIO(item["bytes"])))
        return _decoded(Image.open(item["path"]))
    raise BrokenExample(f"expected an image, got {type(item).__name__}")


def _decoded(image: Image.Image) -> Image.Image:
    image.load()
    return image.convert("RGB")


def load_llava(path: Path, image_folder: Path) -> list[dict[str, Any]]:
    """Every record of a LLaVA training file as LLaVA's data loader sees it: turns and opened images."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        records = json.loads(text)
    out = []
    for record in records:
        turns = record["conversations"]
        for k, turn in enumerate(turns):
            expected = ("human", "gpt")[k % 2]
            if turn["from"] != expected or not isinstance(turn["value"], str):
                raise BrokenExample(f"record {record.get('id')}: turn {k} is {turn['from']!r}, expected {expected!r}")
        images: list[Image.Image] = []
        if "image" in record:
            files = record["image"] if isinstance(record["image"], list) else [record["image"]]
            images = [_decoded(Image.open(os.path.join(image_folder, f))) for f in files]
        out.append({"id": record.get("id"), "turns": turns, "images": images})
    return out
