"""Safe image loading: hostile references and bytes give one precise error kind; odd images decode right."""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import pickle
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hostile import BOMB_SIDE, ROTATED_SIZE, bomb_png, build_hostile_corpus
from PIL import Image, ImageFile
from pydantic import ValidationError

from visa.images import (
    KINDS,
    ImageError,
    ImageLimits,
    ImageSource,
    decode_image,
    image_key,
    load_image,
)
from visa.samples import ImageRef

LIMITS = ImageLimits()
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "images"


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def error_of(call: object, *args: object) -> ImageError:
    with pytest.raises(ImageError) as caught:
        call(*args)  # type: ignore[operator]
    error = caught.value
    assert error.kind in KINDS
    assert str(error) == f"{error.kind}: {error.message}" and error.message
    return error


# --- the hostile corpus ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str | None], dict[str, str]]:
    data, expected = build_hostile_corpus(tmp_path_factory.mktemp("hostile") / "corpus")
    paths = {}
    for line in data.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        paths[record["id"]] = record["image"]
    return data, expected, paths


def test_corpus_has_every_case_and_one_malformed_line(corpus):
    data, expected, paths = corpus
    lines = data.read_text().splitlines()
    malformed = [key for key, kind in expected.items() if kind == "malformed"]
    assert len(malformed) == 1 and malformed[0].startswith("row:")
    index = int(malformed[0].removeprefix("row:"))
    assert 0 < index < len(lines) - 1  # in the middle, so readers must carry on after it
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[index])
    kinds = set(expected.values())
    assert kinds >= {None, "empty", "truncated", "not_image", "missing", "path_escape", "bomb", "url_refused"}
    assert sum(kind == "path_escape" for kind in expected.values()) == 3  # traversal, absolute, symlink
    assert set(paths) == {key for key in expected if not key.startswith("row:")}


def test_corpus_records_are_llava(corpus):
    data, _, _ = corpus
    for line in data.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        turns = record["conversations"]
        assert record["id"] and record["image"]
        assert [t["from"] for t in turns] == ["human", "gpt"] and turns[0]["value"].startswith("<image>\n")


def test_corpus_outside_file_exists_so_only_the_check_stops_it(corpus):
    data, _, paths = corpus
    root = data.parent
    assert (root / paths["bad-traversal"]).is_file()
    assert Path(paths["bad-absolute"]).is_file()
    link = root / paths["bad-symlink"]
    assert link.is_symlink() and link.resolve().is_file()


def test_every_corpus_record_loads_or_fails_with_its_kind(corpus):
    data, expected, paths = corpus
    source = ImageSource(data.parent)
    for record_id, path in paths.items():
        kind = expected[record_id]
        if kind is None:
            key, image = load_image(source, ImageRef(path=path))
            assert image.mode == "RGB" and len(key) == 32, record_id
            continue
        error = error_of(load_image, source, ImageRef(path=path))
        assert error.kind == kind, (record_id, str(error))
        if kind in ("missing", "path_escape", "empty", "url_refused"):
            assert path in error.message, (record_id, error.message)


def test_awkward_images_decode_upright_to_rgb(corpus):
    data, _, paths = corpus
    source = ImageSource(data.parent)
    photo = Image.open(EXAMPLES / "chelsea.jpg").convert("RGB")

    def load(record_id: str) -> Image.Image:
        image = load_image(source, ImageRef(path=paths[record_id]))[1]
        assert image.mode == "RGB"
        return image

    cmyk = np.asarray(load("odd-cmyk"), dtype=float)
    assert cmyk.shape == (300, 451, 3)
    assert np.abs(cmyk.mean(axis=(0, 1)) - np.asarray(photo, dtype=float).mean(axis=(0, 1))).max() < 12

    gray16 = np.asarray(load("odd-gray16"), dtype=int)
    camera = np.asarray(Image.open(EXAMPLES / "camera.jpg").convert("L"), dtype=int)
    assert gray16.shape == (*camera.shape, 3)
    assert np.abs(gray16[..., 0] - camera).max() <= 1  # scaled back exactly, not clipped to white

    palette = np.asarray(load("odd-palette-alpha"))
    assert (palette[:, :40] == 255).all()  # transparent green composited on white
    assert not (palette[:, 40:] == (0, 255, 0)).all(axis=-1).any()

    animated = np.asarray(load("odd-animated"), dtype=float)
    first = np.asarray(photo.resize((120, 80)), dtype=float)
    assert np.abs(animated.mean(axis=(0, 1)) - first.mean(axis=(0, 1))).max() < 15  # not the blue frame

    rotated = load("odd-exif-rotated")
    assert rotated.size == ROTATED_SIZE
    top_right = np.asarray(rotated.crop((rotated.width - 30, 5, rotated.width - 5, 30)), dtype=float)
    top_left = np.asarray(rotated.crop((5, 5, 30, 30)), dtype=float)
    assert top_right[..., 0].mean() > 200 and top_right[..., 1:].mean() < 60  # the red marker
    assert not (top_left[..., 0].mean() > 200 and top_left[..., 1:].mean() < 60)

    bilevel = np.asarray(load("odd-bilevel"))
    assert bilevel.shape == (300, 451, 3) and set(np.unique(bilevel)) <= {0, 255}


