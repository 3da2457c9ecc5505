"""A small hostile input: good photos, every kind of bad image reference, and awkward-but-valid images.

:func:`build_hostile_corpus` writes ``<dir>/images/`` and a LLaVA-format ``<dir>/data.jsonl`` whose
image root is ``<dir>``, and returns what each record should produce. It copies real photos from
``examples/images`` and derives the awkward images from them, so it needs no network.
"""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

EXAMPLE_IMAGES = Path(__file__).resolve().parent.parent / "examples" / "images"
GOOD_PHOTOS = ("chelsea.jpg", "coffee.jpg", "page.png")
BOMB_SIDE = 20_000  # a 1-bit PNG of 20000 x 20000 pixels: 400M pixels in about 50 kB
ROTATED_SIZE = (300, 451)  # exif_rotated.jpg is stored as 451x300 and must decode upright as 300x451


def build_hostile_corpus(dir: Path) -> tuple[Path, dict[str, str | None]]:
    """Create the corpus under ``dir``; return ``(data.jsonl path, {record id: error kind or None})``.

    Expected kinds are those of :class:`visa.images.ImageError`, plus ``malformed`` for the one line
    of broken JSON in the middle of the file, keyed ``row:<index>`` (its 0-based record position)
    because it has no readable id. One file, ``<dir name>.outside.jpg``, is written beside ``dir`` so
    that the traversal and symlink cases point at a real image outside the root.
    """
    dir = Path(dir)
    images = dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    for name in GOOD_PHOTOS:
        shutil.copyfile(EXAMPLE_IMAGES / name, images / name)
    photo = Image.open(EXAMPLE_IMAGES / "chelsea.jpg").convert("RGB")

    outside = dir.parent / f"{dir.name}.outside.jpg"
    shutil.copyfile(EXAMPLE_IMAGES / "coins.jpg", outside)

    (images / "empty.jpg").write_bytes(b"")
    whole = (EXAMPLE_IMAGES / "coffee.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (images / "not_image.jpg").write_text("This is a text file that only pretends to be a JPEG.\n")
    link = images / "link_outside.jpg"
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(outside, link)
    (images / "bomb.png").write_bytes(bomb_png(BOMB_SIDE))

    _write_awkward(images, photo)

    cases: list[tuple[str, str, str | None]] = [
        ("good-chelsea", "images/chelsea.jpg", None),
        ("good-coffee", "images/coffee.jpg", None),
        ("good-page", "images/page.png", None),
        ("bad-empty", "images/empty.jpg", "empty"),
        ("bad-truncated", "images/truncated.jpg", "truncated"),
        ("bad-not-image", "images/not_image.jpg", "not_image"),
        ("bad-missing", "images/no_such_file.jpg", "missing"),
        ("bad-traversal", f"../{outside.name}", "path_escape"),
        ("bad-absolute", str((images / "chelsea.jpg").resolve()), "path_escape"),
        ("bad-symlink", "images/link_outside.jpg", "path_escape"),
        ("bad-bomb", "images/bomb.png", "bomb"),
        ("bad-url", "https://example.com/images/cat.jpg", "url_refused"),
        ("odd-cmyk", "images/cmyk.jpg", None),
        ("odd-gray16", "images/gray16.png", None),
        ("odd-palette-alpha", "images/palette_alpha.png", None),
        ("odd-animated", "images/animated.gif", None),
        ("odd-exif-rotated", "images/exif_rotated.jpg", None),
        ("odd-bilevel", "images/bilevel.png", None),
    ]
    lines = [json.dumps(_record(record_id, path)) for record_id, path, _ in cases]
    middle = len(lines) // 2
    lines.insert(middle, '{"id": "broken", "image": "images/chelsea.jpg", "conversations": [{"from": ')
    data = dir / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")

    expected: dict[str, str | None] = {record_id: kind for record_id, _, kind in cases}
    expected[f"row:{middle}"] = "malformed"
    return data, expected


@functools.cache
def bomb_png(side: int) -> bytes:
    """A valid all-black 1-bit PNG of ``side`` x ``side`` pixels; zlib squeezes it about 1000 to 1."""
    row = bytes(1 + (side + 7) // 8)  # filter byte 0, then the packed pixels
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale, no interlace
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _chunk(tag: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))


def _record(record_id: str, image: str) -> dict[str, object]:
    return {
        "id": record_id,
        "image": image,
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown in this picture?"},
            {"from": "gpt", "value": "A photograph; the test only checks how the image loads."},
        ],
    }


