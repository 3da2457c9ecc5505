"""Selection settings derived from the probes: stage-1 family weights, the image cut and the IM cut.

All three read the run's probe table (:mod:`visa.probes.run`) and the fusion report of the pool, so
a probe row is scored exactly as a pool row would be:

* **Visual family weights.** Each image-ladder probe gets, per visual family, its fused value (the
  pool's standardisation and agent weights, :func:`visa.fusion.apply_fusion`) placed on the pool's
  scale: the mid-rank share of the pool's unique images that score lower. These percentiles are
  the players' values in the probe game (:mod:`visa.probes.value`), whose Shapley weights become the
  families' weights in the visual score (unless the user gives ``visual_weights``). Besides the pairs
  within each ladder, the game has every source above every degraded copy (``DEGRADED_KINDS``: all
  rungs but the crops) of the *other* images: stage 1 ranks images against each other, so a family
  whose values shift from image to image orders its own ladders better than it orders the pool.
* **Image cut.** The probes' visual scores (same weights) split into the sources (tier 0) and the
  rungs with almost no information left (``POOR_KINDS``: 20-px thumbnail, heavy blur, flat, noise).
  The cut is the visual score that best separates them (Youden's J: the largest share of sources
  kept minus share of poor rungs kept; the midpoint between two neighbouring probe scores, the
  lower one on ties), lowered if needed to the 90th percentile of the poor rungs. The sources are
  drawn from the pool, so when the pool holds degraded images some sources are degraded too, and
  Youden's J alone then cuts into the clean images; the 90th percentile of what is known to be
  information-poor bounds the cut from above. Pool images below it look like degraded copies.
* **IM cut.** The fused IM of every sample probe on its own image (tier 0) against the same
  conversation on another pool image or a flat image (tier 1), split the same way: a pool sample
  whose fused IM is below the cut depends on its image no more than a conversation on the wrong
  image typically does; it is bounded by the 90th percentile of the wrong-image probes in the same
  way. The cut is in the fused IM's unit (z-scores of the pool's calibration).

Each returns None with a reason when the probes cannot support it (too few rows, no separation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from visa.fusion import apply_fusion, renormalised_sum
from visa.probes.ladder import DEGRADED_KINDS
from visa.probes.run import PLACEMENT, VISUAL
from visa.probes.value import ladder_pairs, probe_weights

#: Image-ladder rungs with (almost) no information left: what the image cut compares sources with.
POOR_KINDS = ("downscale_tiny", "blur", "flat", "noise")
#: A probe cut is never higher than this quantile of the information-poor probes.
POOR_QUANTILE = 0.9


@dataclass
class Cut:
    """A threshold that separates probe rows that carry information from rows that do not."""

    threshold: float
    kept_sources: float  # share of tier-0 probes at or above the threshold
    kept_poor: float  # share of information-poor probes at or above the threshold
    sources: int
    poor: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "threshold": round(float(self.threshold), 6),
            "kept_sources": round(self.kept_sources, 4),
            "kept_poor": round(self.kept_poor, 4),
            "sources": self.sources,
            "poor": self.poor,
        }


@dataclass
class VisualCalibration:
    """Stage-1 settings from the image probes: family weights (with their probe report) and a cut."""

    weights: dict[str, float] | None
    report: dict[str, Any] = field(default_factory=dict)
    cut: Cut | None = None
    notes: list[str] = field(default_factory=list)


def youden_cut(good: np.ndarray, poor: np.ndarray, poor_quantile: float = POOR_QUANTILE) -> Cut | None:
    """The threshold maximising (share of ``good`` >= t) - (share of ``poor`` >= t), lowered when
    needed to the ``poor_quantile`` quantile of ``poor``; None if the best J <= 0."""
    good = good[~np.isnan(good)]
    poor = poor[~np.isnan(poor)]
    if good.size == 0 or poor.size == 0:
        return None
    values = np.unique(np.concatenate([good, poor]))
    candidates = np.concatenate([[values[0]], (values[1:] + values[:-1]) / 2.0]) if values.size > 1 else values
    kept_good = (good[None, :] >= candidates[:, None]).mean(axis=1)
    kept_poor = (poor[None, :] >= candidates[:, None]).mean(axis=1)
    j = kept_good - kept_poor
    best = int(np.argmax(j))  # first maximum = the lowest threshold among ties
    if j[best] <= 0:
        return None
    threshold = min(float(candidates[best]), float(np.quantile(poor, poor_quantile, method="higher")))
    kept = float((good >= threshold).mean())
    return Cut(threshold, kept, float((poor >= threshold).mean()), good.size, poor.size)


def pool_percentile(values: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """Mid-rank share of ``pool`` values below each of ``values`` (NaN stays NaN), as in the visual score."""
    ordered = np.sort(pool[~np.isnan(pool)])
    out = np.full(values.shape, np.nan)
    if ordered.size == 0:
        return out
    present = ~np.isnan(values)
    below = np.searchsorted(ordered, values[present], side="left")
    upto = np.searchsorted(ordered, values[present], side="right")
    out[present] = (below + upto) / (2.0 * ordered.size)
    return out


def _rows(probes: pa.Table, target: str) -> pa.Table:
    return probes.filter(pc.equal(probes.column("target"), target))


def calibrate_visual(
    probes: pa.Table | None,
    shapley: Mapping[str, Any],
    pool_values: Mapping[str, np.ndarray],
    user_weights: Mapping[str, float] | None,
    *,
    seed: int = 0,
    bootstrap: int = 200,
) -> VisualCalibration:
    """Family weights (unless ``user_weights``) and the image cut from the image probes.

    ``pool_values``: per visual family, its fused value on each unique pool image.
    """
    if probes is None:
        return VisualCalibration(None, notes=["this run has no probes"])
    rows = _rows(probes, VISUAL)
    families = [f for f in pool_values if f in shapley]
    if rows.num_rows == 0 or not families:
        return VisualCalibration(None, notes=["no image probes for the visual families"])
    columns = [pool_percentile(apply_fusion(rows, shapley[f]), pool_values[f]) for f in families]
    tiers = rows.column("tier").to_numpy()
    kinds = np.asarray(rows.column("kind").to_pylist(), dtype=object)
    result = VisualCalibration(None)
    if user_weights:
        weights = {f: float(w) for f, w in user_weights.items() if f in families}
    else:
        # every pair counts once here (not balanced per poorer rung as for the agents of a family):
        # measured on the photo pools of BENCHMARKS.md "Noise benchmark, probes", balanced family
        # weights let more thumbnails and blurred copies through the cut (s0 at 25%: noise 0.200, not 0.133).
        # Stage 1 ranks images against each other, so a family is also valued on every source
        # against the degraded copies of the other images (same benchmark: fused visual AUROC up on
        # every seed, the selection unchanged)
        pairs = ladder_pairs(
            rows.column("ladder").to_numpy(), tiers, rows.column("chain").to_pylist(), balanced=False,
            across=np.isin(kinds, DEGRADED_KINDS),
        )
        report = probe_weights(np.column_stack(columns), pairs, families, bootstrap=bootstrap, seed=seed)
        weights = {f: float(report["weights"][f]) for f in families}
        result.weights, result.report = weights, report
        result.notes.extend(report["warnings"])
    visual = renormalised_sum([columns[families.index(f)] for f in weights], list(weights.values()))
    poor = np.isin(kinds, POOR_KINDS)
    result.cut = youden_cut(visual[tiers == 0], visual[poor])
    if result.cut is None:
        result.notes.append("the visual score does not separate the image probes from their degraded copies")
    return result


def calibrate_im(probes: pa.Table | None, im_report: Mapping[str, Any] | None) -> tuple[Cut | None, str | None]:
    """The fused-IM cut from the IM probes (own image vs other / flat image), or (None, why not)."""
    if probes is None:
        return None, "this run has no probes"
    if not im_report:
        return None, "no IM fusion report"
    rows = _rows(probes, PLACEMENT)
    if rows.num_rows == 0:
        return None, "no IM probes in this run"
    fused = apply_fusion(rows, im_report)
    tiers = rows.column("tier").to_numpy()
    cut = youden_cut(fused[tiers == 0], fused[tiers > 0])
    return cut, None if cut is not None else "IM does not separate the probes on their own image from the others"


def budget_floor(visual: np.ndarray, image_samples: np.ndarray, budget: int | None) -> int:
    """How many of the best images (by ``visual``, descending) it takes for their samples to reach ``budget``."""
    if budget is None or budget <= 0:
        return 0
    order = np.argsort(np.where(np.isnan(visual), np.inf, -visual), kind="stable")  # NaN last
    reached = np.flatnonzero(np.cumsum(image_samples[order]) >= budget)
    return int(reached[0]) + 1 if reached.size else int(visual.size)


def images_above(visual: np.ndarray, cut: Cut) -> int:
    """How many images have a visual score at or above the cut."""
    return int(np.sum(np.where(np.isnan(visual), -np.inf, visual) >= cut.threshold))


def weights_or_equal(weights: Mapping[str, float] | None, families: Sequence[str]) -> dict[str, float]:
    return dict(weights) if weights else {f: 1.0 for f in families}
