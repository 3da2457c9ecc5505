"""Cheap image statistics: size, aspect ratio and grey-level entropy."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from visa.agents.base import Agent, ImageItem, Result, Unit


class ImageStatsAgent(Agent):
    """Width, height, aspect ratio (long side / short side) and Shannon entropy (bits) of the grey levels.

    The primary ``score`` is the entropy: 0 for a flat image, up to 8 bits for a busy one.
    """

    unit = Unit.IMAGE
    outputs = {
        "score": pa.float64(),
        "width": pa.int32(),
        "height": pa.int32(),
        "aspect_ratio": pa.float64(),
    }

    def score_batch(self, items: Sequence[ImageItem]) -> list[Result]:
        return [self._one(item) for item in items]

    @staticmethod
    def _one(item: ImageItem) -> Result:
        width, height = item.image.size
        histogram = np.asarray(item.image.convert("L").histogram(), dtype=np.float64)
        p = histogram[histogram > 0] / histogram.sum()
        return {
            "score": float(-(p * np.log2(p)).sum()),
            "width": width,
            "height": height,
            "aspect_ratio": max(width, height) / max(1, min(width, height)),
        }
