"""The reference resize shared by the image agents (SC and OA reference settings, METHOD.md).

Both reference scorers first bring an image to a pixel count within ``[min_pixels, max_pixels]``
(3136 = 56 x 56 and 4096 x 28 x 28 = 3,211,264), keeping the aspect ratio, with both sides rounded
to a multiple of ``factor`` (28, the patch grid of the vision models the reference settings come
from). Images already inside the range only move to the nearest multiple of ``factor``; larger ones
shrink and smaller ones grow by one common scale factor.
"""

from __future__ import annotations

import math

from PIL import Image

MIN_PIXELS = 3136
MAX_PIXELS = 4096 * 28 * 28
FACTOR = 28


def reference_size(
    width: int,
    height: int,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    factor: int = FACTOR,
) -> tuple[int, int]:
    """Target ``(width, height)``: multiples of ``factor``, pixel count within the bounds when possible.

    Raises ValueError for an empty image or inconsistent bounds.
    """
    if width < 1 or height < 1:
        raise ValueError(f"cannot resize an empty image ({width}x{height})")
    if factor < 1 or min_pixels < 1 or max_pixels < min_pixels or max_pixels < factor * factor:
        raise ValueError(
            f"bad resize bounds: min_pixels={min_pixels}, max_pixels={max_pixels}, factor={factor}"
        )

    def snap(side: float, rounding) -> int:
        return max(factor, int(rounding(side / factor)) * factor)

    new_w, new_h = snap(width, round), snap(height, round)
    if new_w * new_h > max_pixels:
        scale = math.sqrt(width * height / max_pixels)
        new_w, new_h = snap(width / scale, math.floor), snap(height / scale, math.floor)
    elif new_w * new_h < min_pixels:
        scale = math.sqrt(min_pixels / (width * height))
        new_w, new_h = snap(width * scale, math.ceil), snap(height * scale, math.ceil)
    if new_w * new_h > max_pixels:  # extreme aspect ratio: the short side is stuck at ``factor``
        if new_w >= new_h:
            new_w = max(factor, max_pixels // new_h // factor * factor)
        else:
            new_h = max(factor, max_pixels // new_w // factor * factor)
    return new_w, new_h


def reference_resize(
    image: Image.Image,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    factor: int = FACTOR,
) -> Image.Image:
    """Resize ``image`` to :func:`reference_size` (bicubic); returns the image itself when unchanged."""
    size = reference_size(image.width, image.height, min_pixels, max_pixels, factor)
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.BICUBIC)


def fit_long_side(image: Image.Image, max_side: int) -> Image.Image:
    """Shrink ``image`` so that its longer side is at most ``max_side`` (never enlarges)."""
    if max_side < 1:
        raise ValueError(f"max_side must be positive, got {max_side}")
    long_side = max(image.size)
    if long_side <= max_side:
        return image
    scale = max_side / long_side
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR)
