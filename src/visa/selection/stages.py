"""The selection stages over a fused score table: one function per stage over a small :class:`State`.

:func:`select_table` runs them in the order the package docstring describes (errors, image gate,
typicality cut, image cut, text-only, IM, PT tail, ranking, duplicates, budget and quotas). A stage
only marks rows: a row's ``reason`` is set once, by the first stage that removes it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from visa.families import FAMILIES, IM, PT, VISUAL_FAMILIES, default_unit
from visa.fusion import image_codes, renormalised_sum, score_families, unique_image_rows, weighted_raw
from visa.probes.calibrate import (
    VisualCalibration,
    budget_floor,
    calibrate_im,
    calibrate_visual,
    images_above,
)
from visa.selection.crops import (
    atypical_stage,
    cluster_budget,
    cluster_report,
    cluster_stage,
    im_floor,
    visual_within_clusters,
)
from visa.selection.gate import gate_stage
from visa.selection.options import SelectionError, SelectionOptions
from visa.selection.ranks import codes as value_codes
from visa.selection.ranks import descending, half_up, percentile_ranks, rank_within_groups, top

REASONS = (
    "error",
    "image_gate",
    "atypical",
    "text_only",
    "image_below_cut",
    "im_nonpositive",
    "pt_tail",
    "duplicate",
    "quota",
    "budget",
)
CODE = {name: i + 1 for i, name in enumerate(REASONS)}
#: The score table column that holds a hash of each sample's conversation (for dedupe).
TEXT_HASH = "text_hash"


@dataclass
class State:
    """What the stages share: the table's row facts, each row's reason, and what stages computed."""

    table: pa.Table
    options: SelectionOptions
    units: dict[str, str]
    shapley: Mapping[str, Any] | None
    names: set[str]
    rows: np.ndarray
    valid: np.ndarray
    codes: np.ndarray
    reason: np.ndarray
    notes: list[str] = field(default_factory=list)
    visual_weights: dict[str, float] = field(default_factory=dict)
    visual_row: np.ndarray = field(default_factory=lambda: np.zeros(0))
    n_images: int = 0
    kept_images: int = 0
    instruction: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ranked_by_instruction: bool = False
    pt_cut: float | None = None
    ranked: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    chosen: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    budget: int | None = None
    quota_report: dict[str, Any] | None = None
    #: content clusters (see :mod:`visa.selection.crops`): a group code per row, or None when off
    groups: np.ndarray | None = None
    group_values: list[Any] = field(default_factory=list)
    cluster_column: str | None = None
    cluster_images: np.ndarray | None = None
    cluster_kept_images: np.ndarray | None = None
    cluster_targets: np.ndarray | None = None
    #: the run's cluster centres (run.json ``clusters.centres``) and, when the budget was spread over
    #: merged clusters, the merged group of every cluster (see :func:`visa.selection.crops.cluster_budget`)
    cluster_centres: list[list[float]] | None = None
    cluster_merged: np.ndarray | None = None
    probes: pa.Table | None = None
    calibration: VisualCalibration = field(default_factory=lambda: VisualCalibration(None))
    im_cut: dict[str, Any] | None = None

    @property
    def n(self) -> int:
        return self.table.num_rows

    @property
    def has_image(self) -> np.ndarray:
        return self.codes >= 0

    def fused(self, family: str) -> np.ndarray | None:
        """The family's fused column as float64 (NaN = null), None when the table has none."""
        if family not in self.names:
            return None
        return np.asarray(self.table.column(family).cast(pa.float64()).to_numpy(), dtype=np.float64)

    def drop(self, mask: np.ndarray, reason: str) -> None:
        """Give ``reason`` to the rows of ``mask`` that no earlier stage removed."""
        self.reason[mask & (self.reason == 0)] = CODE[reason]


def initial_state(
    table: pa.Table,
    options: SelectionOptions,
    units: Mapping[str, str] | None,
    shapley: Mapping[str, Any] | None,
    codes: np.ndarray | None,
) -> State:
    """The state before any stage: rows with an ``error_kind`` already carry ``error``."""
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
    if codes is None:
        codes = image_codes(table) if "image_key" in names else np.full(n, -1, dtype=np.int64)
    reason = np.zeros(n, dtype=np.int8)
    reason[error] = CODE["error"]
    return State(
        table=table, options=options, units=dict(units or {}), shapley=shapley, names=names, rows=rows,
        valid=~error, codes=codes, reason=reason, visual_row=np.full(n, np.nan),
        instruction=np.full(n, np.nan),
    )


