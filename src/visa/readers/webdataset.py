"""WebDataset: ``.tar`` shards whose members are grouped into samples by key.

A shard holds, for every sample, consecutive members named ``{key}.{extension}``: the key is the
member's path up to the first ``.`` of its file name, the extension is the rest. A sample's
``{key}.json`` holds its record (the LLaVA ``conversations`` or the ShareGPT/OpenAI ``messages``
dialect, with any metadata fields); its images are the members whose last extension is ``jpg``,
``jpeg``, ``png`` or ``webp`` (``{key}.jpg``, or ``{key}.0.png``, ``{key}.1.png`` ... for several
images, in extension order). Other members (``.txt``, ``.cls`` ...) travel along unread.

Shards are streamed one after another with :mod:`tarfile` in stream mode: nothing is extracted to
disk, and only one sample's members are held in memory at a time. Image members become the
record's ``images`` (ShareGPT/OpenAI records) or ``image`` (LLaVA records) as ``{bytes, path}``
structs, so their bytes pass the same checks as image files (size limit, then decoding with the
bomb, truncation and mode rules of :mod:`visa.images`); a record's own image field is replaced.
A record without an ``id`` gets its key as ``id``.

A sample that cannot be used becomes one error record naming its shard and member: a ``.json``
that is missing, not valid UTF-8 JSON, not an object or too large; a member that is not a regular
file (symlink, hard link, device), whose name is absolute or climbs with ``..``, or that is larger
than ``max_member_bytes``; more than :data:`MAX_SAMPLE_MEMBERS` members under one key; a shard that
ends in the middle of a member (truncated). Reading goes on
with the next sample, or the next shard after a truncation.

``write_subset`` copies the members of the selected samples unchanged (names, bytes, modes) into
``selected/`` as shards of the same layout, ``part-000000.tar`` and so on.
"""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from visa.readers.base import (
    DEFAULT_MAX_RECORD_BYTES,
    Input,
    InputError,
    ascending,
    fingerprint_files,
    json_type_name,
)
from visa.run_folder import SUBSET_FOLDER, atomic_write_folder
from visa.samples import RawRecord

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp"})
RECORD_EXTENSION = "json"
DEFAULT_MAX_MEMBER_BYTES = 200 << 20
"""An image member larger than this is not read: the sample becomes an error record."""
MAX_SAMPLE_MEMBERS = 1024
"""A sample with more members than this becomes an error record (its member list is not kept)."""
SUBSET_SHARD_SAMPLES = 10_000
SUBSET_SHARD_BYTES = 1 << 30
GLOB_CHARS = frozenset("*?[")


def is_glob(text: str) -> bool:
    return any(c in GLOB_CHARS for c in text)


def tar_shards(spec: Path) -> list[Path]:
    """The ``.tar`` shards that ``spec`` names (a file, a folder searched recursively, or a glob),
    sorted by path; hidden and ``_``-prefixed entries of a folder are ignored."""
    text = str(spec)
    if is_glob(text) and not spec.exists():
        return sorted(Path(p) for p in glob.glob(text, recursive=True) if p.endswith(".tar") and Path(p).is_file())
    if spec.is_file():
        return [spec]
    found = [
        p
        for p in spec.rglob("*.tar")
        if p.is_file() and not any(part.startswith((".", "_")) for part in p.relative_to(spec).parts)
    ]
    return sorted(found, key=lambda p: p.relative_to(spec).as_posix())


def split_name(name: str) -> tuple[str, str]:
    """``"a/b/000123.0.jpg"`` -> ``("a/b/000123", "0.jpg")``: the sample key and the extension."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


class BrokenSample(Exception):
    """A sample that cannot become a record; the message names the shard and the member."""


@dataclass
class _Member:
    info: tarfile.TarInfo
    extension: str
    data: bytes | None = None


@dataclass
class _Group:
    """One sample's consecutive members, as read from a shard; ``index`` is its global number."""

    shard: Path
    key: str
    index: int
    members: list[_Member] = field(default_factory=list)
    problem: str | None = None

    def where(self, member: str | None = None) -> str:
        return f"{self.shard.name}: {member or self.key}"


