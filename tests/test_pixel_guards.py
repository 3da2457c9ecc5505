"""The agents that rank information-free images low: neighbour correlation (noise, flat) and the
8 x 8 block grid (heavy JPEG), on the bundled real photos, rendered images and their degraded copies."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from visa.agents.block_grid import BlockGridAgent, BlockGridParams, grid_evidence, step_lines
from visa.agents.pixel_correlation import PixelCorrelationAgent, central_crop, neighbour_correlation
from visa.registry import agent_class


def rendered() -> list[Image.Image]:
    """Plain synthetic images of the kinds a clean pool holds: a shape, a line of text, a chart."""
    shape = Image.new("RGB", (96, 96), "white")
    ImageDraw.Draw(shape).rectangle((23, 31, 55, 71), fill=(30, 70, 220))  # edges on the 8-px grid
    text = Image.new("RGB", (320, 80), (250, 240, 220))
    ImageDraw.Draw(text).text((12, 25), "Platform 4 - Mind the gap", fill=(20, 20, 20))
    chart = Image.new("RGB", (240, 160), "white")
    draw = ImageDraw.Draw(chart)
    for i, h in enumerate((40, 90, 65, 120)):
        draw.rectangle((20 + 50 * i, 150 - h, 55 + 50 * i, 150), fill=(200, 80 + 30 * i, 40))
    return [shape, text, chart]


def noise_like(image: Image.Image, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (image.height, image.width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as im:
        return im.convert("RGB")


def scores(agent: PixelCorrelationAgent | BlockGridAgent, images: list[Image.Image]) -> np.ndarray:
    return np.array([agent.score_image(im)["score"] for im in images])


def test_registered() -> None:
    assert agent_class("pixel_correlation") is PixelCorrelationAgent
    assert agent_class("block_grid") is BlockGridAgent


def test_correlation_ranks_noise_and_flat_images_lowest(photos: list[Image.Image]) -> None:
    agent = PixelCorrelationAgent()
    clean = photos + rendered()
    assert np.all(scores(agent, clean) == 1.0)  # structured content ties at the top
    noisy = [noise_like(im, i) for i, im in enumerate(clean)]
    assert np.all(scores(agent, noisy) < 0.1)
    assert max(abs(agent.score_image(im)["correlation"]) for im in noisy) < 0.05
    flat = [Image.new("RGB", im.size, (i * 17 % 256, 90, 200)) for i, im in enumerate(clean)]
    assert np.all(scores(agent, flat) == 0.0)
    assert agent.score_image(flat[0])["correlation"] is None
    # noise over half of an image lowers the correlation, not to zero: the other half still shows
    half = photos[0].copy()
    half.paste(noise_like(half, 7).crop((0, 0, half.width // 2, half.height)), (0, 0))
    assert 0.1 < agent.score_image(half)["correlation"] < agent.score_image(photos[0])["correlation"] - 0.1


def test_correlation_does_not_reward_blur(photos: list[Image.Image]) -> None:
    agent = PixelCorrelationAgent()
    blurred = [im.filter(ImageFilter.GaussianBlur(radius=max(im.size) / 20)) for im in photos]
    assert np.array_equal(scores(agent, blurred), scores(agent, photos))  # both tie at 1


def test_correlation_edge_cases() -> None:
    agent = PixelCorrelationAgent()
    assert agent.score_image(Image.new("RGB", (1, 1), "red"))["score"] == 0.0
    assert agent.score_image(Image.new("RGB", (1, 50), "red"))["score"] == 0.0
    stripes = np.tile(np.array([0, 255], dtype=np.uint8), (20, 20))  # alternating columns: r = -1
    assert neighbour_correlation(stripes.astype(float)) is not None
    assert agent.score_image(Image.fromarray(stripes, "L"))["score"] == 0.0
    grey = np.arange(100 * 60, dtype=float).reshape(100, 60)
    crop = central_crop(grey, 32, align=8)
    assert crop.shape == (32, 32) and crop[0, 0] == grey[32, 8]  # offsets (34, 14) floored to the grid


def test_block_grid_finds_heavy_jpeg_and_spares_ordinary_jpeg(photos: list[Image.Image]) -> None:
    agent = BlockGridAgent()
    # the bundled photos are themselves JPEG (quality ~90) or PNG: no grid beyond chance
    assert np.all(scores(agent, photos) == 0.0)
    assert np.all(scores(agent, [jpeg(im, 75) for im in photos]) == 0.0)
    assert np.all(scores(agent, rendered()) == 0.0)
    heavy = [jpeg(im, 2) for im in photos]
    results = [agent.score_image(im) for im in heavy]
    assert np.mean([r["score"] < 0 for r in results]) >= 0.9
    assert np.mean([r["grid_lines"] / max(r["step_lines"], 1) for r in results]) > 0.5
    # flat images, noise and blur have no lone steps at all
    for im in (Image.new("RGB", (64, 64), "teal"), noise_like(photos[0], 1),
               photos[0].filter(ImageFilter.GaussianBlur(radius=20))):
        assert agent.score_image(im)["step_lines"] == 0 and agent.score_image(im)["score"] == 0.0


def test_block_grid_needs_the_grid_itself(photos: list[Image.Image]) -> None:
    agent = BlockGridAgent()
    heavy = jpeg(photos[1], 2)
    assert agent.score_image(heavy)["score"] < 0
    shifted = heavy.crop((3, 5, heavy.width, heavy.height))  # the grid no longer starts at the origin
    assert agent.score_image(shifted)["score"] == 0.0


def test_grid_excess_and_step_lines() -> None:
    assert grid_evidence(0, 0) == 0.0
    assert grid_evidence(0, 30) == 0.0
    assert grid_evidence(2, 2) == pytest.approx(np.log10(64))  # both of two lines: 1 in 64, chance
    assert grid_evidence(16, 16) == pytest.approx(16 * np.log10(8))
    # P(X >= 2) for Binomial(3, 1/8) = 3 * (1/8)^2 * (7/8) + (1/8)^3
    assert grid_evidence(2, 3) == pytest.approx(-np.log10(3 * 7 / 512 + 1 / 512))
    assert grid_evidence(400, 400) > 300  # no underflow far in the tail
    mosaic = np.kron(np.random.default_rng(0).integers(0, 256, (6, 6)), np.ones((8, 8)))  # flat 8x8 blocks
    on_grid, total = step_lines(mosaic, BlockGridParams())
    assert on_grid == total == 5
    assert step_lines(np.roll(mosaic, 3, axis=1), BlockGridParams())[0] == 0
