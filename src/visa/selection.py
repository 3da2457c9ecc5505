"""Model-free, two-stage ViSA selection over a finished run (``RUN_DIR/scores.parquet`` + ``run.json``).

Re-selecting never runs a model: it reads the score table, fuses each score family's agents with
Shapley weights (:mod:`visa.fusion`), then applies the stages below in order. Every row that is not
selected gets exactly one ``reason``: the first stage that removed it.

``error``
    Rows with an ``error_kind`` are never selected.
``text_only``
    Only with ``text_only="drop"``. By default text-only samples (no ``image_key``) bypass the image
    stage: they have no visual score and compete in the instruction stage on IM/PT alone.
``image_below_cut`` (stage 1, images)
    The visual score of a unique image is the weighted mean of the percentile ranks, over unique
    images, of the fused visual families (default ``sc``, ``oa``, ``dp`` with equal weights; a missing
    family is skipped and the weights renormalised; an image with no visual value at all ranks last).
    Images are ordered by visual score (ties: the image's first row), the top ``image_keep`` fraction
    (rounded half up) is kept, and samples on the other images are dropped. Skipped when no visual
    family exists.
``im_nonpositive`` (stage 2, instructions)
    Samples whose IM is ``<= im_min`` (default 0: the image does not help predict the answer). The
    threshold applies to the Shapley-weighted mean of the **raw** IM agents (fused scores are
    z-scores, whose zero is the calibration mean), so it is meaningful when the IM agents share a
    unit, as the reference's MLLM cross-entropy differences do. A null IM is not dropped here.
``pt_tail``
    The ``pt_tail`` fraction (default 2%) of error-free rows with the highest fused PT (rounded half
    up; ties: lower row first), i.e. the garbled-text tail, measured over the whole pool so the cut
    does not depend on the other stages.
``duplicate``
    With ``dedupe`` (default on) a sample whose image set and conversation both repeat a
    better-ranked sample; this needs a ``text_hash`` column in the score table and is skipped (with
    a note) without one. With ``max_per_image = k``, samples ranked below the k best on the same
    image. Images reused by many different instructions (LLaVA) are kept by default.
``quota`` / ``budget``
    The survivors are ranked by the instruction score (percentile of fused IM over the pool, blended
    ``(1 - pt_blend) * pct(IM) + pt_blend * pct(PT)``; without IM or PT, by visual score; nulls last;
    ties by row) and the first ``budget`` are taken. With ``quota_field`` the budget is shared
    between the values of that column (see :func:`_quota_take`). A survivor that quotas push out of
    the budget gets ``quota``; one ranked beyond the budget gets ``budget``.

Outputs (all deterministic: same inputs and options give byte-identical files):
``selection.parquet`` (``row, sample_id, selected, rank, visual_score, instruction_score, reason``),
the selected records in the input's own format (``selected.json`` / ``.jsonl`` / ``.parquet`` /
``selected/``), ``dataset_info.json`` (a LLaMA-Factory entry), and ``shapley`` + ``selection``
sections merged into ``run.json``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from visa.fusion import (
    DEFAULT_PERMUTATIONS,
    IMAGE_FAMILIES,
    NOT_SCORES,
    FusionError,
    fuse_scores,
    image_codes,
    renormalised_sum,
    score_families,
    unique_image_rows,
    weighted_raw,
)

if TYPE_CHECKING:
    from visa.readers import Input

REASONS = (
    "error",
    "text_only",
    "image_below_cut",
    "im_nonpositive",
    "pt_tail",
    "duplicate",
    "quota",
    "budget",
)
_CODE = {name: i + 1 for i, name in enumerate(REASONS)}
VISUAL_FAMILIES = ("sc", "oa", "dp")
IM_FAMILY = "im"
PT_FAMILY = "pt"
TEXT_HASH = "text_hash"
SELECTION_FILE = "selection.parquet"
DATASET_INFO_FILE = "dataset_info.json"
DATASET_NAME = "visa_selected"


#: Strings that switch an optional setting off (``--budget all``, ``--im-min off``).
OFF = frozenset({"off", "none", "all"})


class SelectionError(ValueError):
    """Selection cannot run on this run folder or with these options; the message is one clear line."""


def parse_weights(text: str) -> dict[str, float]:
    """``"sc=1,oa=1,dp=2"`` -> ``{"sc": 1.0, "oa": 1.0, "dp": 2.0}`` (a ValueError names the bad part)."""
    weights: dict[str, float] = {}
    for part in text.split(","):
        name, sep, number = part.partition("=")
        name = name.strip()
        try:
            if not sep or not name:
                raise ValueError
            weights[name] = float(number)
        except ValueError:
            raise ValueError(
                f"visual weights must look like 'sc=1,oa=1,dp=2', not {part.strip()!r}"
            ) from None
    return weights


class SelectionOptions(BaseModel):
    """Every knob of the selection; also the shape of a recipe's ``selection:`` section."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    budget: int | str | None = Field(
        None,
        description="samples to keep: a count (80000) or a percentage of all input records ('2.5%'); "
        "None keeps every sample that passes the filters",
    )
    image_keep: float = Field(0.5, gt=0, le=1, description="fraction of unique images kept in stage 1")
    visual_weights: dict[str, float] | None = Field(
        None,
        description="weights of the fused image-level families in the visual score; default equal sc/oa/dp",
    )
    text_only: Literal["keep", "drop"] = Field(
        "keep", description="text-only samples bypass the image stage ('keep') or are dropped"
    )
    im_min: float | None = Field(0.0, description="drop samples with raw IM <= im_min; None disables")
    pt_tail: float = Field(0.02, ge=0, lt=1, description="drop this top fraction of PT (garbled text)")
    pt_blend: float = Field(0.0, ge=0, le=1, description="weight of PT's percentile in the instruction score")
    quota_field: str | None = Field(
        None, description="column whose values share the budget, e.g. meta.source"
    )
    quota_mode: Literal["proportional", "capped"] = Field(
        "proportional",
        description="proportional: each value gets its share of the pool; capped: none exceeds quota_max_share",
    )
    quota_min: int = Field(
        1, ge=0, description="every value keeps at least this many samples (when it has them)"
    )
    quota_max_share: float = Field(
        0.5, gt=0, le=1, description="capped mode: max share of the budget per value"
    )
    dedupe: bool = Field(
        True, description="drop samples whose image set and conversation repeat a better one"
    )
    max_per_image: int | None = Field(None, ge=1, description="keep at most this many samples per image")
    calibration_size: int = Field(
        1000, ge=2, description="Shapley calibration rows (unique images for image scores)"
    )
    seed: int = Field(0, description="seed of the calibration sample and of Monte Carlo Shapley")
    permutations: int = Field(
        DEFAULT_PERMUTATIONS, ge=2, description="Monte Carlo permutations beyond 12 agents"
    )

    @field_validator("budget", mode="before")
    @classmethod
    def _budget(cls, value: Any) -> int | str | None:
        if value is None or (isinstance(value, int) and not isinstance(value, bool)):
            if isinstance(value, int) and value < 0:
                raise ValueError("budget must be a non-negative count or a percentage like '2.5%'")
            return value
        if isinstance(value, str):
            text = value.strip()
            if text.lower() in OFF:
                return None
            if text.endswith("%"):
                try:
                    pct = Decimal(text[:-1].strip())
                except InvalidOperation:
                    raise ValueError(f"budget '{value}' is not a percentage like '2.5%'") from None
                if not pct.is_finite() or pct < 0 or pct > 100:
                    raise ValueError(f"budget '{value}' must be between 0% and 100%")
                return f"{pct.normalize():f}%"
            if text.isdigit():
                return int(text)
        raise ValueError(f"budget must be a count (80000) or a percentage ('2.5%'), not {value!r}")

    @field_validator("im_min", "max_per_image", mode="before")
    @classmethod
    def _off(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value.strip().lower() in OFF else value

    @field_validator("visual_weights", mode="before")
    @classmethod
    def _weights_text(cls, value: Any) -> Any:
        return parse_weights(value) if isinstance(value, str) else value

    @field_validator("visual_weights")
    @classmethod
    def _weights(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("visual_weights is empty; omit it for equal sc/oa/dp weights")
        for name, weight in value.items():
            if not (weight >= 0 and math.isfinite(weight)):
                raise ValueError(f"visual weight of '{name}' must be a finite number >= 0")
        if not any(w > 0 for w in value.values()):
            raise ValueError("at least one visual weight must be > 0")
        return dict(value)

    @model_validator(mode="after")
    def _quota_needs_budget(self) -> SelectionOptions:
        if self.quota_field is not None and self.budget is None:
            raise ValueError("quota_field needs a budget: quotas share a budget between groups")
        return self

    def budget_rows(self, pool: int) -> int | None:
        """The budget as a row count for a pool of ``pool`` records (percentages round half up)."""
        if self.budget is None:
            return None
        if isinstance(self.budget, int):
            return self.budget
        pct = Decimal(self.budget[:-1])
        return int((pct * pool / 100).quantize(Decimal(1), rounding=ROUND_HALF_UP))


@dataclass
class SelectionResult:
    """What :func:`select` produced. ``summary`` is what went into run.json under ``selection``."""

    table: pa.Table
    summary: dict[str, Any]
    shapley: dict[str, Any]
    selected_rows: np.ndarray
    selection_path: Path | None = None
    subset_path: Path | None = None
    dataset_info_path: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Vectorised helpers
# ---------------------------------------------------------------------------------------------
def percentile_ranks(values: np.ndarray) -> np.ndarray:
    """Mid-rank percentiles in (0, 1) of the non-NaN values (ties share their mean rank); NaN stays NaN."""
    out = np.full(values.shape, np.nan)
    present = np.flatnonzero(~np.isnan(values))
    m = present.size
    if m == 0:
        return out
    v = values[present]
    order = np.argsort(v)  # not stable: tied values get their run's mean rank below
    s = v[order]
    new = np.empty(m, dtype=bool)
    new[0] = True
    np.not_equal(s[1:], s[:-1], out=new[1:])
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], m)
    mid = (starts + ends) / (2.0 * m)  # (mean 0-based rank of the run + 0.5) / m
    ranks = np.empty(m)
    ranks[order] = mid[np.cumsum(new) - 1]
    out[present] = ranks
    return out


