"""The ``probes:`` section of a recipe (light: a recipe imports it without the probe machinery)."""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field


class ProbeOptions(BaseModel):
    """A recipe's ``probes:`` section: how many probes the run scores (see :mod:`visa.probes.run`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="score probes after the pool (needed by value: probes)")
    share: float = Field(0.1, gt=0, le=1, description="share of the pool's images / samples probed")
    minimum: int = Field(12, ge=2, description="at least this many ladders of each kind (when the pool has them)")
    max_images: int = Field(32, ge=2, description="at most this many image ladders")
    max_samples: int = Field(32, ge=2, description="at most this many IM/PT ladders")
    others: int = Field(1, ge=1, le=8, description="other pool images each IM ladder puts its conversation on")
    max_side: int = Field(768, ge=64, description="long side (px) probe sources are shrunk to")
    seed: int = Field(0, description="seed of the calibration draw and of the random probes")

    def count(self, available: int, cap: int) -> int:
        return min(available, max(self.minimum, min(cap, math.ceil(self.share * available))))
