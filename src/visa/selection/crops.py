"""Selection within content clusters ("crops"): ranks within a cluster and the budget spread over clusters.

The clusters are the score table's ``cluster`` column (computed by `visa score`, see
:mod:`visa.clusters`) with ``clusters: auto`` (the default; without that column the selection runs
over the whole pool, with a note), any column such as ``meta.task`` with ``clusters: <column>``, or
none with ``clusters: off``. Rows without a cluster value (text-only samples, rows that could not be
clustered) form one group of their own. An image belongs to the cluster of its first error-free row.

Five small, vectorised steps that the selection stages call when clusters are on:

* :func:`atypical_within` - each cluster drops its ``cluster_atypical`` fraction of rows least
  typical of it (the ``cluster_typicality`` column, see :mod:`visa.clusters`): with clusters held
  together by their questions, these are mostly conversations on an image unlike the images of
  their kind (a wrong image, a damaged copy) - which a visual ranking within the cluster cannot see
  and IM agents blind to that kind of image cannot either;
* :func:`percentiles_within` - each image's percentile among the images of its own cluster, so a
  rendered-text image competes with rendered text, not with rich photos;
* :func:`keep_within` - each cluster keeps its own top fraction of images (the image cut);
* :func:`im_floor` - the IM rule (drop IM <= ``im_min``) spares each cluster's best
  ``cluster_im_floor`` fraction by IM: IM agents whose unit has no meaning for a kind of content
  (the embedded recipe's proxies cannot read a handwritten digit) would otherwise remove the whole
  kind, whose samples then compete among themselves on IM;
* :func:`spread_budget` + :func:`fill_targets` - each cluster's share of the budget, then which
  ranked survivors fill it.

A cluster's budget share is a documented balance between proportional and equal::

    share(c) = (1 - balance) * pool(c) / pool + balance / clusters

where ``pool(c)`` counts the cluster's error-free rows and ``clusters`` the non-empty clusters;
``balance = 0`` is proportional, ``balance = 1`` equal. Shares become whole targets by largest
remainders. A cluster whose survivors fall short of its target leaves its slots to the best remaining
survivors of any cluster, so the budget is filled whenever enough samples survive the filters. A
survivor that its cluster's share pushes out of the budget gets the reason ``quota`` (one ranked
beyond the budget anyway gets ``budget``). With ``quota_field`` set, the quota field shares the
budget and the clusters only rank the images.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    from visa.selection.stages import State

#: Groups listed in run.json's selection summary (largest pools first).
REPORTED_GROUPS = 200


def _runs(sorted_keys: list[np.ndarray]) -> np.ndarray:
    """Boolean starts of runs of equal consecutive key tuples (the arrays are already sorted)."""
    n = sorted_keys[0].size
    new = np.zeros(n, dtype=bool)
    if n:
        new[0] = True
        for key in sorted_keys:
            new[1:] |= key[1:] != key[:-1]
    return new


def group_order(groups: np.ndarray, key: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Positions sorted by group, then ``key``, then ``rows`` (each ascending): stable sorts from the
    last key to the first, the small-integer group codes by radix sort (faster than ``lexsort``)."""
    order = np.arange(key.size) if rows is None or bool(np.all(rows[1:] >= rows[:-1])) else np.argsort(rows, kind="stable")
    order = order[np.argsort(key[order], kind="stable")]
    top = int(groups.max()) if groups.size else 0
    narrow = np.int16 if top < 2**15 else (np.int32 if top < 2**31 else np.int64)
    return order[np.argsort(groups[order].astype(narrow, copy=False), kind="stable")]


