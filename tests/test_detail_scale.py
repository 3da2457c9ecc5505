"""detail_scale: the coarsest scale that reproduces an image, on real photos and their degraded copies."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from visa.agents.detail_scale import DetailScaleAgent, DetailScaleParams
from visa.registry import agent_class


def thumbnail(image: Image.Image, side: int) -> Image.Image:
    small = image.copy()
    small.thumbnail((side, side), Image.Resampling.BILINEAR)
    return small.resize(image.size, Image.Resampling.BILINEAR)


def score(image: Image.Image, **params: float) -> float:
    return DetailScaleAgent(DetailScaleParams(**params)).score_image(image)["score"]


def test_registered() -> None:
    assert agent_class("detail_scale") is DetailScaleAgent


def test_thumbnails_and_blur_hold_less_detail_than_the_photo(photos: list[Image.Image]) -> None:
    original = np.array([score(im) for im in photos])
    at_128 = np.array([score(thumbnail(im, 128)) for im in photos])
    at_32 = np.array([score(thumbnail(im, 32)) for im in photos])
    blurred = np.array([score(im.filter(ImageFilter.GaussianBlur(max(im.size) / 20))) for im in photos])
    assert np.median(original) > 7.5
    assert np.all(at_32 <= 5.6)  # a 32 px thumbnail is reproduced from 32-48 px
    assert np.all(original > at_128) and np.all(at_128 >= at_32)
    assert np.all(original > blurred)


def test_coarse_content_scores_low_and_fine_print_high() -> None:
    blocky = Image.fromarray(np.kron(np.random.default_rng(0).integers(0, 256, (4, 4)), np.ones((64, 64))).astype(np.uint8))
    memo = Image.new("RGB", (560, 520), "white")
    draw = ImageDraw.Draw(memo)
    for i in range(24):
        draw.text((30, 20 + 20 * i), f"Line {i}: the estimated cost is ${100 + 7 * i} per unit", fill="black")
    assert score(blocky) < 4.5  # a 4 x 4 mosaic shown at 256 px
    assert score(memo) > 8.5


def test_flat_tiny_and_large_images() -> None:
    assert score(Image.new("RGB", (300, 200), (10, 200, 30))) == 0.0
    tiny = Image.fromarray(np.array([[0, 255, 0, 255]] * 4, dtype=np.uint8))
    assert score(tiny) == pytest.approx(2.0)  # below the smallest scale: its own long side
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 256, (600, 2000), dtype=np.uint8))
    assert 9.5 < score(noise) <= 10.0  # reduced to max_side (1024) first; noise keeps all its detail
    assert 7.5 < score(noise, max_side=256) <= 8.0


def test_tolerance_orders_the_scale(photos: list[Image.Image]) -> None:
    image = photos[0]
    assert score(image, tolerance=0.05) >= score(image, tolerance=0.1) >= score(image, tolerance=0.3)