# --- decompression bombs -------------------------------------------------------------------------


def test_bomb_refused_from_the_header_quickly():
    data = bomb_png(BOMB_SIDE)
    assert len(data) < 100_000
    start = time.perf_counter()
    error = error_of(decode_image, data, LIMITS)
    elapsed = time.perf_counter() - start
    assert error.kind == "bomb" and str(BOMB_SIDE * BOMB_SIDE) in error.message
    assert elapsed < 0.5  # decoding 400M pixels would take seconds and 400 MB


def test_stricter_pixel_limit_applies_below_pillows():
    data = bomb_png(8100)  # 65.6M pixels: over our 64M default, under Pillow's 89M warning threshold
    assert 8100 * 8100 < Image.MAX_IMAGE_PIXELS
    error = error_of(decode_image, data, LIMITS)
    assert error.kind == "bomb" and "8100x8100" in error.message and "64000000" in error.message
    small = encode(Image.new("RGB", (50, 50)), "PNG")
    assert error_of(decode_image, small, ImageLimits(max_pixels=2499)).kind == "bomb"
    assert decode_image(small, ImageLimits(max_pixels=2500)).size == (50, 50)


def test_bomb_check_leaves_pillow_settings_alone():
    before_limit, before_filters = Image.MAX_IMAGE_PIXELS, list(warnings.filters)
    error_of(decode_image, bomb_png(10_000), LIMITS)  # 100M: Pillow's warning range
    decode_image(encode(Image.new("RGB", (4, 4)), "PNG"), LIMITS)
    assert Image.MAX_IMAGE_PIXELS == before_limit and warnings.filters == before_filters
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# --- truncation and non-images -------------------------------------------------------------------


@functools.cache
def whole_file(fmt: str) -> bytes:
    photo = Image.open(EXAMPLES / "coffee.jpg").convert("RGB").resize((300, 200))
    if fmt == "progressive JPEG":
        return encode(photo, "JPEG", progressive=True, quality=90)
    if fmt == "GIF":
        return encode(photo.quantize(64), "GIF")
    return encode(photo, fmt)


