"""OA from how sure a classifier is: minus the entropy of the tagger's tag distribution.

A photo of a recognisable object gives a peaked class distribution; a blank, blurred, pixelated or
noisy image gives a diffuse one (a classifier always spreads its softmax, and with no object it
spreads it widely). The score is ``-H`` in nats (``H = -sum p ln p`` over the tagger's 998 merged
ImageNet tags, 0 for a certain prediction, ln 998 = 6.91 for a uniform one), so higher = more
recognisable content. It needs no vocabulary of its own and no pool statistics.

The agent runs no model: it reads the entropy the recipe's tagger already computed for the image
(``needs``: ``<tagger>.entropy``, default ``oa.tagger``), so a recipe with both pays for one
classifier pass per image. A recipe without that tagger is refused when it loads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import pyarrow as pa
from pydantic import Field

from visa.agents.base import Agent, AgentParams, ImageItem, Result, Unit


class LabelEntropyParams(AgentParams):
    batch_size: int = 64
    tagger: str = Field("oa.tagger", description="column of the tagger agent whose entropy is read")


class LabelEntropyAgent(Agent):
    """``score`` = minus the entropy (nats) of the tagger's distribution; ``entropy`` = H."""

    params: LabelEntropyParams
    unit = Unit.IMAGE
    version = "2"
    Params: ClassVar[type[AgentParams]] = LabelEntropyParams
    outputs: ClassVar[dict[str, pa.DataType]] = {"score": pa.float64(), "entropy": pa.float64()}

    def __init__(self, params: LabelEntropyParams | None = None):
        super().__init__(params)
        self.needs = (f"{self.params.tagger}.entropy",)

    def score_batch(self, items: Sequence[ImageItem]) -> list[Result]:  # type: ignore[override]
        (column,) = self.needs
        out: list[Result] = []
        for item in items:
            entropy = item.context.get(column)
            if entropy is None or not math.isfinite(float(entropy)):
                out.append(ValueError(f"no {column} for this image (the tagger failed on it)"))
            else:
                out.append({"score": -float(entropy), "entropy": float(entropy)})
        return out