def percentiles_within(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Mid-rank percentiles in (0, 1) of the non-NaN ``values`` within each group (ties share their
    mean rank); NaN stays NaN. With a single group this equals the pool-wide percentile rank."""
    out = np.full(values.shape, np.nan)
    present = np.flatnonzero(~np.isnan(values))
    if not present.size:
        return out
    v, g = values[present], groups[present]
    order = group_order(g, v)
    sv, sg = v[order], g[order]
    group_start = np.flatnonzero(_runs([sg]))
    group_of = np.cumsum(_runs([sg])) - 1
    size = np.diff(np.append(group_start, sv.size))[group_of]
    first = group_start[group_of]
    tie = _runs([sg, sv])
    tie_start = np.flatnonzero(tie)
    tie_end = np.append(tie_start[1:], sv.size)
    tie_of = np.cumsum(tie) - 1
    mid = ((tie_start[tie_of] - first) + (tie_end[tie_of] - first)) / (2.0 * size)
    ranks = np.empty(sv.size)
    ranks[order] = mid
    out[present] = ranks
    return out


def keep_within(score: np.ndarray, groups: np.ndarray, rows: np.ndarray, fraction: float) -> np.ndarray:
    """Which items each group keeps: its top ``fraction`` by ``score`` (rounded half up; NaN last;
    ties: lower row first)."""
    n = score.size
    if not n:
        return np.zeros(0, dtype=bool)
    key = np.where(np.isnan(score), np.inf, -score)
    order = group_order(groups, key, rows)
    sg = groups[order]
    starts = _runs([sg])
    group_start = np.flatnonzero(starts)
    group_of = np.cumsum(starts) - 1
    size = np.diff(np.append(group_start, n))[group_of]
    rank = np.arange(n) - group_start[group_of]
    quota = np.floor(fraction * size + 0.5 + 1e-9)
    keep = np.empty(n, dtype=bool)
    keep[order] = rank < quota
    return keep


def spread_budget(pool_counts: np.ndarray, budget: int, balance: float) -> np.ndarray:
    """Whole targets per cluster summing to ``budget`` (largest remainders; ties: lower cluster)."""
    pool_counts = np.asarray(pool_counts, dtype=np.float64)
    k = pool_counts.size
    nonempty = pool_counts > 0
    if not k or not nonempty.any() or budget <= 0:
        return np.zeros(k, dtype=np.int64)
    share = (1.0 - balance) * pool_counts / pool_counts.sum() + balance * nonempty / nonempty.sum()
    exact = budget * share
    target = np.floor(exact + 1e-9).astype(np.int64)
    short = budget - int(target.sum())
    if short > 0:
        by_remainder = np.lexsort((np.arange(k), -(exact - target)))
        target[by_remainder[:short]] += 1
    return target


def merge_clusters(centres: np.ndarray, counts: np.ndarray, groups: int) -> np.ndarray:
    """A group id per cluster, ``groups`` groups in all when it can be: the clusters that have rows
    (``counts`` > 0) and a centre (a row of ``centres`` without NaN) are joined bottom-up by
    Ward's linkage on their centres; a cluster with rows but no centre (the rows that have no
    cluster) stays a group of its own, and a cluster without rows joins the group of its nearest
    cluster (it has nothing to select)."""
    from sklearn.cluster import AgglomerativeClustering

    centres = np.asarray(centres, dtype=np.float64)
    has_centre = ~np.isnan(centres).any(axis=1)
    present = np.asarray(counts) > 0
    joined = np.flatnonzero(present & has_centre)
    alone = np.flatnonzero(present & ~has_centre)
    n_joined = max(groups - alone.size, 1)
    out = np.zeros(centres.shape[0], dtype=np.int64)
    if joined.size <= n_joined:
        out[joined] = np.arange(joined.size)
    else:
        out[joined] = AgglomerativeClustering(n_clusters=n_joined, linkage="ward").fit_predict(centres[joined])
    out[alone] = (int(out[joined].max()) + 1 if joined.size else 0) + np.arange(alone.size)
    absent = np.flatnonzero(~present & has_centre)
    if absent.size and joined.size:
        gaps = np.linalg.norm(centres[absent, None, :] - centres[None, joined, :], axis=2)
        out[absent] = out[joined[gaps.argmin(axis=1)]]
    return out


def fill_targets(groups: np.ndarray, targets: np.ndarray, budget: int) -> np.ndarray:
    """Which of the ranked survivors (best first; cluster code per survivor) fill the budget: first
    each cluster's best ``target`` survivors, then the best of the rest, up to ``budget``."""
    n = groups.size
    if not n or budget <= 0:
        return np.zeros(n, dtype=bool)
    within = np.empty(n, dtype=np.int64)
    order = np.argsort(groups, kind="stable")
    sg = groups[order]
    starts = _runs([sg])
    within[order] = np.arange(n) - np.flatnonzero(starts)[np.cumsum(starts) - 1]
    tier = np.where(within < targets[groups], 0, 1)
    chosen = np.lexsort((np.arange(n), tier))[:budget]
    take = np.zeros(n, dtype=bool)
    take[chosen] = True
    return take


