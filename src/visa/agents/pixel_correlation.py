"""SC guard against information-free pixels: the correlation of neighbouring pixels.

Every image that shows something (a photo, a chart, a line of text, a handwritten digit) has
neighbouring pixels that are strongly correlated: edges and surfaces span many pixels. Uniform random
noise has none (its lag-1 correlation is 0 up to sampling error), and a flat image has no variation
to correlate. Counts of regions, edges or encoded bits reward both kinds of noise pixels; this agent
ranks them lowest.

The grey image (a central crop of at most ``max_side`` pixels per side, at its own resolution:
resampling would smooth noise into a plausible texture) gives the Pearson correlation of horizontally
and vertically adjacent pixels (their mean); ``correlation`` is that value and

    score = clip(correlation / ceiling, 0, 1)

so every image whose neighbours correlate at least ``ceiling`` ties at 1 and the score separates only
the noise-like ones (a blurred image correlates more than a sharp one, and is not rewarded for it).
An image whose grey levels vary by less than ``flat_std`` (standard deviation, 0-255 scale), or that
has fewer than two pixels along a side, scores 0. Measured on the task-family pools of BENCHMARKS.md
("Information-free images"): clean images of every family correlate 0.6-1.0 (code screenshots and
memos lowest, 0.61-0.75), uniform noise -0.004-0.007; ``ceiling`` = 0.5 sits between them.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
from PIL import Image
from pydantic import Field

from visa.agents.base import AgentParams, PerImageAgent, Unit


class PixelCorrelationParams(AgentParams):
    batch_size: int = 16
    ceiling: float = Field(0.5, gt=0, le=1, description="correlation from which an image scores 1")
    flat_std: float = Field(1.0, ge=0, description="grey-level standard deviation below which an image is flat")
    max_side: int = Field(1024, ge=8, description="side (px) of the central crop that is measured")


def central_crop(grey: np.ndarray, side: int, align: int = 1) -> np.ndarray:
    """The central ``side`` x ``side`` window of a 2-D array (or all of a smaller axis), starting at a
    multiple of ``align`` on both axes."""
    out = grey
    for axis in (0, 1):
        length = out.shape[axis]
        if length > side:
            start = (length - side) // 2 // align * align
            out = out.take(np.arange(start, start + side), axis=axis)
    return out


def neighbour_correlation(grey: np.ndarray) -> float | None:
    """Mean of the horizontal and vertical lag-1 Pearson correlations; None when neither is defined."""
    values = []
    for a, b in ((grey[:, 1:], grey[:, :-1]), (grey[1:, :], grey[:-1, :])):
        if not a.size:
            continue
        a, b = a - a.mean(), b - b.mean()
        denominator = float(np.sqrt((a * a).sum() * (b * b).sum()))
        if denominator > 0:
            values.append(float((a * b).sum()) / denominator)
    return float(np.mean(values)) if values else None


class PixelCorrelationAgent(PerImageAgent):
    """``score``: clipped neighbour correlation (0 = noise or flat, 1 = structured); ``correlation``: raw."""

    unit = Unit.IMAGE
    version = "1"
    Params: ClassVar[type[AgentParams]] = PixelCorrelationParams
    outputs: ClassVar[dict[str, pa.DataType]] = {"score": pa.float64(), "correlation": pa.float64()}
    params: PixelCorrelationParams

    def score_image(self, image: Image.Image) -> dict[str, Any]:
        grey = central_crop(np.asarray(image.convert("L"), dtype=np.float64), self.params.max_side)
        if min(grey.shape) < 2 or float(grey.std()) < self.params.flat_std:
            return {"score": 0.0, "correlation": None}
        correlation = neighbour_correlation(grey)
        if correlation is None:
            return {"score": 0.0, "correlation": None}
        return {"score": float(np.clip(correlation / self.params.ceiling, 0.0, 1.0)), "correlation": correlation}