@pytest.mark.parametrize("fraction", [0.02, 0.3, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("fmt", ["JPEG", "progressive JPEG", "PNG", "GIF", "WEBP"])
def test_truncated_files_are_detected(fmt, fraction):
    data = whole_file(fmt)
    cut = data[: max(1, int(len(data) * fraction))]
    assert error_of(decode_image, cut, LIMITS).kind == "truncated"


def test_jpeg_cut_in_half_is_truncated_even_if_pillow_was_told_to_pad():
    data = (EXAMPLES / "chelsea.jpg").read_bytes()
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        assert error_of(decode_image, data[: len(data) // 2], LIMITS).kind == "truncated"
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def test_concurrent_decodes_keep_truncation_strict_and_restore_the_flag():
    data = (EXAMPLES / "coffee.jpg").read_bytes()
    cut, whole = data[: len(data) // 2], data
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    results: list[str] = []

    def work(payload: bytes) -> None:
        for _ in range(5):
            try:
                decode_image(payload, LIMITS)
                results.append("ok")
            except ImageError as error:
                results.append(error.kind)

    try:
        threads = [threading.Thread(target=work, args=(cut if i % 2 else whole,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert sorted(set(results)) == ["ok", "truncated"] and results.count("truncated") == 10
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


@pytest.mark.parametrize(
    "data",
    [
        b"hello, this is plain text\n",
        b"<html><body>404 Not Found</body></html>",
        bytes(range(256)) * 4,
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",  # EPS: never handed to Ghostscript
        b"RIFF\x24\x00\x00\x00WAVEfmt ",
    ],
)
def test_non_images_are_not_image(data):
    assert error_of(decode_image, data, LIMITS).kind == "not_image"


def test_corrupt_header_is_unreadable_not_truncated():
    data = bytearray(encode(Image.open(EXAMPLES / "coffee.jpg"), "PNG"))
    data[12:16] = b"XXXX"  # the IHDR chunk type
    assert error_of(decode_image, bytes(data), LIMITS).kind == "unreadable"


def test_empty_and_oversized_bytes():
    assert error_of(decode_image, b"", LIMITS).kind == "empty"
    data = encode(Image.new("RGB", (64, 64)), "PNG")
    assert error_of(decode_image, data, ImageLimits(max_bytes=len(data) - 1)).kind == "too_large"


# --- modes, orientation, animation ---------------------------------------------------------------


def decoded(data: bytes) -> np.ndarray:
    image = decode_image(data, LIMITS)
    assert image.mode == "RGB"
    image.load()  # already loaded: no file behind it
    return np.asarray(image)


def test_alpha_modes_composite_on_white():
    rgba = Image.new("RGBA", (4, 2), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 128))
    pixels = decoded(encode(rgba, "PNG"))
    assert tuple(pixels[1, 3]) == (255, 255, 255) and tuple(pixels[0, 0]) == (255, 0, 0)
    assert 120 <= pixels[0, 1, 0] <= 135  # half-transparent black over white: mid gray

    la = Image.new("LA", (2, 2), (0, 0))
    assert (decoded(encode(la, "PNG")) == 255).all()

    pa = Image.new("PA", (2, 2))
    pa.putpalette([10, 20, 30] * 256)
    assert (decoded(encode(pa, "TIFF")) == 255).all()  # alpha 0 everywhere

    palette = Image.new("P", (3, 1))
    palette.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    palette.putdata([0, 1, 1])
    pixels = decoded(encode(palette, "PNG", transparency=0))
    assert tuple(pixels[0, 0]) == (255, 255, 255) and tuple(pixels[0, 1]) == (0, 255, 0)
    assert tuple(decoded(encode(palette, "PNG"))[0, 0]) == (0, 0, 255)  # no transparency: kept


def test_sixteen_bit_and_float_are_scaled_not_clipped():
    values = np.array([[0, 257 * 100, 32768, 65535]], dtype=np.uint16)
    for fmt in ("PNG", "TIFF"):
        pixels = decoded(encode(Image.fromarray(values), fmt))[0, :, 0]
        assert pixels.tolist() == [0, 100, 128, 255], fmt

    big_endian = Image.fromarray(values).convert("I").convert("I;16B")
    assert decoded(encode(big_endian, "TIFF"))[0, :, 0].tolist() == [0, 100, 128, 255]

    as_int32 = Image.fromarray(values.astype(np.int32))  # mode I, 16-bit range
    assert decoded(encode(as_int32, "TIFF"))[0, :, 0].tolist() == [0, 100, 128, 255]

    eight_bit_in_int32 = Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32))
    assert decoded(encode(eight_bit_in_int32, "TIFF"))[0, :, 0].tolist() == [0, 100, 255]

    unit_float = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert decoded(encode(unit_float, "TIFF"))[0, :, 0].tolist() == [0, 128, 255]

    wide_float = Image.fromarray(np.array([[-5.0, 0.0, 5.0, np.nan]], dtype=np.float32))
    assert decoded(encode(wide_float, "TIFF"))[0, :3, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize(
    ("mode", "fmt"), [("1", "PNG"), ("L", "PNG"), ("CMYK", "JPEG"), ("CMYK", "TIFF"), ("YCbCr", "TIFF")]
)
def test_other_modes_become_rgb_of_the_same_size(mode, fmt):
    photo = Image.open(EXAMPLES / "flower.jpg").convert("RGB").resize((64, 48))
    pixels = decoded(encode(photo.convert(mode), fmt))
    assert pixels.shape == (48, 64, 3)
    if mode in ("CMYK", "YCbCr"):
        difference = np.abs(pixels.astype(int) - np.asarray(photo, dtype=int)).mean()
        assert difference < 8, difference


def test_every_exif_orientation_is_applied():
    upright = Image.new("RGB", (4, 3), (0, 0, 0))
    upright.putpixel((0, 0), (255, 0, 0))  # marks the upright top-left corner
    upright.putpixel((3, 0), (0, 255, 0))
    # what the camera stored, for each orientation tag, so that the displayed image is `upright`
    stored = {
        1: upright,
        2: upright.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        3: upright.transpose(Image.Transpose.ROTATE_180),
        4: upright.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
        5: upright.transpose(Image.Transpose.TRANSPOSE),
        6: upright.transpose(Image.Transpose.ROTATE_90),
        7: upright.transpose(Image.Transpose.TRANSVERSE),
        8: upright.transpose(Image.Transpose.ROTATE_270),
    }
    for orientation, image in stored.items():
        exif = Image.Exif()
        exif[0x0112] = orientation
        pixels = decoded(encode(image, "PNG", exif=exif.tobytes()))
        assert (pixels == np.asarray(upright)).all(), orientation


def test_broken_exif_does_not_reject_the_image():
    data = encode(Image.new("RGB", (8, 6), (9, 9, 9)), "JPEG", exif=b"Exif\x00\x00II*\x00\xff\xff\xff\x7f")
    assert decoded(data).shape == (6, 8, 3)


def test_animations_give_their_first_frame():
    red, blue, green = (Image.new("RGB", (10, 8), color) for color in ((255, 0, 0), (0, 0, 255), (0, 255, 0)))
    for fmt, params in (("GIF", {}), ("WEBP", {"lossless": True}), ("PNG", {})):  # PNG: APNG
        data = encode(red, fmt, save_all=True, append_images=[blue, green], duration=50, **params)
        assert Image.open(io.BytesIO(data)).n_frames == 3, fmt
        pixels = decoded(data)
        assert pixels.shape == (8, 10, 3)
        assert pixels[..., 0].min() > 240 and pixels[..., 2].max() < 15, fmt


def test_decoded_image_is_independent_of_the_input_buffer():
    image = decode_image((EXAMPLES / "coffee.jpg").read_bytes(), LIMITS)
    assert image.size == (600, 400) and image.getpixel((300, 200)) is not None
    assert image.copy().tobytes() == image.tobytes()


# --- reading references --------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    base = tmp_path / "root"
    (base / "images").mkdir(parents=True)
    for name in ("chelsea.jpg", "coins.jpg"):
        (base / "images" / name).write_bytes((EXAMPLES / name).read_bytes())
    (tmp_path / "secret.jpg").write_bytes((EXAMPLES / "coffee.jpg").read_bytes())
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "photo.jpg").write_bytes((EXAMPLES / "coffee.jpg").read_bytes())
    return base


def kind_for(root: Path, path: str, limits: ImageLimits = LIMITS) -> str:
    return error_of(ImageSource(root, limits).read_bytes, ImageRef(path=path)).kind


def test_paths_inside_the_root_are_read(root):
    source = ImageSource(root)
    data = source.read_bytes(ImageRef(path="images/chelsea.jpg"))
    assert data == (EXAMPLES / "chelsea.jpg").read_bytes()
    assert source.read_bytes(ImageRef(path="images/../images/./chelsea.jpg")) == data  # `..` that stays in
    assert source.read_bytes(ImageRef(path="images/../../root/images/chelsea.jpg")) == data  # and comes back
    os.symlink(root / "images" / "chelsea.jpg", root / "alias.jpg")  # a symlink within the root is fine
    assert source.read_bytes(ImageRef(path="alias.jpg")) == data
    relative = ImageSource(Path(os.path.relpath(root)))
    assert relative.read_bytes(ImageRef(path="images/chelsea.jpg")) == data


def test_paths_leaving_the_root_are_refused(root):
    assert kind_for(root, "../secret.jpg") == "path_escape"
    assert kind_for(root, "images/../../secret.jpg") == "path_escape"
    assert kind_for(root, str(root / "images" / "chelsea.jpg")) == "path_escape"  # absolute, even inside
    assert kind_for(root, "/etc/passwd") == "path_escape"
    os.symlink(root.parent / "secret.jpg", root / "images" / "link.jpg")
    assert kind_for(root, "images/link.jpg") == "path_escape"
    os.symlink(root.parent / "elsewhere", root / "images" / "dirlink")  # a symlinked folder component
    assert kind_for(root, "images/dirlink/photo.jpg") == "path_escape"
    os.symlink(root.parent / "nothing_here.jpg", root / "images" / "dangling.jpg")  # dangling, pointing out
    assert kind_for(root, "images/dangling.jpg") == "path_escape"
    error = error_of(ImageSource(root).read_bytes, ImageRef(path="../secret.jpg"))
    assert "'../secret.jpg'" in error.message and "outside the image root" in error.message


def test_prefix_sibling_of_the_root_is_outside(root):
    sibling = root.parent / "root2"
    sibling.mkdir()
    (sibling / "x.jpg").write_bytes(b"\xff\xd8\xff")
    assert kind_for(root, "../root2/x.jpg") == "path_escape"


def test_missing_empty_and_odd_files(root):
    assert kind_for(root, "images/nope.jpg") == "missing"
    os.symlink(root / "images" / "gone.jpg", root / "images" / "dangling_inside.jpg")
    assert kind_for(root, "images/dangling_inside.jpg") == "missing"
    (root / "images" / "zero.jpg").write_bytes(b"")
    assert kind_for(root, "images/zero.jpg") == "empty"
    assert kind_for(root, "images") == "unreadable"
    assert kind_for(root, ".") == "unreadable"
    assert kind_for(root, "images/bad\x00name.jpg") == "unreadable"
    assert error_of(ImageSource(root).read_bytes, ImageRef()).kind == "missing"
    assert error_of(ImageSource(root).read_bytes, ImageRef(path="")).kind == "missing"


def test_fifo_is_refused_without_blocking(root):
    os.mkfifo(root / "images" / "pipe.jpg")
    start = time.perf_counter()
    assert kind_for(root, "images/pipe.jpg") == "unreadable"
    assert time.perf_counter() - start < 1.0


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file(root):
    target = root / "images" / "chelsea.jpg"
    target.chmod(0)
    try:
        assert kind_for(root, "images/chelsea.jpg") == "unreadable"
    finally:
        target.chmod(0o644)


def test_large_files_refused_before_reading(root):
    size = (root / "images" / "chelsea.jpg").stat().st_size
    assert kind_for(root, "images/chelsea.jpg", ImageLimits(max_bytes=size - 1)) == "too_large"
    assert len(ImageSource(root, ImageLimits(max_bytes=size)).read_bytes(ImageRef(path="images/chelsea.jpg")))


def test_embedded_bytes_go_through_the_same_checks(root):
    data = (EXAMPLES / "chelsea.jpg").read_bytes()
    source = ImageSource(root)
    key, image = load_image(source, ImageRef(data=data))
    assert key == image_key(data) == load_image(source, ImageRef(path="images/chelsea.jpg"))[0]
    assert image.size == (451, 300)
    assert load_image(source, ImageRef(path="https://example.com/ignored.jpg", data=data))[0] == key
    assert error_of(source.read_bytes, ImageRef(data=b"")).kind == "empty"
    small = ImageSource(root, ImageLimits(max_bytes=1000))
    assert error_of(small.read_bytes, ImageRef(data=data)).kind == "too_large"
    assert error_of(load_image, source, ImageRef(data=data[:5000])).kind == "truncated"
    assert error_of(load_image, source, ImageRef(data=b"not an image")).kind == "not_image"
    assert error_of(load_image, source, ImageRef(data=bomb_png(BOMB_SIDE))).kind == "bomb"


# --- URLs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["http://example.com/a.jpg", "https://example.com/a.jpg", "HTTPS://EXAMPLE.COM/A.JPG"],
)
def test_urls_refused_by_default(root, url):
    error = error_of(ImageSource(root).read_bytes, ImageRef(path=url))
    assert error.kind == "url_refused" and url in error.message and "allow_urls" in error.message


@pytest.mark.parametrize(
    "url",
    ["file:///etc/passwd", "ftp://example.com/a.jpg", "s3://bucket/a.jpg", "data:image/png;base64,AAAA"],
)
def test_other_schemes_refused_even_when_urls_are_allowed(root, url):
    assert kind_for(root, url, ImageLimits(allow_urls=True)) == "url_refused"


class _Handler(http.server.BaseHTTPRequestHandler):
    photo = (EXAMPLES / "chelsea.jpg").read_bytes()

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/photo.jpg":
            self._send(200, self.photo)
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/photo.jpg")
            self.end_headers()
        elif self.path == "/redirect-file":
            self.send_response(302)
            self.send_header("Location", "file:///etc/passwd")
            self.end_headers()
        elif self.path == "/declared-huge":
            self.send_response(200)
            self.send_header("Content-Length", str(10**12))
            self.end_headers()
            self.wfile.write(b"x" * 100)
        elif self.path == "/undeclared-huge":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            for _ in range(20):
                self.wfile.write(b"x" * 10_000)
        elif self.path == "/slow":
            time.sleep(1.5)
            self._send(200, self.photo)
        elif self.path == "/drip":
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            for _ in range(60):
                self.wfile.write(b"x" * 10)
                self.wfile.flush()
                time.sleep(0.05)
        else:
            self._send(404, b"not found")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that give up early (size limits, timeouts) are the point of these tests


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    httpd = _QuietServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_allowed_urls_are_fetched_with_limits(root, server):
    allowed = ImageLimits(allow_urls=True, url_timeout_s=5)
    source = ImageSource(root, allowed)
    key, image = load_image(source, ImageRef(path=f"{server}/photo.jpg"))
    assert key == image_key((EXAMPLES / "chelsea.jpg").read_bytes()) and image.size == (451, 300)
    assert source.read_bytes(ImageRef(path=f"{server}/redirect")) == _Handler.photo
    assert kind_for(root, f"{server}/nothing", allowed) == "url_failed"
    assert kind_for(root, f"{server}/redirect-file", allowed) == "url_failed"
    small = ImageLimits(allow_urls=True, url_timeout_s=5, max_bytes=50_000)
    assert kind_for(root, f"{server}/declared-huge", small) == "too_large"
    assert kind_for(root, f"{server}/undeclared-huge", small) == "too_large"
    assert kind_for(root, "http://127.0.0.1:9/closed.jpg", allowed) == "url_failed"


def test_url_timeouts(root, server):
    quick = ImageLimits(allow_urls=True, url_timeout_s=0.3)
    for path in ("/slow", "/drip"):
        start = time.perf_counter()
        error = error_of(ImageSource(root, quick).read_bytes, ImageRef(path=f"{server}{path}"))
        assert error.kind == "url_failed", str(error)
        assert time.perf_counter() - start < 1.2, path


# --- the small pieces ----------------------------------------------------------------------------


def test_image_error_contract():
    error = ImageError("missing", "image file 'a.jpg' does not exist")
    assert str(error) == "missing: image file 'a.jpg' does not exist"
    assert (error.kind, error.message) == ("missing", "image file 'a.jpg' does not exist")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.kind, copy.message, str(copy)) == (error.kind, error.message, str(error))
    with pytest.raises(ValueError, match="unknown image error kind"):
        ImageError("nope", "x")
    assert KINDS == {
        "missing", "empty", "truncated", "not_image", "path_escape", "bomb", "too_large",
        "url_refused", "url_failed", "unreadable",
    }  # fmt: skip


def test_image_limits_are_a_strict_recipe_section():
    assert LIMITS.model_dump() == {
        "max_pixels": 64_000_000, "max_bytes": 200 * 2**20, "allow_urls": False, "url_timeout_s": 20.0,
    }  # fmt: skip
    assert ImageLimits.model_validate({"max_pixels": 10, "allow_urls": True}).max_pixels == 10
    with pytest.raises(ValidationError):
        ImageLimits.model_validate({"max_pixel": 10})
    with pytest.raises(ValidationError):
        ImageLimits(max_bytes=0)
    with pytest.raises(ValidationError):
        LIMITS.max_pixels = 5  # type: ignore[misc]


def test_image_key_is_a_stable_content_hash():
    data = (EXAMPLES / "coins.jpg").read_bytes()
    assert image_key(data) == image_key(bytes(data)) and len(image_key(data)) == 32
    assert int(image_key(data), 16) >= 0 and image_key(data) != image_key(data + b"\x00")
    assert image_key(b"") == "cae66941d9efbd404e4d88758ea67670"