def _write_awkward(images: Path, photo: Image.Image) -> None:
    """Valid images in modes and layouts that naive loaders get wrong."""
    photo.convert("CMYK").save(images / "cmyk.jpg", quality=90)

    camera = Image.open(EXAMPLE_IMAGES / "camera.jpg").convert("L")
    Image.fromarray(np.asarray(camera, dtype=np.uint16) * 257).save(images / "gray16.png")  # I;16

    palette = photo.resize((120, 80)).quantize(colors=63)
    palette.putpalette(palette.getpalette()[: 63 * 3] + [0, 255, 0])  # index 63: pure green
    palette.paste(63, (0, 0, 40, 80))  # the left third becomes transparent green
    palette.save(images / "palette_alpha.png", transparency=63)

    first = photo.resize((120, 80))
    frames = [first, Image.new("RGB", (120, 80), (0, 0, 255)), Image.new("RGB", (120, 80), (255, 0, 0))]
    frames[0].save(images / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the stored pixels must be turned 90 degrees clockwise for display
    marked = photo.copy()
    marked.paste((255, 0, 0), (0, 0, 40, 40))  # red square at the stored top-left corner
    marked.save(images / "exif_rotated.jpg", quality=90, exif=exif.tobytes())

    photo.convert("L").point(lambda v: 255 if v > 128 else 0).convert("1").save(images / "bilevel.png")


# -- hostile JSON ------------------------------------------------------------------------------------

_TURNS = '"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]'


def _nest(depth: int, rng: random.Random, leaf: str = "1") -> str:
    """``depth`` containers around ``leaf``, arrays and objects mixed at random."""
    opens, closes = [], []
    for _ in range(depth):
        if rng.random() < 0.5:
            opens.append("[")
            closes.append("]")
        else:
            opens.append('{"k": ')
            closes.append("}")
    return "".join(opens) + leaf + "".join(reversed(closes))


def hostile_json_records(seed: int = 0) -> list[tuple[str, str, str | None]]:
    """Record texts from the families of valid-but-hostile JSON: ``(id, one-line text, expected kind)``.

    Families: lone surrogate escapes (high, low, reversed pairs) in every kind of field and in keys;
    nesting just above and far above the reader's cap, in the turns or an extra field; integer
    literals too long for ``int()`` and integers outside 64 bits (kept, as text where needed);
    metadata with tens of thousands of keys, very long keys and values of mixed types. Expected kind
    is ``malformed`` or None (the record is usable). ``seed`` varies the choices inside each family.
    """
    rng = random.Random(seed)
    surrogate = rng.choice(["\\ud800", "\\udbff", "\\udc00", "\\udfff", "\\ude00\\ud83d"])
    depth_over = rng.choice([65, 66, 400, 999, 1001, 5000, 200_000])
    digits = rng.choice([4301, 5000, 20_000])
    big = rng.choice([2**63, 2**64 + 7, -(2**63) - 1, 10**30])
    keys = rng.choice([5_000, 50_000])
    cases: list[tuple[str, str, str | None]] = [
        ("sur-id", f'{{"id": "s{surrogate}", {_TURNS}}}', "malformed"),
        ("sur-text", '{"id": "sur-text", "conversations": [{"from": "human", "value": "Q'
         + surrogate + '?"}, {"from": "gpt", "value": "A."}]}', "malformed"),
        ("sur-meta", f'{{"id": "sur-meta", "source": "web{surrogate}", {_TURNS}}}', "malformed"),
        ("sur-key", f'{{"id": "sur-key", "meta": {{"k{surrogate}": 1}}, {_TURNS}}}', "malformed"),
        ("sur-image", f'{{"id": "sur-image", "image": "images/a{surrogate}.jpg", {_TURNS}}}', "malformed"),
        ("pair-ok", f'{{"id": "pair-ok", "note": "cat \\ud83d\\ude00", {_TURNS}}}', None),
        ("deep-extra", f'{{"id": "deep-extra", "x": {_nest(depth_over, rng)}, {_TURNS}}}', "malformed"),
        ("deep-turns", '{"id": "deep-turns", "conversations": [{"from": "human", "value": "Q", "x": '
         + _nest(depth_over, rng) + '}, {"from": "gpt", "value": "A."}]}', "malformed"),
        ("deep-ok", f'{{"id": "deep-ok", "x": {_nest(40, rng)}, {_TURNS}}}', None),
        ("long-int", f'{{"id": "long-int", "n": {"7" * digits}, {_TURNS}}}', None),
        ("long-int-id", f'{{"id": {"3" * digits}, {_TURNS}}}', None),
        ("int64-meta", f'{{"id": "int64-meta", "n": {big}, "sub": {{"m": {big}}}, {_TURNS}}}', None),
        ("int64-small", f'{{"id": "int64-small", "n": 5, "sub": {{"m": -3}}, {_TURNS}}}', None),
        ("float-odd", f'{{"id": "float-odd", "f": 1e999, "g": -1e999, "h": NaN, {_TURNS}}}', None),
        ("wide-meta", '{"id": "wide-meta", "meta": {' + ", ".join(f'"k{i}": {i}' for i in range(keys))
         + f"}}, {_TURNS}}}", None),
        ("wide-top", '{"id": "wide-top", ' + ", ".join(f'"t{i}": "v"' for i in range(keys // 10))
         + f", {_TURNS}}}", None),
        ("long-key", f'{{"id": "long-key", "{"q" * 3000}": 1, {_TURNS}}}', None),
        ("huge-key", f'{{"id": "huge-key", "{"q" * 100_000}": 1, {_TURNS}}}', "malformed"),
        ("mixed-type", f'{{"id": "mixed-type", "n": "text", "sub": {{"m": [1]}}, {_TURNS}}}', None),
    ]
    rng.shuffle(cases)
    return cases


def write_hostile_json(folder: Path, seed: int = 0) -> tuple[Path, Path, dict[str, str | None]]:
    """The hostile JSON records as ``data.jsonl`` and as a pretty ``data.json`` array (same records).

    Each record also gets a real photo (``images/chelsea.jpg``) so image agents run on the usable
    ones. Returns both paths and ``{id: expected kind}``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    shutil.copyfile(EXAMPLE_IMAGES / "chelsea.jpg", folder / "images" / "chelsea.jpg")
    cases = hostile_json_records(seed)
    texts = [text.replace('{"id": ', '{"image": "images/chelsea.jpg", "id": ', 1) for _, text, _ in cases]
    (folder / "data.jsonl").write_text("\n".join(texts) + "\n")
    (folder / "data.json").write_text("[\n" + ",\n".join(texts) + "\n]\n")
    return folder / "data.jsonl", folder / "data.json", {record_id: kind for record_id, _, kind in cases}