def rank_within_groups(groups: np.ndarray) -> np.ndarray:
    """0-based position of every element among the elements of its group, in array order."""
    n = groups.size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    top = int(groups.max())
    narrow = np.int16 if top < 2**15 else (np.int32 if top < 2**31 else np.int64)  # small ints sort by radix
    order = np.argsort(groups.astype(narrow, copy=False), kind="stable")
    g = groups[order]
    new = np.empty(n, dtype=bool)
    new[0] = True
    np.not_equal(g[1:], g[:-1], out=new[1:])
    starts = np.flatnonzero(new)
    run_start = starts[np.cumsum(new) - 1]
    out = np.empty(n, dtype=np.int64)
    out[order] = np.arange(n) - run_start
    return out


def _descending(primary: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Order by ``primary`` descending (NaN last), ties by ``rows`` ascending."""
    key = np.where(np.isnan(primary), np.inf, -primary)
    if rows.size < 2 or bool(np.all(rows[1:] > rows[:-1])):
        return np.argsort(key, kind="stable")  # rows already ascending: a stable sort breaks ties by row
    return np.lexsort((rows, key))


def _top(primary: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` largest ``primary`` values (NaN smallest; ties: lower row first), unordered."""
    n = primary.size
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k >= n:
        return np.arange(n)
    key = np.where(np.isnan(primary), -np.inf, primary)
    threshold = np.partition(key, n - k)[n - k]  # the k-th largest value
    above = np.flatnonzero(key > threshold)
    ties = np.flatnonzero(key == threshold)
    ties = ties[np.argsort(rows[ties], kind="stable")[: k - above.size]]
    return np.concatenate([above, ties])


def _half_up(x: float) -> int:
    return math.floor(x + 0.5 + 1e-9)


def _codes(column: pa.ChunkedArray) -> tuple[np.ndarray, list[Any]]:
    """Integer codes (first-appearance order) and the distinct values; null gets the last code."""
    encoded = pc.dictionary_encode(column).combine_chunks()
    values = encoded.dictionary.to_pylist()
    codes = np.asarray(encoded.indices.fill_null(len(values)).to_numpy(zero_copy_only=False), dtype=np.int64)
    if encoded.null_count:
        values.append(None)
    return codes, values


def _quota_take(
    groups: np.ndarray,
    n_groups: int,
    pool_counts: np.ndarray,
    budget: int,
    options: SelectionOptions,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Which of the ranked survivors (best first, group code per survivor) fill the budget.

    Every group first gets its ``quota_min`` best survivors (protected). Then:

    * ``proportional``: a group's target is its share of the error-free pool times the budget
      (largest-remainder rounding), capped at what survived; survivors within their group's target
      come next, and slots that short groups leave free go to the best remaining survivors of any
      group, so the budget is filled whenever enough survivors exist.
    * ``capped``: survivors are taken in rank order, but no group takes more than
      ``max(quota_min, ceil(quota_max_share * budget))``; the cap is hard, so the budget may be
      under-filled when few groups survive.

    When the protected survivors alone exceed the budget, the best-ranked of them are taken.
    Returns a boolean mask over the survivors and the per-group targets/caps.
    """
    pos = np.arange(groups.size)
    within = rank_within_groups(groups)
    protected = within < options.quota_min
    available = np.bincount(groups, minlength=n_groups)
    if options.quota_mode == "proportional":
        total = pool_counts.sum()
        exact = budget * pool_counts / total if total else np.zeros(n_groups)
        target = np.floor(exact).astype(np.int64)
        short = budget - int(target.sum())
        if short > 0:
            by_remainder = np.lexsort((np.arange(n_groups), -(exact - target)))
            target[by_remainder[:short]] += 1
        tier = np.where(protected, 0, np.where(within < np.minimum(target, available)[groups], 1, 2))
        allowed = np.ones(groups.size, dtype=bool)
        limits = {"target": target}
    else:
        cap = max(options.quota_min, math.ceil(options.quota_max_share * budget))
        tier = np.where(protected, 0, 1)
        allowed = within < cap
        limits = {"cap": np.full(n_groups, cap)}
    candidates = np.flatnonzero(allowed)
    order = candidates[np.lexsort((pos[candidates], tier[candidates]))]
    take = np.zeros(groups.size, dtype=bool)
    take[order[:budget]] = True
    return take, limits


# ---------------------------------------------------------------------------------------------
# The selection over a fused table
# ---------------------------------------------------------------------------------------------
def select_table(
    table: pa.Table,
    options: SelectionOptions,
    *,
    units: Mapping[str, str] | None = None,
    shapley: Mapping[str, Any] | None = None,
    codes: np.ndarray | None = None,
) -> tuple[pa.Table, dict[str, Any]]:
    """Run the selection stages over a score table that already has fused family columns.

    ``units`` maps families to "image"/"sample" (default: sc/oa/dp image-level); ``shapley`` is the
    fusion report (its IM weights turn the raw IM agents into the value ``im_min`` applies to).
    Returns the selection table (one row per input row, in table order) and the summary.
    """
    n = table.num_rows
    names = set(table.column_names)
    for required in ("row", "sample_id"):
        if required not in names:
            raise SelectionError(f"the score table has no '{required}' column")
    rows = np.asarray(table.column("row").cast(pa.int64()).to_numpy(), dtype=np.int64)
    error = (
        np.asarray(pc.is_valid(table.column("error_kind")).to_numpy(zero_copy_only=False), dtype=bool)
        if "error_kind" in names
        else np.zeros(n, dtype=bool)
    )
    valid = ~error
    if codes is None:
        codes = image_codes(table) if "image_key" in names else np.full(n, -1, dtype=np.int64)
    has_image = codes >= 0
    notes: list[str] = []
    reason = np.zeros(n, dtype=np.int8)
    reason[error] = _CODE["error"]
    units = dict(units or {})

    def fused(family: str) -> np.ndarray | None:
        if family not in names:
            return None
        return np.asarray(table.column(family).cast(pa.float64()).to_numpy(), dtype=np.float64)

    # -- stage 1: images ------------------------------------------------------------------------
    requested = options.visual_weights or {f: 1.0 for f in VISUAL_FAMILIES}
    visual_weights = {f: float(w) for f, w in requested.items() if w > 0 and f in names}
    absent = [f for f, w in requested.items() if w > 0 and f not in names]
    if absent:
        notes.append(f"visual families not in the scores, skipped: {', '.join(absent)}")
    sample_level = [
        f for f in visual_weights if units.get(f, "image" if f in IMAGE_FAMILIES else "sample") != "image"
    ]
    if sample_level:
        raise SelectionError(
            f"visual score families must be image-level; {', '.join(sample_level)} are scored per sample"
        )
    visual_row = np.full(n, np.nan)
    image_rows = unique_image_rows(table, valid, codes)
    n_images = int(image_rows.size)
    kept_images = n_images
    if visual_weights and n_images:
        visual_image = renormalised_sum(
            [percentile_ranks(fused(family)[image_rows]) for family in visual_weights],
            list(visual_weights.values()),
        )
        n_codes = int(codes.max()) + 1
        by_code = np.full(n_codes, np.nan)
        by_code[codes[image_rows]] = visual_image
        visual_row[has_image] = by_code[codes[has_image]]
        kept_images = _half_up(options.image_keep * n_images)
        keep_code = np.zeros(n_codes, dtype=bool)
        keep_code[codes[image_rows[_top(visual_image, rows[image_rows], kept_images)]]] = True
        below = valid & has_image & ~keep_code[np.maximum(codes, 0)]
        reason[below & (reason == 0)] = _CODE["image_below_cut"]
    elif not visual_weights:
        notes.append("no visual score family: the image stage is skipped")
    if options.text_only == "drop":
        reason[valid & ~has_image & (reason == 0)] = _CODE["text_only"]

    # -- stage 2: instructions --------------------------------------------------------------------
    im = fused(IM_FAMILY)
    pt = fused(PT_FAMILY)
    im_raw = None
    if im is not None and options.im_min is not None:
        im_raw = _raw_im(table, shapley)
        drop = (reason == 0) & (im_raw <= options.im_min)
        reason[drop] = _CODE["im_nonpositive"]
    elif im is None:
        notes.append("no IM scores: the IM filter is skipped and samples are ranked by visual score")
    pt_dropped_cut = None
    if pt is not None and options.pt_tail > 0:
        scored = np.flatnonzero(valid & ~np.isnan(pt))
        k = _half_up(options.pt_tail * scored.size)
        if k:
            tail = scored[_top(pt[scored], rows[scored], k)]
            pt_dropped_cut = float(pt[tail].min())
            hit = np.zeros(n, dtype=bool)
            hit[tail] = True
            reason[hit & (reason == 0)] = _CODE["pt_tail"]
    elif pt is None and options.pt_tail > 0:
        notes.append("no PT scores: the PT tail filter is skipped")

    instruction = np.full(n, np.nan)
    parts = []
    if im is not None and options.pt_blend < 1:
        parts.append((1.0 - options.pt_blend, percentile_ranks(np.where(valid, im, np.nan))))
    if pt is not None and options.pt_blend > 0:
        parts.append((options.pt_blend, percentile_ranks(np.where(valid, pt, np.nan))))
    if parts:
        instruction = renormalised_sum([p for _, p in parts], [w for w, _ in parts])
        primary = instruction
    else:
        primary = visual_row

    alive = np.flatnonzero(reason == 0)
    ranked = alive[_descending(primary[alive], rows[alive])]

    # -- duplicates -----------------------------------------------------------------------------
    if options.dedupe:
        if TEXT_HASH in names:
            text_codes, text_values = _codes(table.column(TEXT_HASH).take(pa.array(ranked)))
            null_code = len(text_values) - 1 if text_values and text_values[-1] is None else -1
            hashed = text_codes != null_code  # a sample without a text hash is never a duplicate
            key = (codes[ranked] + 1) * (len(text_values) + 1) + text_codes
            _, first = np.unique(key[hashed], return_index=True)
            duplicate = hashed.copy()
            duplicate[np.flatnonzero(hashed)[first]] = False
            reason[ranked[duplicate]] = _CODE["duplicate"]
            ranked = ranked[~duplicate]
        else:
            notes.append(f"dedupe skipped: the score table has no '{TEXT_HASH}' column")
    if options.max_per_image is not None and ranked.size:
        over = (rank_within_groups(codes[ranked]) >= options.max_per_image) & (codes[ranked] >= 0)
        reason[ranked[over]] = _CODE["duplicate"]
        ranked = ranked[~over]

    # -- budget and quotas ------------------------------------------------------------------------
    budget = options.budget_rows(n)
    quota_report: dict[str, Any] | None = None
    if budget is None:
        chosen = ranked
    elif options.quota_field is None:
        chosen = ranked[:budget]
        reason[ranked[budget:]] = _CODE["budget"]
    else:
        if options.quota_field not in names:
            from visa.registry import did_you_mean

            raise SelectionError(
                f"quota field '{options.quota_field}' is not a column of the score table"
                f"{did_you_mean(options.quota_field, [c for c in names if c.startswith('meta.')])}"
            )
        try:
            group_codes, group_values = _codes(table.column(options.quota_field))
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
            raise SelectionError(
                f"quota field '{options.quota_field}' must be a column of scalar values"
            ) from None
        n_groups = len(group_values)
        pool_counts = np.bincount(group_codes[valid], minlength=n_groups)
        take, limits = _quota_take(group_codes[ranked], n_groups, pool_counts, budget, options)
        chosen = ranked[take]
        lost = ~take
        beyond = np.arange(ranked.size) >= budget
        reason[ranked[lost & ~beyond]] = _CODE["quota"]
        reason[ranked[lost & beyond]] = _CODE["budget"]
        selected_per_group = np.bincount(group_codes[chosen], minlength=n_groups)
        survived = np.bincount(group_codes[ranked], minlength=n_groups)
        limit_name, limit = next(iter(limits.items()))
        quota_report = {
            "field": options.quota_field,
            "mode": options.quota_mode,
            "groups": {
                _label(group_values[g]): {
                    "pool": int(pool_counts[g]),
                    "survived_filters": int(survived[g]),
                    limit_name: int(limit[g]),
                    "selected": int(selected_per_group[g]),
                }
                for g in range(n_groups)
            },
        }

    selected = np.zeros(n, dtype=bool)
    selected[chosen] = True
    rank = np.zeros(n, dtype=np.int64)
    rank[chosen] = np.arange(1, chosen.size + 1)  # ``chosen`` is in rank order: 1 = best
    reason_names = pa.array(REASONS, pa.string())
    reason_index = pa.array(reason.astype(np.int32) - 1, mask=selected)
    out = pa.table(
        {
            "row": pa.array(rows, pa.int64()),
            "sample_id": table.column("sample_id").cast(pa.string()),
            "selected": pa.array(selected),
            "rank": pa.array(rank, pa.int64(), mask=~selected),
            "visual_score": pa.array(visual_row, pa.float64(), mask=np.isnan(visual_row)),
            "instruction_score": pa.array(instruction, pa.float64(), mask=np.isnan(instruction)),
            "reason": pc.take(reason_names, reason_index),
        }
    )
    counts = np.bincount(reason, minlength=len(REASONS) + 1)
    summary: dict[str, Any] = {
        "pool": n,
        "budget": options.budget,
        "budget_rows": budget,
        "selected": int(selected.sum()),
        "dropped": {name: int(counts[_CODE[name]]) for name in REASONS},
        "images": {"unique": n_images, "kept": kept_images if visual_weights else n_images},
        "text_only_rows": int((valid & ~has_image).sum()),
        "visual_weights": visual_weights,
        "ranked_by": "instruction_score" if parts else ("visual_score" if visual_weights else "row"),
        "pt_cut": pt_dropped_cut,
        "options": options.model_dump(mode="json"),
    }
    if budget is not None and summary["selected"] < budget:
        notes.append(f"budget under-filled: {summary['selected']} of {budget} (not enough samples passed)")
    if quota_report is not None:
        summary["quota"] = quota_report
    summary["notes"] = notes
    return out, summary


def _label(value: Any) -> str:
    return "<null>" if value is None else str(value)


def _raw_im(table: pa.Table, shapley: Mapping[str, Any] | None) -> np.ndarray:
    """IM in the agents' own unit: Shapley-weighted mean of the raw IM agents (equal weights when
    no fusion report is given; the fused column itself when there are no agent columns)."""
    report = (shapley or {}).get(IM_FAMILY)
    if report is None:
        agents = score_families(table.schema).get(IM_FAMILY, [])
        if not agents:
            return np.asarray(table.column(IM_FAMILY).cast(pa.float64()).to_numpy(), dtype=np.float64)
        report = {"weights": {a: 1.0 for a in agents}}
    return weighted_raw(table, report)


# ---------------------------------------------------------------------------------------------
# The run folder
# ---------------------------------------------------------------------------------------------
def read_run(run_dir: Path | str) -> dict[str, Any]:
    """``RUN_DIR/run.json`` as a dict, or a SelectionError saying what is wrong with it."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise SelectionError(f"{run_dir} is not a finished run folder: no run.json")
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise SelectionError(f"{path} is not readable JSON: {err}") from None
    if not isinstance(run, dict):
        raise SelectionError(f"{path} must hold a JSON object")
    return run


def resolve_options(run: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> SelectionOptions:
    """Options from the run's recipe ``selection:`` section (if any), with ``overrides`` on top.

    Overrides whose value is None are ignored, so CLI options that were not given keep the recipe's
    (or the default) value. Raises SelectionError with one line for invalid options.
    """
    from pydantic import ValidationError

    recipe = run.get("recipe") if isinstance(run.get("recipe"), Mapping) else {}
    base = recipe.get("selection") or {}
    if not isinstance(base, Mapping):
        raise SelectionError("the recipe's 'selection' section must be a mapping")
    merged = {**base, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    try:
        return SelectionOptions.model_validate(merged)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise SelectionError(f"selection option {where}: {first['msg']}" if where else first["msg"]) from None


def run_families(run: Mapping[str, Any], schema: pa.Schema) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Score families (agent columns present in the table) and their units, from run.json's agents.

    Falls back to the column names (``<family>.<agent>``) when run.json lists no agents.
    """
    present = {f.name: f.type for f in schema}
    families: dict[str, list[str]] = {}
    units: dict[str, str] = {}
    agents = run.get("agents")
    if isinstance(agents, list) and agents:
        for agent in agents:
            if not isinstance(agent, Mapping):
                continue
            column, family = agent.get("column"), agent.get("score")
            if not isinstance(column, str) or not isinstance(family, str) or family in NOT_SCORES:
                continue
            kind = present.get(column)
            if kind is None or not (pa.types.is_floating(kind) or pa.types.is_integer(kind)):
                continue
            families.setdefault(family, []).append(column)
            if agent.get("unit") in ("image", "sample"):
                units.setdefault(family, str(agent["unit"]))
    else:
        families = score_families(schema)
    return families, units


def _read_scores(
    run_dir: Path, run: Mapping[str, Any], options: SelectionOptions
) -> tuple[pa.Table, dict[str, list[str]], dict[str, str]]:
    path = run_dir / "scores.parquet"
    if not path.is_file():
        raise SelectionError(f"{run_dir} is not a finished run folder: no scores.parquet")
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as err:
        raise SelectionError(f"{path} is not a readable Parquet file: {err}") from None
    families, units = run_families(run, schema)
    wanted = ["row", "sample_id", "image_key", "error_kind", TEXT_HASH]
    if options.quota_field:
        wanted.append(options.quota_field)
    for agents in families.values():
        wanted.extend(agents)
    # families with no agent columns but an already fused column (a table fused elsewhere)
    wanted.extend(f for f in (*VISUAL_FAMILIES, IM_FAMILY, PT_FAMILY) if f not in families)
    columns = list(dict.fromkeys(c for c in wanted if c in schema.names))
    table = pq.read_table(path, columns=columns, memory_map=True)
    return table, families, units


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_selection_table(table: pa.Table, path: Path) -> None:
    """Write selection.parquet atomically, with fixed writer options (byte-identical reruns)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(
        table,
        tmp,
        compression="zstd",
        compression_level=1,
        use_dictionary=["reason"],
        write_statistics=True,
    )
    os.replace(tmp, path)


def select(
    run_dir: Path | str,
    options: SelectionOptions | None = None,
    *,
    write_records: bool = True,
    update_run: bool = True,
) -> SelectionResult:
    """Select from a finished run: fuse, run the two stages, write the outputs into ``run_dir``.

    Reads only ``scores.parquet`` and ``run.json`` (plus the input when ``write_records`` copies
    the selected records). Writes ``selection.parquet``; with ``write_records`` the selected
    records in the input's format and ``dataset_info.json``; with ``update_run`` merges
    ``shapley`` and ``selection`` into run.json. Raises SelectionError for a bad run folder or options.
    """
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    options = options or resolve_options(run)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    table, families, units = _read_scores(run_dir, run, options)
    source = open_source(run) if write_records else None  # fail before writing when it cannot be copied
    timings["read"] = time.perf_counter() - started

    t = time.perf_counter()
    codes = image_codes(table) if "image_key" in table.column_names else None
    timings["image_keys"] = time.perf_counter() - t

    t = time.perf_counter()
    try:
        table, shapley = fuse_scores(
            table,
            families,
            units=units,
            calibration_size=options.calibration_size,
            seed=options.seed,
            permutations=options.permutations,
            codes=codes,
        )
    except FusionError as err:
        raise SelectionError(str(err)) from None
    timings["fusion"] = time.perf_counter() - t

    t = time.perf_counter()
    selection, summary = select_table(table, options, units=units, shapley=shapley, codes=codes)
    timings["selection"] = time.perf_counter() - t

    t = time.perf_counter()
    selection_path = run_dir / SELECTION_FILE
    write_selection_table(selection, selection_path)
    timings["write_selection"] = time.perf_counter() - t
    selected_rows = np.sort(
        np.asarray(selection.column("row").to_numpy(), dtype=np.int64)[
            np.asarray(selection.column("selected").to_numpy(zero_copy_only=False), dtype=bool)
        ]
    )
    summary["outputs"] = {"selection": str(selection_path)}

    result = SelectionResult(selection, summary, shapley, selected_rows, selection_path=selection_path)
    if source is not None:
        t = time.perf_counter()
        result.subset_path = write_subset(source, selected_rows, run_dir)
        summary["outputs"]["records"] = str(result.subset_path)
        entry, entry_notes = llamafactory_entry(result.subset_path, run_dir)
        info_path = run_dir / DATASET_INFO_FILE
        _atomic_write_bytes(info_path, (json.dumps(entry, indent=2, ensure_ascii=False) + "\n").encode())
        result.dataset_info_path = info_path
        summary["outputs"]["dataset_info"] = str(info_path)
        image_root = (
            (run.get("input") or {}).get("image_root") if isinstance(run.get("input"), Mapping) else None
        )
        if image_root and "images" in entry[DATASET_NAME]["columns"]:
            entry_notes.append(
                f"image paths are relative to {image_root}: pass it as LLaMA-Factory's media_dir"
            )
        summary["notes"].extend(entry_notes)
        timings["write_records"] = time.perf_counter() - t
    if update_run:
        merged = {**read_run(run_dir), "shapley": shapley, "selection": summary}
        _atomic_write_bytes(
            run_dir / "run.json", (json.dumps(merged, indent=2, ensure_ascii=False) + "\n").encode()
        )
    timings["total"] = time.perf_counter() - started
    result.timings = timings
    return result


def open_source(run: Mapping[str, Any]) -> Input:
    """The run's input, checked to be unchanged since scoring and writable in its format.

    Rows are positions in the input, so copying records from an input rewritten after scoring
    would copy the wrong ones: a fingerprint that differs from run.json's is an error.
    """
    spec = run.get("input")
    if not isinstance(spec, Mapping) or not isinstance(spec.get("path"), str):
        raise SelectionError("run.json has no input.path: cannot write the selected records")
    from visa.readers import InputError, open_input

    try:
        source = open_input(spec["path"])
        recorded = spec.get("fingerprint")
        if isinstance(recorded, str) and recorded != source.fingerprint():
            raise SelectionError(
                f"the input {spec['path']} changed since it was scored (fingerprint differs); "
                "re-score it, or select without writing records"
            )
        source.check_writable()
    except InputError as err:
        raise SelectionError(f"cannot read the input to copy the selected records: {err}") from None
    except (ImportError, OSError) as err:
        raise SelectionError(str(err)) from None
    return source


def write_subset(source: Input, rows: Iterable[int], out_dir: Path) -> Path:
    """Write the input records at ``rows`` (ascending) unchanged, in the input's format, into ``out_dir``."""
    try:
        return source.write_subset((int(r) for r in rows), out_dir)
    except (ImportError, OSError, ValueError) as err:
        raise SelectionError(f"cannot write the selected records: {err}") from None


# ---------------------------------------------------------------------------------------------
# LLaMA-Factory dataset entry
# ---------------------------------------------------------------------------------------------
def _first_record(path: Path) -> dict[str, Any] | None:
    if path.is_dir():  # a datasets save_to_disk folder: Arrow IPC streams
        for file in sorted(path.glob("*.arrow")):
            with pa.memory_map(str(file), "r") as source:
                for batch in pa.ipc.open_stream(source):
                    if batch.num_rows:
                        return batch.slice(0, 1).to_pylist()[0]
        return None
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=1):
            if batch.num_rows:
                return batch.to_pylist()[0]
        return None
    if suffix in (".jsonl", ".ndjson"):
        with path.open("rb") as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    return record if isinstance(record, dict) else None
        return None
    if suffix == ".json":
        import ijson

        with path.open("rb") as f:
            for record in ijson.items(f, "item"):
                return record if isinstance(record, dict) else None
    return None


def llamafactory_entry(subset_path: Path, dataset_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """A LLaMA-Factory ``dataset_info.json`` entry for the written subset, in its own dialect.

    LLaVA records (``conversations`` with ``from``/``value``, ``human``/``gpt``, ``image``) and
    ShareGPT/OpenAI records (``messages`` with ``role``/``content``, ``user``/``assistant``,
    ``images``) map onto LLaMA-Factory's ``sharegpt`` formatting. ``file_name`` is relative to
    ``dataset_dir`` (LLaMA-Factory's ``dataset_dir``). Returns the entry and notes for the user.
    """
    notes: list[str] = []
    try:
        record = _first_record(subset_path)
    except (OSError, ValueError, pa.ArrowException) as err:
        record = None
        notes.append(f"could not read the written subset to detect its dialect ({err}); assumed LLaVA")
    messages_key, role_key, content_key = "conversations", "from", "value"
    user_tag, assistant_tag, system_tag = "human", "gpt", None
    images_key: str | None = "image"
    if record is not None:
        messages_key = next((k for k in ("conversations", "messages") if k in record), messages_key)
        turns = record.get(messages_key) or []
        first = next((t for t in turns if isinstance(t, dict)), {})
        role_key = next((k for k in ("from", "role") if k in first), role_key)
        content_key = next((k for k in ("value", "content") if k in first), content_key)
        roles = {t.get(role_key) for t in turns if isinstance(t, dict)}
        if roles & {"user", "assistant"} and not roles & {"human", "gpt"}:
            user_tag, assistant_tag = "user", "assistant"
        if "system" in roles:
            system_tag = "system"
        images_key = next((k for k in ("image", "images") if record.get(k) is not None), None)
        if any(isinstance(t, dict) and not isinstance(t.get(content_key), str) for t in turns):
            notes.append(
                "some turn contents are not plain strings: LLaMA-Factory's sharegpt format expects text"
            )
    elif subset_path.exists():
        notes.append("the subset is empty; the LLaMA-Factory entry assumes LLaVA fields")
    columns: dict[str, str] = {"messages": messages_key}
    if images_key:
        columns["images"] = images_key
    tags = {
        "role_tag": role_key,
        "content_tag": content_key,
        "user_tag": user_tag,
        "assistant_tag": assistant_tag,
    }
    if system_tag:
        tags["system_tag"] = system_tag
    try:
        file_name = subset_path.relative_to(dataset_dir).as_posix()
    except ValueError:
        file_name = str(subset_path)
    entry = {
        DATASET_NAME: {"file_name": file_name, "formatting": "sharegpt", "columns": columns, "tags": tags}
    }
    return entry, notes