def balance_note(balance: float) -> str:
    """How the budget is spread, in words (for the run summary)."""
    if math.isclose(balance, 0.0):
        return "proportional to each cluster's pool"
    if math.isclose(balance, 1.0):
        return "equal per cluster"
    return f"{1 - balance:.0%} proportional to each cluster's pool, {balance:.0%} equal per cluster"


# ---------------------------------------------------------------------------------------------
# The stage functions (called by visa.selection.stages)
# ---------------------------------------------------------------------------------------------
def cluster_stage(state: State) -> None:
    """Resolve the ``clusters`` option into a group code per row (``state.groups``), or leave the
    selection unclustered."""
    from visa.clusters import CLUSTER_COLUMN
    from visa.selection.options import SelectionError
    from visa.selection.ranks import codes as value_codes

    option = state.options.clusters
    if option == "off":
        return
    column = CLUSTER_COLUMN if option == "auto" else option
    if column not in state.names:
        if option == "auto":
            state.notes.append("no content clusters in the scores: images and budget ranked over the whole pool")
            return
        from visa.registry import did_you_mean

        raise SelectionError(
            f"cluster field '{option}' is not a column of the score table"
            f"{did_you_mean(option, [c for c in state.names if c.startswith('meta.')])}"
        )
    try:
        groups, values = value_codes(state.table.column(column))
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
        raise SelectionError(f"cluster field '{option}' must be a column of scalar values") from None
    state.groups, state.group_values, state.cluster_column = groups, values, column


