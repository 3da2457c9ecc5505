"""Selection within clusters: ranks within a cluster, per-cluster cuts, the budget spread over clusters."""

from __future__ import annotations

import numpy as np
import pytest

from visa.selection import percentile_ranks
from visa.selection.crops import fill_targets, keep_within, percentiles_within, spread_budget


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_percentiles_within_equal_per_group_percentiles(seed):
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 6, 300).astype(float)  # many ties
    values[rng.random(300) < 0.1] = np.nan
    groups = rng.integers(0, 7, 300)
    got = percentiles_within(values, groups)
    for g in range(7):
        members = groups == g
        expected = percentile_ranks(values[members])
        np.testing.assert_allclose(got[members], expected, equal_nan=True)
    np.testing.assert_allclose(percentiles_within(values, np.zeros(300, int)), percentile_ranks(values),
                               equal_nan=True)


def test_a_plain_cluster_is_not_ranked_against_rich_images():
    photos = np.array([50.0, 60, 70, 80])  # rich images
    text = np.array([1.0, 2, 3, 4])  # simple-looking images of another kind
    values, groups = np.r_[photos, text], np.r_[[0] * 4, [1] * 4]
    global_pct = percentile_ranks(values)
    within = percentiles_within(values, groups)
    assert global_pct[4:].max() < global_pct[:4].min()
    np.testing.assert_allclose(within[4:], within[:4])  # the best text image ranks like the best photo


@pytest.mark.parametrize("seed", [0, 1])
def test_keep_within_keeps_each_groups_top_fraction(seed):
    rng = np.random.default_rng(seed)
    n = 200
    score = rng.integers(0, 10, n).astype(float)
    score[rng.random(n) < 0.05] = np.nan
    groups = rng.integers(0, 5, n)
    rows = rng.permutation(n)
    keep = keep_within(score, groups, rows, 0.3)
    for g in range(5):
        members = np.flatnonzero(groups == g)
        ranked = sorted(members, key=lambda i: (np.isnan(score[i]), -np.nan_to_num(score[i]), rows[i]))
        quota = int(np.floor(0.3 * members.size + 0.5))
        assert set(np.flatnonzero(keep & (groups == g))) == set(ranked[:quota])


def test_spread_budget_between_proportional_and_equal():
    pool = np.array([80, 15, 5, 0])
    assert spread_budget(pool, 20, 0.0).tolist() == [16, 3, 1, 0]
    assert spread_budget(pool, 21, 1.0).tolist() == [7, 7, 7, 0]
    half = spread_budget(pool, 20, 0.5)
    assert half.sum() == 20 and half[3] == 0 and half[2] > 1 and half[0] < 16
    for budget in range(0, 40):
        assert spread_budget(pool, budget, 0.3).sum() == budget


def test_fill_targets_gives_short_clusters_slots_to_the_best_rest():
    ranked_groups = np.array([0, 0, 0, 0, 1, 0, 2])  # best first; cluster 2 has one survivor
    take = fill_targets(ranked_groups, np.array([2, 1, 2]), 5)
    # cluster 0's best two, cluster 1's one, cluster 2's only one, then the best remaining (0's third)
    assert np.flatnonzero(take).tolist() == [0, 1, 2, 4, 6]
    assert fill_targets(ranked_groups, np.array([2, 1, 2]), 0).sum() == 0