# ---------------------------------------------------------------------------------------------
# Stage 1: images
# ---------------------------------------------------------------------------------------------
def _check_named_families(state: State) -> None:
    """A family named in ``visual_weights`` must be a visual family or a family of this run (one
    scored per sample is refused later, as not image-level); anything else is a typo
    (SelectionError with a did-you-mean)."""
    known = set(VISUAL_FAMILIES) | {f for f in state.names if f in FAMILIES or f in state.units}
    unknown = sorted(set(state.options.visual_weights or {}) - known)
    if unknown:
        from visa.registry import did_you_mean

        raise SelectionError(
            f"unknown visual family '{unknown[0]}'{did_you_mean(unknown[0], sorted(known))}; "
            f"known: {', '.join(sorted(known))}"
        )


def _visual_weights(state: State) -> dict[str, float]:
    """The requested visual families present in the table, with their weights (> 0): the user's
    (``visual_weights``; families not named keep 1), else the probes' (``value: probes``), else 1 each."""
    _check_named_families(state)
    options = state.options
    requested = options.weights() if options.visual_weights else (state.calibration.weights or options.weights())
    weights = {f: float(w) for f, w in requested.items() if w > 0 and f in state.names}
    absent = [f for f, w in requested.items() if w > 0 and f not in state.names]
    if absent:
        state.notes.append(f"visual families not in the scores, skipped: {', '.join(absent)}")
    sample_level = [f for f in weights if state.units.get(f, default_unit(f)) != "image"]
    if sample_level:
        raise SelectionError(
            f"visual score families must be image-level; {', '.join(sample_level)} are scored per sample"
        )
    return weights


def _calibrate(state: State, image_rows: np.ndarray) -> None:
    """Stage-1 family weights and cut from the image probes (nothing when neither is asked for)."""
    options = state.options
    wants_weights = options.visual_weights is None and options.value == "probes"
    if not (wants_weights or options.image_keep == "probes"):
        return
    requested = options.weights()
    families = [f for f, w in requested.items() if w > 0 and f in state.names]
    if not families:
        return
    pool_values = {f: state.fused(f)[image_rows] for f in families}
    user = None if wants_weights else requested
    state.calibration = calibrate_visual(state.probes, state.shapley or {}, pool_values, user, seed=options.seed)
    state.notes.extend(state.calibration.notes)


