"""Regenerate ``examples/images/`` from the sample photos shipped inside installed packages.

Run from the repository root (needs scikit-image, scikit-learn and matplotlib, all in the ``dev``
extra)::

    python examples/make_examples.py

Every photo is downscaled so that its longest side is at most 640 px. Colour photos are saved as
JPEG (quality 90); grayscale text images as PNG. Origins and licences are listed in LICENSES.md.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

MAX_SIDE = 640
JPEG_QUALITY = 90
OUT_DIR = Path(__file__).resolve().parent / "images"


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return getattr(skimage.data, name)()

    return load


def _motorcycle_left() -> np.ndarray:
    import skimage.data

    left, _right, _disparity = skimage.data.stereo_motorcycle()
    return left


def _sklearn(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(name)

    return load


def _grace_hopper() -> np.ndarray:
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as handle:
        return np.asarray(Image.open(handle).convert("RGB"))


# output file name -> loader returning a uint8 array (H, W) or (H, W, 3)
PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut.jpg": _skimage("astronaut"),
    "chelsea.jpg": _skimage("chelsea"),
    "coffee.jpg": _skimage("coffee"),
    "rocket.jpg": _skimage("rocket"),
    "motorcycle.jpg": _motorcycle_left,
    "hubble_deep_field.jpg": _skimage("hubble_deep_field"),
    "immunohistochemistry.jpg": _skimage("immunohistochemistry"),
    "retina.jpg": _skimage("retina"),
    "camera.jpg": _skimage("camera"),
    "coins.jpg": _skimage("coins"),
    "clock.jpg": _skimage("clock"),
    "moon.jpg": _skimage("moon"),
    "brick.jpg": _skimage("brick"),
    "grass.jpg": _skimage("grass"),
    "page.png": _skimage("page"),
    "text.png": _skimage("text"),
    "china.jpg": _sklearn("china.jpg"),
    "flower.jpg": _sklearn("flower.jpg"),
    "grace_hopper.jpg": _grace_hopper,
}


def to_image(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        raise TypeError(f"expected uint8 pixels, got {array.dtype}")
    image = Image.fromarray(array)
    longest = max(image.size)
    if longest > MAX_SIDE:
        scale = MAX_SIDE / longest
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image


def save(image: Image.Image, path: Path) -> None:
    if path.suffix == ".png":
        image.save(path, format="PNG", optimize=True)
    else:
        image.save(path, format="JPEG", quality=JPEG_QUALITY, optimize=True)


def main() -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name, load in PHOTOS.items():
        image = to_image(load())
        save(image, OUT_DIR / name)
        print(f"{name:26s} {image.width}x{image.height} {image.mode}")


if __name__ == "__main__":
    main()
