"""SC from compressibility: bits per pixel of the image re-encoded as JPEG at a fixed quality.

An image with many distinct regions, edges and textures costs more bits to encode than a plain one;
a JPEG encoder at a fixed quality is a cheap, vocabulary-free measure of that (related to the
"compression as complexity" measures of image aesthetics). The image is first shrunk so that its
long side is at most ``working_side`` (never enlarged), converted to RGB and encoded at ``quality``;
``bits_per_pixel = 8 * bytes / (width * height)``.

One-sided counts are fooled by noise: pure random pixels are incompressible and cost the most bits
of all. The score is therefore two-sided: ``score = log2(bpp)`` up to ``noise_bpp`` and falls
beyond it, ``score = log2(noise_bpp) - noise_slope * (log2(bpp) - log2(noise_bpp))``, so a noisy
image ranks with the flat ones. At quality 75 and 512 px the photographs
bundled with scikit-image and scikit-learn need 0.3-2.5 bits per pixel (``clock`` 0.29, ``grass``
2.45; central crops of ``page`` up to 2.7) and uniform noise 4.8-5.0, so ``noise_bpp`` = 3.5 sits
between them and ``noise_slope`` = 10 puts uniform noise as low as a flat image (about 0.15 bits).
It is a fixed reference, not a pool statistic, so an image's score does not depend on the pool.
The shrink uses nearest-neighbour sampling: averaging would smooth noise into a plausible texture.
"""

from __future__ import annotations

import io
import math
from typing import Any, ClassVar

import pyarrow as pa
from PIL import Image
from pydantic import Field

from visa.agents.base import AgentParams, PerImageAgent, Unit


class JpegBitsParams(AgentParams):
    batch_size: int = 16
    quality: int = Field(75, ge=1, le=95, description="JPEG quality of the re-encoding")
    working_side: int = Field(512, ge=32, description="long side (px) the image is shrunk to first")
    noise_bpp: float = Field(3.5, gt=0, description="bits per pixel above which an image looks like noise")
    noise_slope: float = Field(10.0, ge=0, description="how fast the score falls above noise_bpp")


class JpegBitsAgent(PerImageAgent):
    """``score``: two-sided log2 bits per pixel (see module doc); ``bits_per_pixel``: the raw value."""

    unit = Unit.IMAGE
    version = "1"
    Params: ClassVar[type[AgentParams]] = JpegBitsParams
    outputs: ClassVar[dict[str, pa.DataType]] = {"score": pa.float64(), "bits_per_pixel": pa.float64()}
    params: JpegBitsParams

    def score_image(self, image: Image.Image) -> dict[str, Any]:
        image = image.convert("RGB")
        side = self.params.working_side
        if max(image.size) > side:
            scale = side / max(image.size)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.NEAREST)  # no averaging: noise stays noise
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=self.params.quality)
        bpp = 8.0 * buffer.tell() / (image.width * image.height)
        return {"score": self.two_sided(bpp), "bits_per_pixel": bpp}

    def two_sided(self, bpp: float) -> float:
        """log2(bpp), folded down beyond ``noise_bpp``."""
        bits, ceiling = math.log2(bpp), math.log2(self.params.noise_bpp)
        return bits if bits <= ceiling else ceiling - self.params.noise_slope * (bits - ceiling)