def _samples_per_image(state: State, n_codes: int) -> np.ndarray:
    """Samples each image code can contribute to the budget: its rows, or with ``dedupe`` its
    distinct conversations (a repeat on the same image is dropped later), capped by ``max_per_image``."""
    positions = np.flatnonzero(state.valid & state.has_image)
    codes, options = state.codes, state.options
    if options.dedupe and TEXT_HASH in state.names:
        # distinct (image code, conversation) pairs, a null hash distinct from every other row
        text = pc.dictionary_encode(state.table.column(TEXT_HASH).take(pa.array(positions))).combine_chunks()
        ids = np.asarray(text.indices.fill_null(-1).to_numpy(), dtype=np.int64)
        span = len(text.dictionary) + positions.size
        ids = np.where(ids < 0, len(text.dictionary) + np.arange(positions.size), ids)
        pairs = np.unique(codes[positions].astype(np.int64) * span + ids)
        counts = np.bincount(pairs // span, minlength=n_codes)
    else:
        counts = np.bincount(codes[positions], minlength=n_codes)
    if options.max_per_image is not None:
        counts = np.minimum(counts, options.max_per_image)
    return counts


def _kept_images(state: State, visual: np.ndarray, image_codes: np.ndarray, n_codes: int) -> int:
    """How many unique images stage 1 keeps: a fixed fraction, or the probe cut with the budget's
    floor (``image_codes``: the code of each image of ``visual``)."""
    n_images, notes = visual.size, state.notes
    if state.options.image_keep != "probes":
        return half_up(state.options.image_keep * n_images)
    cut = state.calibration.cut
    if cut is None:
        notes.append("no probe cut for the image stage: kept half of the unique images (image_keep 0.5)")
        return half_up(0.5 * n_images)
    above = images_above(visual, cut)
    per_image = _samples_per_image(state, n_codes)[image_codes]
    floor = budget_floor(visual, per_image, state.options.budget_rows(state.n))
    if floor > above:
        notes.append(f"the probe cut keeps {above} of {n_images} images; the budget needs {floor}: kept {floor}")
    kept = min(n_images, max(above, floor))
    if kept == 0:
        notes.append(f"stage 1 keeps no image: all {n_images} score like degraded copies in the probes")
    return kept


def image_stage(state: State) -> None:
    """Keep the unique images at or above the visual cut (the probes' or a fixed fraction); drop the
    rest. With content clusters the images are ranked within their cluster and every cluster keeps
    the same fraction of its images (the share of the pool the cut keeps)."""
    image_rows = unique_image_rows(state.table, state.valid & (state.reason == 0), state.codes)
    _calibrate(state, image_rows)
    state.visual_weights = _visual_weights(state)
    state.n_images = state.kept_images = int(image_rows.size)
    if not state.visual_weights:
        state.notes.append("no visual score family: the image stage is skipped")
        return
    if not state.n_images:
        return
    values = [state.fused(family)[image_rows] for family in state.visual_weights]
    weights = list(state.visual_weights.values())
    codes, has_image = state.codes, state.has_image
    n_codes = int(codes.max()) + 1
    visual_image = renormalised_sum([percentile_ranks(v) for v in values], weights)
    count = _kept_images(state, visual_image, codes[image_rows], n_codes)
    if state.groups is None:
        kept = top(visual_image, state.rows[image_rows], count)
    else:
        visual_image, kept = visual_within_clusters(state, image_rows, values, weights, count / state.n_images)
    by_code = np.full(n_codes, np.nan)
    by_code[codes[image_rows]] = visual_image
    state.visual_row[has_image] = by_code[codes[has_image]]
    state.kept_images = int(kept.size)
    keep_code = np.zeros(n_codes, dtype=bool)
    keep_code[codes[image_rows[kept]]] = True
    state.drop(state.valid & has_image & ~keep_code[np.maximum(codes, 0)], "image_below_cut")


def text_only_stage(state: State) -> None:
    """With ``text_only="drop"``, drop the samples without an image."""
    if state.options.text_only == "drop":
        state.drop(state.valid & ~state.has_image, "text_only")


# ---------------------------------------------------------------------------------------------
# Stage 2: instructions
# ---------------------------------------------------------------------------------------------
def raw_im(table: pa.Table, shapley: Mapping[str, Any] | None) -> np.ndarray:
    """IM in the agents' own unit: Shapley-weighted mean of the raw IM agents (equal weights when
    no fusion report is given; the fused column itself when there are no agent columns)."""
    report = (shapley or {}).get(IM)
    if report is None:
        agents = score_families(table.schema).get(IM, [])
        if not agents:
            return np.asarray(table.column(IM).cast(pa.float64()).to_numpy(), dtype=np.float64)
        report = {"weights": {a: 1.0 for a in agents}}
    return weighted_raw(table, report)


def im_stage(state: State) -> None:
    """Drop samples below the IM cut: calibrated on the IM probes (``im_min: probes``, on the fused
    IM), or raw IM ``<= im_min`` in the agents' own unit. A null IM is not dropped. With clusters,
    rows above each cluster's ``cluster_im_floor`` are spared (see
    :func:`~visa.selection.crops.im_floor`)."""
    if IM not in state.names:
        state.notes.append("no IM scores: the IM filter is skipped and samples are ranked by visual score")
        return
    im_min = state.options.im_min
    if im_min is None:
        return
    if im_min == "probes":
        cut, why = calibrate_im(state.probes, (state.shapley or {}).get(IM))
        if cut is not None:
            state.im_cut = {"unit": "fused im", **cut.as_dict()}
            im = state.fused(IM)
            state.drop((im < cut.threshold) & ~im_floor(state, im), "im_nonpositive")
            return
        state.notes.append(f"no IM probe cut ({why}): dropped samples with raw IM <= 0")
        im_min = 0.0
    im = raw_im(state.table, state.shapley)
    state.drop((im <= float(im_min)) & ~im_floor(state, im), "im_nonpositive")


def pt_tail_stage(state: State) -> None:
    """Drop the ``pt_tail`` fraction of error-free rows with the highest fused PT (the garbled tail)."""
    if state.options.pt_tail <= 0:
        return
    pt = state.fused(PT)
    if pt is None:
        state.notes.append("no PT scores: the PT tail filter is skipped")
        return
    scored = np.flatnonzero(state.valid & ~np.isnan(pt))
    k = half_up(state.options.pt_tail * scored.size)
    if k:
        tail = scored[top(pt[scored], state.rows[scored], k)]
        state.pt_cut = float(pt[tail].min())
        hit = np.zeros(state.n, dtype=bool)
        hit[tail] = True
        state.drop(hit, "pt_tail")


def rank_stage(state: State) -> None:
    """Rank the survivors by instruction score (IM / PT percentiles), else by visual score."""
    options, valid = state.options, state.valid
    im, pt = state.fused(IM), state.fused(PT)
    parts = []
    if im is not None and options.pt_blend < 1:
        parts.append((1.0 - options.pt_blend, percentile_ranks(np.where(valid, im, np.nan))))
    if pt is not None and options.pt_blend > 0:
        parts.append((options.pt_blend, percentile_ranks(np.where(valid, pt, np.nan))))
    if parts:
        state.instruction = renormalised_sum([p for _, p in parts], [w for w, _ in parts])
        state.ranked_by_instruction = True
    primary = state.instruction if parts else state.visual_row
    alive = np.flatnonzero(state.reason == 0)
    state.ranked = alive[descending(primary[alive], state.rows[alive])]


# ---------------------------------------------------------------------------------------------
# Duplicates
# ---------------------------------------------------------------------------------------------
def dedupe_stage(state: State) -> None:
    """Drop a survivor whose image set and conversation repeat a better-ranked one."""
    if not state.options.dedupe:
        return
    if TEXT_HASH not in state.names:
        state.notes.append(f"dedupe skipped: the score table has no '{TEXT_HASH}' column")
        return
    ranked = state.ranked
    text_codes, text_values = value_codes(state.table.column(TEXT_HASH).take(pa.array(ranked)))
    null_code = len(text_values) - 1 if text_values and text_values[-1] is None else -1
    hashed = text_codes != null_code  # a sample without a text hash is never a duplicate
    key = (state.codes[ranked] + 1) * (len(text_values) + 1) + text_codes
    _, first = np.unique(key[hashed], return_index=True)
    duplicate = hashed.copy()
    duplicate[np.flatnonzero(hashed)[first]] = False
    state.reason[ranked[duplicate]] = CODE["duplicate"]
    state.ranked = ranked[~duplicate]


def max_per_image_stage(state: State) -> None:
    """With ``max_per_image = k``, drop the survivors ranked below the k best on the same image."""
    ranked = state.ranked
    if state.options.max_per_image is None or not ranked.size:
        return
    image = state.codes[ranked]
    over = (rank_within_groups(image) >= state.options.max_per_image) & (image >= 0)
    state.reason[ranked[over]] = CODE["duplicate"]
    state.ranked = ranked[~over]


# ---------------------------------------------------------------------------------------------
# Budget and quotas
# ---------------------------------------------------------------------------------------------
def quota_take(
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


def _label(value: Any) -> str:
    return "<null>" if value is None else str(value)


def _quota_groups(state: State) -> tuple[np.ndarray, list[Any]]:
    """Group codes of the quota field, or a SelectionError naming what is wrong with it."""
    name = state.options.quota_field
    if name not in state.names:
        from visa.registry import did_you_mean

        raise SelectionError(
            f"quota field '{name}' is not a column of the score table"
            f"{did_you_mean(name, [c for c in state.names if c.startswith('meta.')])}"
        )
    try:
        return value_codes(state.table.column(name))
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
        raise SelectionError(f"quota field '{name}' must be a column of scalar values") from None


def _quota_stage(state: State, budget: int) -> None:
    ranked = state.ranked
    group_codes, group_values = _quota_groups(state)
    n_groups = len(group_values)
    pool_counts = np.bincount(group_codes[state.valid], minlength=n_groups)
    take, limits = quota_take(group_codes[ranked], n_groups, pool_counts, budget, state.options)
    state.chosen = ranked[take]
    lost = ~take
    beyond = np.arange(ranked.size) >= budget
    state.reason[ranked[lost & ~beyond]] = CODE["quota"]
    state.reason[ranked[lost & beyond]] = CODE["budget"]
    selected_per_group = np.bincount(group_codes[state.chosen], minlength=n_groups)
    survived = np.bincount(group_codes[ranked], minlength=n_groups)
    limit_name, limit = next(iter(limits.items()))
    state.quota_report = {
        "field": state.options.quota_field,
        "mode": state.options.quota_mode,
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


def budget_stage(state: State) -> None:
    """Take the first ``budget`` survivors (shared between quota groups with ``quota_field``)."""
    state.budget = budget = state.options.budget_rows(state.n)
    if budget is None:
        state.chosen = state.ranked
    elif state.options.quota_field is not None:
        _quota_stage(state, budget)
    elif state.groups is not None:
        cluster_budget(state, budget)
    else:
        state.chosen = state.ranked[:budget]
        state.reason[state.ranked[budget:]] = CODE["budget"]


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------
def selection_table(state: State) -> pa.Table:
    """One row per input row, in table order: selected, rank (1 = best), scores and reason."""
    n = state.n
    selected = np.zeros(n, dtype=bool)
    selected[state.chosen] = True
    rank = np.zeros(n, dtype=np.int64)
    rank[state.chosen] = np.arange(1, state.chosen.size + 1)  # ``chosen`` is in rank order: 1 = best
    reason_names = pa.array(REASONS, pa.string())
    reason_index = pa.array(state.reason.astype(np.int32) - 1, mask=selected)
    visual, instruction = state.visual_row, state.instruction
    return pa.table(
        {
            "row": pa.array(state.rows, pa.int64()),
            "sample_id": state.table.column("sample_id").cast(pa.string()),
            "selected": pa.array(selected),
            "rank": pa.array(rank, pa.int64(), mask=~selected),
            "visual_score": pa.array(visual, pa.float64(), mask=np.isnan(visual)),
            "instruction_score": pa.array(instruction, pa.float64(), mask=np.isnan(instruction)),
            "reason": pc.take(reason_names, reason_index),
        }
    )


def summary(state: State) -> dict[str, Any]:
    """What went into run.json under ``selection`` (the outputs are added by the caller)."""
    counts = np.bincount(state.reason, minlength=len(REASONS) + 1)
    selected = int(state.chosen.size)
    ranked_by = "instruction_score" if state.ranked_by_instruction else (
        "visual_score" if state.visual_weights else "row"
    )
    out: dict[str, Any] = {
        "pool": state.n,
        "budget": state.options.budget,
        "budget_rows": state.budget,
        "selected": selected,
        "dropped": {name: int(counts[CODE[name]]) for name in REASONS},
        "images": {
            "unique": state.n_images,
            "kept": state.kept_images if state.visual_weights else state.n_images,
        },
        "text_only_rows": int((state.valid & ~state.has_image).sum()),
        "visual_weights": state.visual_weights,
        "visual_weights_from": "options" if state.options.visual_weights else (
            "probes" if state.calibration.weights else "equal"),
        "image_cut": state.calibration.cut.as_dict()
        if state.calibration.cut is not None and state.options.image_keep == "probes" else None,
        "im_cut": state.im_cut,
        "ranked_by": ranked_by,
        "pt_cut": state.pt_cut,
        "options": state.options.model_dump(mode="json"),
    }
    if state.budget is not None and selected < state.budget:
        state.notes.append(f"budget under-filled: {selected} of {state.budget} (not enough samples passed)")
    if state.quota_report is not None:
        out["quota"] = state.quota_report
    if state.groups is not None:
        out["clusters"] = cluster_report(state)
    if state.calibration.report:
        out["visual_probes"] = state.calibration.report
    out["notes"] = state.notes
    return out


#: The stages in the order they run.
STAGES = (
    cluster_stage,
    gate_stage,
    atypical_stage,
    image_stage,
    text_only_stage,
    im_stage,
    pt_tail_stage,
    rank_stage,
    dedupe_stage,
    max_per_image_stage,
    budget_stage,
)


def select_table(
    table: pa.Table,
    options: SelectionOptions,
    *,
    units: Mapping[str, str] | None = None,
    shapley: Mapping[str, Any] | None = None,
    codes: np.ndarray | None = None,
    probes: pa.Table | None = None,
    cluster_centres: list[list[float]] | None = None,
) -> tuple[pa.Table, dict[str, Any]]:
    """Run the selection stages over a score table that already has fused family columns.

    ``units`` maps families to "image"/"sample" (default: each family's unit in
    :mod:`visa.families`); ``shapley`` is the fusion report (its IM weights turn the raw IM agents
    into the value ``im_min`` applies to); ``codes`` are the table's image codes when the caller
    has them; ``probes`` is the run's probe table (stage-1 weights and cut, IM cut; see
    :mod:`visa.probes.calibrate`); ``cluster_centres`` are the content clusters' centres of the
    run (``clusters.centres``), used when the budget is smaller than the number of clusters.
    Returns the selection table (one row per input row, in table order) and the summary.
    """
    state = initial_state(table, options, units, shapley, codes)
    state.probes = probes
    state.cluster_centres = cluster_centres or None
    for stage in STAGES:
        stage(state)
    return selection_table(state), summary(state)
