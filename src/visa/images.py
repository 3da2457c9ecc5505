"""Safe image loading: from an :class:`~visa.samples.ImageRef` to bytes, a content key and RGB pixels.

Image references come from user data and are treated as hostile. Two steps, both raising
:class:`ImageError` with a ``kind`` that becomes the error column of the sample:

1. :meth:`ImageSource.read_bytes` turns a reference into bytes. Relative paths resolve under the
   image root and may not leave it (``..``, absolute paths, symlinks pointing outside: ``path_escape``);
   files and embedded payloads larger than ``max_bytes`` are refused before being read in full;
   http(s) URLs are fetched only when ``allow_urls`` is set.
2. :func:`decode_image` turns bytes into a fully decoded RGB :class:`PIL.Image.Image`. Only common
   raster formats are accepted (never EPS, which would run Ghostscript); the pixel count is checked
   from the header before any pixel is decoded; truncated files are errors, not grey-padded images;
   EXIF orientation is applied; every mode is converted to RGB (alpha composited on white, 16-bit and
   float data scaled rather than clipped); animations give their first frame.

:func:`image_key` is the content hash that identifies an image across samples and runs.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import stat
import threading
import time
import urllib.error
import urllib.request
import warnings
from email.message import Message
from pathlib import Path
from typing import IO, Final

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from visa.samples import ImageRef

KINDS: Final = frozenset(
    {
        "missing",  # the file does not exist, or the reference names nothing
        "empty",  # zero bytes
        "truncated",  # the file ends before the image data does
        "not_image",  # bytes that no accepted image format recognises
        "path_escape",  # the path leaves the image root
        "bomb",  # more pixels than allowed (checked from the header, before decoding)
        "too_large",  # more bytes than allowed
        "url_refused",  # a URL while URLs are disabled, or an unsupported scheme
        "url_failed",  # the download failed or timed out
        "unreadable",  # the file cannot be read, or its data cannot be decoded
    }
)

# Formats tried by Image.open, in order. Everything else is refused as not_image; in particular EPS
# (decoded by running Ghostscript) and the many rarely used plugins are never reached.
ACCEPTED_FORMATS: Final = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "PPM")

# Leading bytes of common formats (WebP is checked apart): they tell a cut-short or corrupt
# header from data that is no image at all.
_SIGNATURES: Final = (
    ("PNG", b"\x89PNG\r\n\x1a\n"),
    ("JPEG", b"\xff\xd8\xff"),
    ("GIF", b"GIF87a"),
    ("GIF", b"GIF89a"),
)
_SHORT_HEADER = 2048

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_CHUNK = 1 << 20


class ImageError(Exception):
    """An image that cannot be used; ``kind`` is one of :data:`KINDS`, ``str(error)`` is ``"kind: message"``.

    Pickles cleanly, so it can cross process boundaries (worker pools, Ray).
    """

    def __init__(self, kind: str, message: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown image error kind '{kind}'")
        super().__init__(kind, message)
        self.kind = kind
        self.message = message

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


class ImageLimits(BaseModel):
    """The ``images:`` section of a recipe."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_pixels: int = Field(
        64_000_000,
        ge=1,
        description="refuse images with more pixels (read from the header, before decoding); "
        "Pillow's own MAX_IMAGE_PIXELS still applies above this",
    )
    max_bytes: int = Field(
        200 * 2**20, ge=1, description="refuse files and embedded payloads larger than this"
    )
    allow_urls: bool = Field(False, description="fetch http(s) image references; refused when false")
    url_timeout_s: float = Field(
        20.0, gt=0, description="time allowed for one download (connect, each read, and the whole body)"
    )