class WebDatasetInput(Input):
    """WebDataset ``.tar`` shards (a single file, a folder of them, or a glob), read in path order.

    ``line`` is the global sample number + 1, as for the columnar formats.
    """

    format = "webdataset"

    def __init__(
        self,
        path: Path,
        *,
        max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    ) -> None:
        super().__init__(path)
        self.max_member_bytes = max_member_bytes
        self.max_record_bytes = max_record_bytes
        self._files = tar_shards(self.path)
        if not self._files:
            raise InputError(f"{self.path}: no .tar shards found")
        pattern = is_glob(str(self.path)) and not self.path.exists()
        self._root = _common_folder(self._files) if pattern else self.path

    def files(self) -> list[Path]:
        return list(self._files)

    def fingerprint(self) -> str:
        return fingerprint_files(self.format, self._root, self._files)

    def iter_raw(self) -> Iterator[RawRecord]:
        for index, group in enumerate(self._all_groups(_read_for_scoring)):
            record, error = self._record(group, with_images=True)
            yield RawRecord(index, index + 1, record, error)

    def iter_ids(self) -> Iterator[object | None]:
        for group in self._all_groups(_read_record_only):
            record, _ = self._record(group, with_images=False)
            yield None if record is None else record.get("id")

    def num_records(self) -> int | None:
        return None

    def write_subset(self, indices: Iterable[int], out_dir: Path) -> Path:
        target = Path(out_dir) / SUBSET_FOLDER
        atomic_write_folder(target, lambda tmp: self._copy_groups(ascending(indices), tmp))
        return target

    # -- reading -----------------------------------------------------------------------------------

    def _all_groups(self, read: ReadPolicy) -> Iterator[_Group]:
        first = 0
        for shard in self._files:
            for group in self._groups(shard, first, read):
                first = group.index + 1
                yield group

    def _groups(self, shard: Path, first: int, read: ReadPolicy) -> Iterator[_Group]:
        """The samples of one shard in order, numbered from ``first``; ``read(index, extension)``
        says which members' bytes to read. A truncated or unreadable shard ends with a broken sample."""
        group: _Group | None = None
        index = first - 1
        try:
            with shard.open("rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
                for info in tar:
                    if info.isdir():
                        continue
                    key, extension = split_name(info.name)
                    if group is not None and key != group.key:
                        yield group
                        group = None
                    if group is None:
                        index += 1
                        group = _Group(shard, key, index)
                    self._add_member(tar, group, info, extension, read)
        except (tarfile.TarError, OSError, EOFError) as err:
            broken = group or _Group(shard, "(start of shard)", index + 1)
            broken.problem = broken.problem or f"{broken.where()}: the shard is truncated or corrupt ({err})"
            yield broken
            return
        if group is not None:
            yield group

    def _add_member(
        self, tar: tarfile.TarFile, group: _Group, info: tarfile.TarInfo, extension: str, read: ReadPolicy
    ) -> None:
        if group.problem is not None:
            return
        if len(group.members) >= MAX_SAMPLE_MEMBERS:
            group.problem = f"{group.where()}: the sample has more than {MAX_SAMPLE_MEMBERS} members"
            group.members.clear()
            return
        member = _Member(info, extension)
        group.members.append(member)
        problem = _unsafe(info)
        if problem is not None:
            group.problem = f"{group.where(info.name)}: {problem}"
            return
        policy = read(group.index, extension)
        if policy is None:
            return
        limit = self.max_record_bytes if extension == RECORD_EXTENSION else self.max_member_bytes
        if policy and info.size > limit:
            group.problem = f"{group.where(info.name)}: {info.size} bytes, over the limit of {limit}"
            return
        handle = tar.extractfile(info)
        member.data = handle.read() if handle is not None else b""
        if len(member.data) != info.size:
            raise tarfile.ReadError(f"{info.name} ends after {len(member.data)} of {info.size} bytes")

    def _record(self, group: _Group, *, with_images: bool) -> tuple[dict[str, Any] | None, str | None]:
        try:
            return self._build(group, with_images=with_images), None
        except BrokenSample as err:
            return None, str(err)

    def _build(self, group: _Group, *, with_images: bool) -> dict[str, Any]:
        if group.problem is not None:
            raise BrokenSample(group.problem)
        records = [m for m in group.members if m.extension == RECORD_EXTENSION]
        if not records:
            names = ", ".join(m.info.name for m in group.members[:5]) + (", ..." if len(group.members) > 5 else "")
            raise BrokenSample(f"{group.where()}: the sample has no {group.key}.json member (members: {names})")
        record = _parse_record(records[0], group)
        images = sorted((m for m in group.members if _is_image(m.extension)), key=_image_order)
        if images and with_images:
            field_name = "images" if ("images" in record or "messages" in record) else "image"
            record.pop("image", None)
            record.pop("images", None)
            record[field_name] = [{"bytes": m.data, "path": f"{group.shard.name}/{m.info.name}"} for m in images]
        if record.get("id") is None:
            record["id"] = group.key
        return record

    # -- writing -----------------------------------------------------------------------------------

    def _copy_groups(self, wanted: Iterator[int], out_dir: Path) -> None:
        target = next(wanted, None)

        def read(index: int, extension: str) -> bool | None:
            return False if index == target else None  # every member of a chosen sample, no limits

        writer = _ShardWriter(out_dir)
        total = 0
        try:
            for group in self._all_groups(read):
                total = group.index + 1
                if group.index != target:
                    continue
                if group.problem is not None:
                    raise ValueError(f"record {group.index} is broken and cannot be written: {group.problem}")
                writer.add(group)
                target = next(wanted, None)
                if target is None:
                    break
        finally:
            writer.close()
        if target is not None:
            raise ValueError(f"subset index {target} is out of range: the input has {total} records")


class _ShardWriter:
    """Writes groups into ``part-NNNNNN.tar`` files, starting a new one every
    :data:`SUBSET_SHARD_SAMPLES` samples or :data:`SUBSET_SHARD_BYTES` bytes."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.part = -1
        self.samples = 0
        self.bytes = 0
        self.tar: tarfile.TarFile | None = None

    def add(self, group: _Group) -> None:
        if self.tar is None or self.samples >= SUBSET_SHARD_SAMPLES or self.bytes >= SUBSET_SHARD_BYTES:
            self._next()
        assert self.tar is not None
        for member in group.members:
            data = member.data or b""
            self.tar.addfile(member.info, io.BytesIO(data))
            self.bytes += len(data) + 512
        self.samples += 1

    def _next(self) -> None:
        self.close()
        self.part += 1
        self.tar = tarfile.open(self.out_dir / f"part-{self.part:06d}.tar", mode="w", format=tarfile.PAX_FORMAT)
        self.samples = 0
        self.bytes = 0

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None


def _unsafe(info: tarfile.TarInfo) -> str | None:
    if not info.isreg():
        kind = "a symlink" if info.issym() else "a hard link" if info.islnk() else "not a regular file"
        return f"the member is {kind}; only regular files are read"
    name = PurePosixPath(info.name)
    if name.is_absolute() or ".." in name.parts:
        return "the member's name is absolute or climbs out with '..'"
    return None


def _parse_record(member: _Member, group: _Group) -> dict[str, Any]:
    where = group.where(member.info.name)
    try:
        text = (member.data or b"").decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise BrokenSample(f"{where}: invalid UTF-8 at byte {err.start}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise BrokenSample(f"{where}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except RecursionError:
        raise BrokenSample(f"{where}: the JSON is nested too deeply") from None
    except ValueError as err:  # e.g. an integer with more digits than Python converts
        raise BrokenSample(f"{where}: unusable JSON: {err}") from None
    if not isinstance(obj, dict):
        raise BrokenSample(f"{where}: the record is a JSON {json_type_name(obj)}, expected an object")
    return obj


ReadPolicy = Callable[[int, str], "bool | None"]
"""``(sample index, member extension) -> None`` (skip the bytes), ``True`` (read them within the size
limits) or ``False`` (read them whatever their size: copying a sample that was already scored)."""


def _read_for_scoring(index: int, extension: str) -> bool | None:
    return True if extension == RECORD_EXTENSION or _is_image(extension) else None


def _read_record_only(index: int, extension: str) -> bool | None:
    return True if extension == RECORD_EXTENSION else None


def _is_image(extension: str) -> bool:
    return extension.rpartition(".")[2] in IMAGE_EXTENSIONS


def _image_order(member: _Member) -> tuple[int, str]:
    head = member.extension.partition(".")[0]
    return (int(head), member.extension) if head.isdigit() else (-1, member.extension)


def _common_folder(files: list[Path]) -> Path:
    return Path(os.path.commonpath([str(p.parent) for p in files]))
