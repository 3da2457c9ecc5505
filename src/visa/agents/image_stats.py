"""Cheap image statistics: size, aspect ratio and grey-level entropy."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from visa.agents.base import PerImageAgent, Unit


class ImageStatsAgent(PerImageAgent):
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

    def score_image(self, image: Image.Image) -> dict[str, Any]:
        width, height = image.size
        histogram = np.asarray(image.convert("L").histogram(), dtype=np.float64)
        p = histogram[histogram > 0] / histogram.sum()
        return {
            "score": float(-(p * np.log2(p)).sum()),
            "width": width,
            "height": height,
            "aspect_ratio": max(width, height) / max(1, min(width, height)),
        }
