"""SC from resolution: the coarsest scale that still reproduces the image.

A picture holds detail down to some scale: a memo of small print needs hundreds of pixels across to
stay legible, a handwritten digit scanned at 8 x 8 pixels needs no more than that, whatever size it
is displayed at. Thumbnails blown up again and blurred images look large but hold the detail of a
small image. The agent measures the scale directly: the grey image is shrunk (box filter) so that
its long side is ``L`` = 8, 16, 32, ... pixels, enlarged back (bilinear), and compared with itself;
the error is the mean absolute difference divided by the mean absolute deviation of the grey levels,
or by ``min_spread`` grey levels when that is larger (0 = reproduced exactly, about 1 = only the mean
survives; the floor keeps faint differences in a low-contrast image, such as a thumbnail of a fine
texture, from counting as detail). ``score`` is ``log2`` of the smallest
``L`` whose error is at most ``tolerance``, interpolated linearly in the error between that scale and
the one before, so images of one kind do not all tie; an image reproduced at no smaller scale scores
``log2`` of its own long side (at most ``max_side``, the size it is first reduced to), a flat image 0.

It is a measure of detail, not of information: uniform noise keeps detail at every scale and scores
as high as a sharp photo (``pixel_correlation`` ranks it lowest). Measured on a task-family pool of
BENCHMARKS.md ("Information-free images"), medians: memos 9.0, code 8.5, text lines 8.2, photos 8.2,
charts 7.5, arithmetic 5.8, shapes 4.7, digits 3.7; thumbnails (32 px, enlarged) 3.6-5.1, blurred
images (radius 1/20 of the long side) 3.0-4.4, flat images 0. Compared within a kind of content (see
content clusters), a thumbnail or blurred copy ranks below the clean images of its kind, except for
content that is itself coarse (a digit and its thumbnail tie).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
from PIL import Image
from pydantic import Field

from visa.agents.base import AgentParams, PerImageAgent, Unit

SMALLEST = 8


class DetailScaleParams(AgentParams):
    batch_size: int = 16
    tolerance: float = Field(0.1, gt=0, lt=1, description="relative error at which a scale reproduces the image")
    max_side: int = Field(1024, ge=SMALLEST, description="long side (px) the image is first reduced to")
    min_spread: float = Field(16.0, ge=0, description="grey levels the error is at least divided by")


def round_trip_error(grey: Image.Image, side: int, reference: np.ndarray, spread: float) -> float:
    """Relative error of shrinking ``grey`` to long side ``side`` and enlarging it back."""
    w, h = grey.size
    scale = side / max(w, h)
    small = grey.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BOX)
    back = np.asarray(small.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float64)
    return float(np.abs(back - reference).mean()) / spread


class DetailScaleAgent(PerImageAgent):
    """``score``: log2 of the coarsest long side that reproduces the image; ``error_at_32``: the
    relative error at 32 px (how much a thumbnail would lose)."""

    unit = Unit.IMAGE
    version = "1"
    Params: ClassVar[type[AgentParams]] = DetailScaleParams
    outputs: ClassVar[dict[str, pa.DataType]] = {"score": pa.float64(), "error_at_32": pa.float64()}
    params: DetailScaleParams

    def score_image(self, image: Image.Image) -> dict[str, Any]:
        grey = image.convert("L")
        if max(grey.size) > self.params.max_side:
            scale = self.params.max_side / max(grey.size)
            size = (max(1, round(grey.width * scale)), max(1, round(grey.height * scale)))
            grey = grey.resize(size, Image.Resampling.BOX)
        reference = np.asarray(grey, dtype=np.float64)
        deviation = float(np.abs(reference - reference.mean()).mean())
        if deviation < 1e-9:
            return {"score": 0.0, "error_at_32": 0.0}
        spread = max(deviation, self.params.min_spread)
        long_side = max(grey.size)
        tolerance = self.params.tolerance
        previous: tuple[int, float] | None = None
        error_at_32: float | None = None
        side = SMALLEST
        while side < long_side:
            error = round_trip_error(grey, side, reference, spread)
            if side == 32:
                error_at_32 = error
            if error <= tolerance:
                return {"score": self._interpolate(previous, side, error), "error_at_32": error_at_32}
            previous = (side, error)
            side *= 2
        return {"score": self._interpolate(previous, long_side, 0.0), "error_at_32": error_at_32}

    def _interpolate(self, previous: tuple[int, float] | None, side: int, error: float) -> float:
        """log2 of the scale where the error crosses ``tolerance``, linear in the error between the
        last scale that failed (``previous``) and ``side``, which passed with ``error``."""
        if previous is None:
            return math.log2(side)
        low_side, low_error = previous
        t = (low_error - self.params.tolerance) / max(low_error - error, 1e-12)
        return math.log2(low_side) + t * (math.log2(side) - math.log2(low_side))
