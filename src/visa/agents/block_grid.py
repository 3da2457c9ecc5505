"""SC guard against heavy JPEG damage: sharp steps that line up with the 8 x 8 block grid.

A JPEG encoder codes each 8 x 8 block of pixels on its own; at a very low quality a block keeps
little more than its mean, so the picture becomes a mosaic of flat blocks with steps between them,
all on the grid (columns and rows 8k-1 | 8k). Edges of real content fall anywhere: on any pixel
boundary, only one line in eight belongs to the grid. The agent counts *step lines* and how many of
them lie on the grid:

1. On the grey image (a central crop of at most ``max_side`` pixels per side, started on the grid,
   never resampled), a pixel pair is a *step* when its absolute difference is at least ``min_step``
   grey levels and more than ``dominance`` times every other difference within ``reach`` pixels on
   the same row: a lone jump between flat stretches, the shape of a block edge.
2. A column boundary is a *step line* when at least ``max(2, height * min_line)`` of its pairs are
   steps (and likewise for row boundaries, along the columns).
3. With ``T`` step lines of which ``G`` are on the grid, the evidence of a grid is
   ``evidence = -log10 P(X >= G)`` for ``X ~ Binomial(T, 1/8)``, the chance that content edges put
   that many lines on it (0 when there is no step line), and ``score = -max(evidence - tolerance, 0)``:
   odds up to 1 in ``10**tolerance`` (4) are chance, so every clean image ties at 0 and a blocky image
   scores far below. A tail probability, not a z-score, because two or three lines are common (the
   rule under a memo's title) and prove nothing.

Mild JPEG (quality 75-95, the usual web photo) leaves steps of one or two grey levels in smooth
areas; ``min_step`` = 10 ignores them. Measured on the task-family pools of BENCHMARKS.md
("Information-free images"): clean images (photos saved as JPEG at quality ~90, charts, text, code,
memos, digits, shapes) all score 0, and so do the 19 bundled photos saved again at quality 75;
at quality 50 16% of them score below 0, at 30 74%, at 10 and below all (``dominance`` = 3 and
``min_line`` = 1/32 were chosen on that ladder: lower values flag a third of the quality-75 photos,
higher ones miss more of the quality-2 images). Small images with few edges (a 96 px shape) may
have no step line left after compression and go unnoticed. An image resampled after compression
has no grid left, and scores 0.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
from PIL import Image
from pydantic import Field

from visa.agents.base import AgentParams, PerImageAgent, Unit
from visa.agents.pixel_correlation import central_crop

BLOCK = 8


class BlockGridParams(AgentParams):
    batch_size: int = 16
    min_step: float = Field(10.0, gt=0, description="smallest grey-level jump that counts as a step")
    dominance: float = Field(3.0, ge=1, description="a step exceeds every nearby difference by this factor")
    reach: int = Field(7, ge=1, le=32, description="pixels on each side a step must dominate")
    min_line: float = Field(1 / 32, gt=0, le=1, description="share of a line's pairs that must be steps")
    max_side: int = Field(1024, ge=16, description="side (px) of the central crop that is measured")
    tolerance: float = Field(4.0, ge=0, description="evidence (-log10 of the chance) still taken for chance")


def step_lines(grey: np.ndarray, params: BlockGridParams) -> tuple[int, int]:
    """(step lines on the grid, all step lines) among the column boundaries of ``grey`` (H x W);
    the crop starts on the grid, so boundary ``x`` (between columns x and x+1) is on it when
    ``x % 8 == 7``."""
    diff = np.abs(np.diff(grey, axis=1))
    if diff.shape[1] < 2:
        return 0, 0
    reach = params.reach
    padded = np.pad(diff, ((0, 0), (reach, reach)))
    width = diff.shape[1]
    nearby = np.zeros_like(diff)
    for shift in range(1, reach + 1):
        np.maximum(nearby, padded[:, reach - shift: reach - shift + width], out=nearby)
        np.maximum(nearby, padded[:, reach + shift: reach + shift + width], out=nearby)
    step = (diff >= params.min_step) & (diff > params.dominance * nearby)
    lines = step.sum(axis=0) >= max(2, math.ceil(grey.shape[0] * params.min_line))
    on_grid = np.arange(width) % BLOCK == BLOCK - 1
    return int((lines & on_grid).sum()), int(lines.sum())


def grid_evidence(on_grid: int, total: int) -> float:
    """``-log10 P(X >= on_grid)`` for ``X ~ Binomial(total, 1/8)`` (0 when ``on_grid`` is 0)."""
    if on_grid <= 0:
        return 0.0
    k = np.arange(on_grid, total + 1, dtype=np.float64)
    p = 1.0 / BLOCK
    log_terms = (
        math.lgamma(total + 1)
        - np.array([math.lgamma(x + 1) + math.lgamma(total - x + 1) for x in k])
        + k * math.log(p)
        + (total - k) * math.log1p(-p)
    )
    top = float(log_terms.max())
    log_tail = top + math.log(float(np.exp(log_terms - top).sum()))
    return max(0.0, -log_tail / math.log(10.0))


class BlockGridAgent(PerImageAgent):
    """``score``: -max(evidence - tolerance, 0) (0 = no grid, lower = blockier); ``evidence``,
    ``grid_lines``, ``step_lines``: raw."""

    unit = Unit.IMAGE
    version = "1"
    Params: ClassVar[type[AgentParams]] = BlockGridParams
    outputs: ClassVar[dict[str, pa.DataType]] = {
        "score": pa.float64(),
        "evidence": pa.float64(),
        "grid_lines": pa.int32(),
        "step_lines": pa.int32(),
    }
    params: BlockGridParams

    def score_image(self, image: Image.Image) -> dict[str, Any]:
        grey = central_crop(np.asarray(image.convert("L"), dtype=np.float64), self.params.max_side, BLOCK)
        columns = step_lines(grey, self.params)
        rows = step_lines(grey.T, self.params)
        on_grid, total = columns[0] + rows[0], columns[1] + rows[1]
        evidence = grid_evidence(on_grid, total)
        return {"score": -max(evidence - self.params.tolerance, 0.0), "evidence": evidence,
                "grid_lines": on_grid, "step_lines": total}