def visual_within_clusters(
    state: State, image_rows: np.ndarray, family_values: list[np.ndarray], weights: list[float], fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """Visual score of every unique image (weighted percentiles within its cluster) and the
    positions (into ``image_rows``) of the images each cluster keeps: its top ``fraction``."""
    from visa.fusion import renormalised_sum

    groups = state.groups[image_rows]
    visual = renormalised_sum([percentiles_within(v, groups) for v in family_values], weights)
    keep = keep_within(visual, groups, state.rows[image_rows], fraction)
    n_groups = len(state.group_values)
    state.cluster_images = np.bincount(groups, minlength=n_groups)
    state.cluster_kept_images = np.bincount(groups[keep], minlength=n_groups)
    return visual, np.flatnonzero(keep)


def im_floor(state: State, im: np.ndarray) -> np.ndarray:
    """Rows the IM rule spares: within each cluster, the best ``cluster_im_floor`` fraction by IM
    of the rows still in the running (none when clusters are off or the floor is 0)."""
    spared = np.zeros(im.size, dtype=bool)
    floor = state.options.cluster_im_floor
    if state.groups is None or floor <= 0:
        return spared
    alive = np.flatnonzero((state.reason == 0) & ~np.isnan(im))
    keep = keep_within(im[alive], state.groups[alive], state.rows[alive], floor)
    spared[alive[keep]] = True
    return spared


def share_rows(state: State) -> np.ndarray:
    """The rows a cluster's budget share counts: error-free rows that neither the image gate nor
    the typicality cut removed (a cluster of damaged images claims no share)."""
    out = state.valid.copy()
    for reason in ("image_gate", "atypical"):
        out &= state.reason != _code(reason)
    return out


def atypical_within(state: State) -> np.ndarray:
    """Rows to drop as atypical: within each cluster, the ``cluster_atypical`` fraction of the rows
    still in the running with the lowest typicality (ties: higher row first; none when clusters are
    off, the fraction is 0, or the table has no typicality column; a row without a value is kept)."""
    from visa.clusters import TYPICALITY_COLUMN

    drop = np.zeros(state.n, dtype=bool)
    fraction = state.options.cluster_atypical
    if state.groups is None or fraction <= 0 or TYPICALITY_COLUMN not in state.names:
        return drop
    typicality = np.asarray(
        state.table.column(TYPICALITY_COLUMN).cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64
    )
    alive = np.flatnonzero((state.reason == 0) & ~np.isnan(typicality))
    keep = keep_within(typicality[alive], state.groups[alive], state.rows[alive], 1.0 - fraction)
    drop[alive[~keep]] = True
    return drop


def atypical_stage(state: State) -> None:
    """Drop each cluster's least typical rows (reason ``atypical``; see :func:`atypical_within`)."""
    state.drop(atypical_within(state), "atypical")


def cluster_budget(state: State, budget: int) -> None:
    """Fill the budget cluster by cluster (targets from :func:`spread_budget`). When the budget
    is smaller than the number of clusters that claim a share and the run kept the clusters'
    centres, the clusters are first merged into ``budget`` groups of neighbours
    (:func:`merge_clusters`) and the budget is spread over those groups: largest remainders over
    more clusters than slots would hand every slot to the largest clusters."""
    ranked = state.ranked
    n_groups = len(state.group_values)
    pool_counts = np.bincount(state.groups[share_rows(state)], minlength=n_groups)
    level = state.groups
    claiming = int(np.count_nonzero(pool_counts))
    centres = _centres(state) if 0 < budget < claiming else None
    if centres is not None:
        state.cluster_merged = merged = merge_clusters(centres, pool_counts, budget)
        level = merged[state.groups]
        n_merged = int(merged.max()) + 1
        pool_counts = np.bincount(merged, weights=pool_counts, minlength=n_merged).astype(np.int64)
        state.notes.append(
            f"the budget ({budget}) is smaller than the {claiming} clusters that claim a share: "
            f"it is spread over {n_merged} groups of neighbouring clusters"
        )
    state.cluster_targets = spread_budget(pool_counts, budget, state.options.cluster_balance)
    take = fill_targets(level[ranked], state.cluster_targets, budget)
    state.chosen = ranked[take]
    beyond = np.arange(ranked.size) >= budget
    state.reason[ranked[~take & ~beyond]] = _code("quota")
    state.reason[ranked[~take & beyond]] = _code("budget")


def _centres(state: State) -> np.ndarray | None:
    """The centres of the table's content clusters in group order (a NaN row for the group of the
    rows without a cluster), or None unless the groups are the ``cluster`` column's ids and the run
    kept a centre for each (a note says so when its centres do not fit)."""
    from visa.clusters import CLUSTER_COLUMN

    if state.cluster_centres is None or state.cluster_column != CLUSTER_COLUMN:
        return None
    ids = np.asarray(
        [int(v) if isinstance(v, int | np.integer) and not isinstance(v, bool) else -1 for v in state.group_values],
        dtype=np.int64,
    )
    try:
        centres = np.asarray(state.cluster_centres, dtype=np.float64)
    except ValueError:  # rows of different lengths
        centres = np.zeros((0, 0))
    if (centres.ndim != 2 or not centres.shape[1] or not np.isfinite(centres).all()
            or ids.max(initial=-1) >= len(centres)):
        state.notes.append(
            "run.json's clusters.centres do not fit the table's clusters: the budget is spread over "
            "the clusters themselves"
        )
        return None
    out = np.full((ids.size, centres.shape[1]), np.nan)
    out[ids >= 0] = centres[ids[ids >= 0]]
    return out


def _code(reason: str) -> int:
    from visa.selection.stages import CODE

    return CODE[reason]


def _examples(state: State, n_groups: int) -> np.ndarray:
    """Per group, the table position of its most typical error-free row with an image (smallest
    ``cluster_distance`` when the table has it, else the first); -1 when there is none."""
    from visa.clusters import DISTANCE_COLUMN

    candidates = np.flatnonzero(state.valid & state.has_image)
    out = np.full(n_groups, -1, dtype=np.int64)
    if not candidates.size:
        return out
    if DISTANCE_COLUMN in state.names and state.cluster_column != DISTANCE_COLUMN:
        distance = np.asarray(state.table.column(DISTANCE_COLUMN).cast(pa.float64()).to_numpy(), dtype=np.float64)
        key = np.where(np.isnan(distance[candidates]), np.inf, distance[candidates])
    else:
        key = np.zeros(candidates.size)
    groups = state.groups[candidates]
    best = np.full(n_groups, np.inf)
    np.minimum.at(best, groups, key)  # O(n): no sort over millions of rows
    at_best = np.flatnonzero(key <= best[groups])  # ties: the first (lowest) position wins below
    _, first = np.unique(groups[at_best], return_index=True)
    out[groups[at_best[first]]] = candidates[at_best[first]]
    return out


def _label(value: Any) -> str:
    return "<none>" if value is None else str(value)


def cluster_report(state: State) -> dict[str, Any] | None:
    """The ``clusters`` section of the selection summary: per cluster the pool, images kept,
    survivors, target, selected and shares, and an example row with its image."""
    if state.groups is None:
        return None
    n_groups = len(state.group_values)
    pool = np.bincount(state.groups[state.valid], minlength=n_groups)
    survived = np.bincount(state.groups[state.ranked], minlength=n_groups)
    selected = np.bincount(state.groups[state.chosen], minlength=n_groups)
    examples = _examples(state, n_groups)
    image_keys = state.table.column("image_key") if "image_key" in state.names else None
    sample_ids = state.table.column("sample_id")
    total_pool, total_selected = max(int(pool.sum()), 1), max(int(selected.sum()), 1)
    spread = state.options.quota_field is None and state.cluster_targets is not None
    merged = state.cluster_merged
    groups = []
    for g in np.lexsort((np.arange(n_groups), -pool))[:REPORTED_GROUPS]:
        entry: dict[str, Any] = {
            "cluster": _label(state.group_values[g]),
            "pool": int(pool[g]),
            "pool_share": round(pool[g] / total_pool, 4),
            "images": int(state.cluster_images[g]) if state.cluster_images is not None else None,
            "images_kept": int(state.cluster_kept_images[g]) if state.cluster_kept_images is not None else None,
            "survived_filters": int(survived[g]),
            "target": int(state.cluster_targets[g]) if spread and merged is None else None,
            "selected": int(selected[g]),
            "selected_share": round(selected[g] / total_selected, 4),
        }
        if merged is not None:
            entry["group"] = int(merged[g])
        if examples[g] >= 0:
            p = int(examples[g])
            entry["example"] = {
                "row": int(state.rows[p]),
                "sample_id": sample_ids[p].as_py(),
                "image_key": image_keys[p].as_py() if image_keys is not None else None,
            }
        groups.append(entry)
    note = balance_note(state.options.cluster_balance)
    if merged is not None:
        note += f", over {int(merged.max()) + 1} groups of neighbouring clusters (a budget below the number of clusters)"
    return {
        "column": state.cluster_column,
        "count": n_groups,
        "merged_targets": None if merged is None else [int(t) for t in state.cluster_targets],
        "budget": (note if spread
                   else f"shared by quota field {state.options.quota_field}" if state.options.quota_field
                   else "no budget: every survivor is selected"),
        "balance": state.options.cluster_balance,
        "groups": groups,
    }