def image_key(data: bytes) -> str:
    """The content key of an image: blake2b with a 16-byte digest, as hex."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class ImageSource:
    """Reads the bytes of image references, confined to ``root`` and bounded by ``limits``.

    Paths are opened component by component under a handle on the resolved root (see
    :class:`_ConfinedPath`), so a path, or a folder swapped for a symlink while the run reads, can
    never make a file outside the root be opened; an error message never quotes a file's bytes.
    """

    def __init__(self, root: Path, limits: ImageLimits = ImageLimits()) -> None:  # noqa: B008 (frozen)
        self.root = Path(root)
        self.limits = limits
        self._real_root = Path(os.path.realpath(self.root))

    def read_bytes(self, ref: ImageRef) -> bytes:
        """The bytes of ``ref``: its embedded data when present, else the file or URL its path names.

        Raises :class:`ImageError`; nothing is decoded here (see :func:`decode_image`).
        """
        if ref.data is not None:
            return self._check_size(bytes(ref.data), ref.describe())
        if not ref.path:
            raise ImageError("missing", "the image reference has neither a path nor data")
        path = ref.path
        scheme = _SCHEME.match(path)
        if scheme is not None:
            return self._fetch(path, scheme.group(1).lower())
        if path.startswith("data:"):
            raise ImageError("url_refused", "data: URIs are not supported; embed the bytes instead")
        return self._read_file(path)

    def _check_size(self, data: bytes, what: str) -> bytes:
        if not data:
            raise ImageError("empty", f"{what} is empty (0 bytes)")
        if len(data) > self.limits.max_bytes:
            raise ImageError(
                "too_large", f"{what} has {len(data)} bytes, over the limit of {self.limits.max_bytes}"
            )
        return data

    def _read_file(self, path: str) -> bytes:
        if "\x00" in path:
            raise ImageError("unreadable", f"image path {path!r} contains a NUL byte")
        if os.path.isabs(path):
            raise ImageError(
                "path_escape",
                f"absolute image path '{path}' refused: paths must be relative to the image root",
            )
        fd = _ConfinedPath(self._real_root, path).open()
        try:
            return self._read_fd(fd, path)
        finally:
            os.close(fd)

    def _read_fd(self, fd: int, path: str) -> bytes:
        limit = self.limits.max_bytes
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
                raise ImageError("unreadable", f"image path '{path}' is {kind}")
            if info.st_size > limit:
                raise ImageError(
                    "too_large", f"image file '{path}' has {info.st_size} bytes, over the limit of {limit}"
                )
            with os.fdopen(fd, "rb", closefd=False) as handle:
                data = handle.read(limit + 1)
        except OSError as err:
            raise ImageError(
                "unreadable", f"cannot read image file '{path}': {err.strerror or err}"
            ) from None
        if not data:
            raise ImageError("empty", f"image file '{path}' is empty (0 bytes)")
        if len(data) > limit:
            raise ImageError("too_large", f"image file '{path}' has more than {limit} bytes")
        return data

    def _fetch(self, url: str, scheme: str) -> bytes:
        if scheme not in ("http", "https"):
            raise ImageError("url_refused", f"URL scheme '{scheme}' is not supported: '{url}'")
        if not self.limits.allow_urls:
            raise ImageError(
                "url_refused", f"URL '{url}' refused: set images.allow_urls to fetch http(s) images"
            )
        limit, timeout = self.limits.max_bytes, self.limits.url_timeout_s
        deadline = time.monotonic() + timeout
        request = urllib.request.Request(url, headers={"User-Agent": "visa-image-fetch"})
        try:
            with _http_opener().open(request, timeout=timeout) as response:
                declared = response.headers.get("Content-Length")
                if declared is not None and declared.isdigit() and int(declared) > limit:
                    raise ImageError(
                        "too_large", f"URL '{url}' declares {declared} bytes, over the limit of {limit}"
                    )
                buffer = io.BytesIO()
                # read1 returns after each network read, so a server that drips bytes cannot hold
                # the loop past the deadline (each read is bounded by the socket timeout).
                while chunk := response.read1(_CHUNK):
                    buffer.write(chunk)
                    if buffer.tell() > limit:
                        raise ImageError("too_large", f"URL '{url}' sent more than {limit} bytes")
                    if time.monotonic() > deadline:
                        raise ImageError("url_failed", f"URL '{url}' took longer than {timeout:g} s")
        except urllib.error.HTTPError as err:
            err.close()
            raise ImageError("url_failed", f"URL '{url}' answered HTTP {err.code} {err.reason}") from None
        except urllib.error.URLError as err:
            raise ImageError("url_failed", f"cannot fetch '{url}': {err.reason}") from None
        except TimeoutError:
            raise ImageError("url_failed", f"URL '{url}' timed out after {timeout:g} s") from None
        except (OSError, ValueError) as err:  # connection resets, malformed responses and URLs
            raise ImageError("url_failed", f"cannot fetch '{url}': {err}") from None
        return self._check_size(buffer.getvalue(), f"URL '{url}'")


_DIR_FLAGS: Final = os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_PATH", 0)
# O_NONBLOCK: opening a FIFO must not hang; O_NOFOLLOW: a symlink is never followed by the kernel.
_FILE_FLAGS: Final = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
MAX_SYMLINKS: Final = 40


class _ConfinedPath:
    """Opens a relative path under a root without ever leaving it, whatever changes on disk meanwhile.

    Every component is opened with ``O_NOFOLLOW`` relative to the directory handle of the one before
    (``openat``), starting from a handle on the root: the kernel never resolves a symlink or a
    ``..`` on our behalf, so there is no window between checking a path and using it. A symlink
    component is read (``readlinkat``) and its target walked the same way: a relative target from
    the directory that holds the link, an absolute one only when it names a place under the root.
    ``..`` goes back to the handle of the parent directory actually walked through; above the root
    it is allowed only when the path comes straight back down into the root by its own name (as in
    ``images/../../root/images/a.jpg``). Anything else that leaves the root is ``path_escape``,
    decided before the file outside is opened, so no byte of it is ever read.
    """

    def __init__(self, real_root: Path, path: str) -> None:
        self.root = real_root
        self.path = path
        self.parts: list[str] = list(reversed(path.split("/")))  # a stack: the next component last
        self.dirs: list[int] = []
        self.above = 0  # how many levels above the root a leading `..` walk has gone
        self.hops = 0

    def open(self) -> int:
        """A file descriptor on the final component (the caller closes it); raises ImageError."""
        try:
            self.dirs.append(os.open(self.root, _DIR_FLAGS & ~os.O_NOFOLLOW))
        except OSError as err:
            raise ImageError("unreadable", f"cannot open the image root: {err.strerror or err}") from None
        try:
            while self.parts:
                fd = self._step(self.parts.pop())
                if fd is not None:
                    return fd
            raise ImageError("unreadable", f"image path '{self.path}' is a directory")
        finally:
            for fd in self.dirs:
                os.close(fd)

    def _step(self, name: str) -> int | None:
        if name in ("", "."):
            return None
        if name == "..":
            self._up()
            return None
        if self.above:
            self._back_down(name)
            return None
        last = not any(p not in ("", ".") for p in self.parts)
        try:
            fd = os.open(name, _FILE_FLAGS if last else _DIR_FLAGS, dir_fd=self.dirs[-1])
        except OSError as err:
            self._on_error(name, err)
            return None
        if last:
            return fd
        self.dirs.append(fd)
        return None

    def _up(self) -> None:
        if len(self.dirs) > 1:
            os.close(self.dirs.pop())
        elif self.above < len(self.root.parts) - 1:
            self.above += 1
        else:
            self._escape()

    def _back_down(self, name: str) -> None:
        """Below ``above`` levels over the root, only the root's own ancestors lead back in."""
        if name != self.root.parts[len(self.root.parts) - self.above]:
            self._escape()
        self.above -= 1

    def _on_error(self, name: str, err: OSError) -> None:
        try:
            info = os.stat(name, dir_fd=self.dirs[-1], follow_symlinks=False)
        except OSError:
            info = None
        if info is not None and stat.S_ISLNK(info.st_mode):
            self._follow(name)
        elif isinstance(err, FileNotFoundError) or err.errno == errno.ENOTDIR:
            raise ImageError("missing", f"image file '{self.path}' does not exist under the image root") from None
        else:
            raise ImageError("unreadable", f"cannot open image file '{self.path}': {err.strerror or err}") from None

    def _follow(self, name: str) -> None:
        self.hops += 1
        if self.hops > MAX_SYMLINKS:
            raise ImageError("unreadable", f"image path '{self.path}' goes through too many symlinks")
        try:
            target = os.readlink(name, dir_fd=self.dirs[-1])
        except OSError:
            self.parts.append(name)  # no longer a symlink: try the component again
            return
        if target.startswith("/"):
            inside = Path(target).parts[: len(self.root.parts)] == self.root.parts
            if not inside:
                self._escape()
            for fd in self.dirs[1:]:
                os.close(fd)
            del self.dirs[1:]
            target = "/".join(Path(target).parts[len(self.root.parts) :])
        self.parts.extend(reversed(target.split("/")))

    def _escape(self) -> None:
        raise ImageError("path_escape", f"image path '{self.path}' leads outside the image root")


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http(s) only (urllib's default also follows ftp)."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: Message,
        newurl: str,
    ) -> urllib.request.Request | None:
        scheme = _SCHEME.match(newurl)
        if scheme is None or scheme.group(1).lower() not in ("http", "https"):
            fp.close()
            raise urllib.error.URLError(f"redirect to a non-http(s) URL refused: '{newurl}'")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _http_opener() -> urllib.request.OpenerDirector:
    """An opener that speaks http(s) only: no file:, ftp: or data: handlers."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(),
        _HttpOnlyRedirects(),
        urllib.request.HTTPErrorProcessor(),
        urllib.request.HTTPDefaultErrorHandler(),
    ):
        opener.add_handler(handler)
    return opener


class _StrictTruncation:
    """Holds ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` False while any thread is inside :func:`decode_image`.

    Some libraries switch the flag on at import, which makes Pillow pad truncated files silently. The
    previous value is restored when the last decode leaves, so code outside is affected only while a
    decode runs concurrently in another thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._saved = False

    def __enter__(self) -> None:
        with self._lock:
            if self._depth == 0:
                self._saved = ImageFile.LOAD_TRUNCATED_IMAGES
                ImageFile.LOAD_TRUNCATED_IMAGES = False
            self._depth += 1

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = self._saved


_strict_pillow = _StrictTruncation()


def _accepted_formats() -> tuple[str, ...]:
    Image.init()
    return tuple(name for name in ACCEPTED_FORMATS if name in Image.OPEN)


def decode_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Decode ``data`` into a fully loaded RGB image (first frame, EXIF orientation applied)."""
    if not data:
        raise ImageError("empty", "image data is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageError(
            "too_large", f"image data has {len(data)} bytes, over the limit of {limits.max_bytes}"
        )
    with _strict_pillow, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Pillow's notes on corrupt metadata
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=_accepted_formats()) as image:
                _check_pixels(image.size, limits)
                image.seek(0)
                image.load()
                return _to_rgb(_upright(image))
        except ImageError:
            raise
        except UnidentifiedImageError:
            raise _unidentified(data) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ImageError("bomb", f"decompression bomb refused: {err}") from None
        except MemoryError:
            raise ImageError("too_large", "not enough memory to decode the image") from None
        except Exception as err:  # noqa: BLE001 - hostile bytes: any decoder failure becomes an error row
            raise _decode_failure(err, data) from None


def decoded_size(data: bytes) -> int:
    """About how many bytes ``data`` takes once decoded (4 per pixel, from the header alone; 0 when
    the header cannot be read, in which case decoding fails at once)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=_accepted_formats()) as image:
                width, height = image.size
    except Exception:  # noqa: BLE001 - hostile bytes: the decoder reports the real problem later
        return 0
    return max(0, width) * max(0, height) * 4


def load_image(src: ImageSource, ref: ImageRef) -> tuple[str, Image.Image]:
    """Read and decode one reference: ``(image_key, RGB image)``."""
    data = src.read_bytes(ref)
    return image_key(data), decode_image(data, src.limits)


def _check_pixels(size: tuple[int, int], limits: ImageLimits) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError("unreadable", f"image header gives an invalid size {width}x{height}")
    pixels = width * height
    # Pillow's own limit is enforced again here in case the warning filter was not in effect
    # (warning filters are process-global and not thread-safe).
    pillow_limit = Image.MAX_IMAGE_PIXELS
    if pixels > limits.max_pixels or (pillow_limit is not None and pixels > pillow_limit):
        limit = limits.max_pixels if pillow_limit is None else min(limits.max_pixels, pillow_limit)
        raise ImageError(
            "bomb", f"image header claims {width}x{height} = {pixels} pixels, over the limit of {limit}"
        )


def _unidentified(data: bytes) -> ImageError:
    """Bytes that no accepted format opens: not an image, or one whose header is cut short or corrupt."""
    name = _format_by_signature(data)
    if name is None:
        return ImageError(
            "not_image", f"data of {len(data)} bytes is not a recognised image format"
        )
    if len(data) < _SHORT_HEADER:
        return ImageError("truncated", f"{name} data of only {len(data)} bytes ends inside its header")
    return ImageError("unreadable", f"{len(data)} bytes start like {name} but the header is corrupt")


def _format_by_signature(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    for name, magic in _SIGNATURES:
        if data.startswith(magic):
            return name
    return None


def _decode_failure(err: Exception, data: bytes) -> ImageError:
    text = str(err) or type(err).__name__
    if isinstance(err, EOFError) or "truncated" in text.lower():
        return ImageError("truncated", f"image data ends early: {text}")
    if _format_by_signature(data) == "WebP":
        # libwebp refuses a cut file without saying why; the RIFF header tells how long it should be
        declared = int.from_bytes(data[4:8], "little") + 8
        if len(data) < declared:
            return ImageError("truncated", f"WebP data has {len(data)} of its {declared} bytes")
    return ImageError("unreadable", f"cannot decode image data: {type(err).__name__}: {text}")


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a broken EXIF block leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except (SyntaxError, ValueError, TypeError, KeyError, OSError, IndexError):
        return image.copy()


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith(("I", "F")):
        return Image.fromarray(_scale_to_uint8(np.asarray(image))).convert("RGB")
    return image.convert("RGB")


def _scale_to_uint8(values: np.ndarray) -> np.ndarray:
    """Map 16-bit, 32-bit integer or float gray values onto 0..255 without clipping bright values to white.

    Unsigned 16-bit data scales by 255/65535. Other data is scaled by the range it evidently uses:
    [0, 1] (float), [0, 255], [0, 65535], or, failing those, its own min..max.
    """
    if values.dtype.kind == "u" and values.dtype.itemsize == 2:
        return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    data = values.astype(np.float32)
    finite = np.isfinite(data)
    if not finite.all():
        data = np.where(finite, data, 0.0)
    low, high = float(data.min()), float(data.max())
    if low >= 0 and high <= 1 and values.dtype.kind == "f":
        scale, offset = 255.0, 0.0
    elif low >= 0 and high <= 255:
        scale, offset = 1.0, 0.0
    elif low >= 0 and high <= 65535:
        scale, offset = 255.0 / 65535.0, 0.0
    elif high > low:
        scale, offset = 255.0 / (high - low), low
    else:
        scale, offset = 0.0, low
    return np.clip(np.rint((data - offset) * scale), 0, 255).astype(np.uint8)
