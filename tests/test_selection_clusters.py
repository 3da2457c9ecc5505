"""Selection within content clusters: simple-looking task families keep their share, noise stays out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from visa.selection import SelectionError, SelectionOptions, select, select_table

# family -> (share of the pool, how visually rich its images look)
FAMILIES = {"photo": (0.5, 3.0), "text": (0.2, 0.0), "code": (0.15, -0.5), "digit": (0.15, -1.0)}


def family_pool(seed: int, n_images: int = 3000, noise: float = 0.2) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """A fused score table: families whose images differ in visual richness, two samples per image,
    and noise in every family (degraded images: visually poor within their family; misaligned
    conversations: negative IM). Returns the table, each row's family and whether it is noise."""
    rng = np.random.default_rng(seed)
    names = list(FAMILIES)
    image_family = rng.choice(len(names), size=n_images, p=[FAMILIES[f][0] for f in names])
    richness = np.array([FAMILIES[f][1] for f in names])[image_family]
    degraded = rng.random(n_images) < noise / 2
    visual = richness + rng.normal(scale=0.7, size=n_images) - 1.2 * degraded
    image = np.repeat(np.arange(n_images), 2)
    n = image.size
    misaligned = rng.random(n) < noise / 2
    noisy = degraded[image] | misaligned
    im = rng.normal(0.6, 0.5, n) - 0.7 * noisy  # some noise passes the IM rule
    cluster = image_family[image].astype(np.int32)
    table = pa.table({
        "row": pa.array(np.arange(n), pa.int64()),
        "sample_id": pa.array([f"s{i}" for i in range(n)]),
        "image_key": pa.array([f"img{i}" for i in image]),
        "error_kind": pa.nulls(n, pa.string()),
        "meta.family": pa.array([names[f] for f in cluster]),
        "cluster": pa.array(cluster, pa.int32()),
        "cluster_distance": pa.array(rng.random(n)),
        "sc": pa.array((visual + rng.normal(scale=0.3, size=n_images))[image]),
        "oa": pa.array(visual[image]),
        "im": pa.array(im),
    })
    return table, np.array(names)[cluster], noisy


def shares(out: pa.Table, family: np.ndarray) -> dict[str, float]:
    selected = np.asarray(out.column("selected"))
    return {f: float((family[selected] == f).mean()) for f in FAMILIES}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("budget", ["2.5%", "10%", "25%"])
def test_every_family_keeps_its_share_and_noise_stays_low(seed, budget):
    table, family, noisy = family_pool(seed)
    off, _ = select_table(table, SelectionOptions(budget=budget, clusters="off"))
    on, summary = select_table(table, SelectionOptions(budget=budget))
    pool_share = {f: float((family == f).mean()) for f in FAMILIES}
    without, within = shares(off, family), shares(on, family)
    assert min(without[f] / pool_share[f] for f in ("code", "digit")) < 1 / 3  # the problem
    assert all(within[f] >= pool_share[f] / 3 for f in FAMILIES)  # the fix
    selected_on = np.asarray(on.column("selected"))
    noise_off = noisy[np.asarray(off.column("selected"))].mean()
    noise_on = noisy[selected_on].mean()
    assert noise_on <= 1.2 * noise_off + 1 / selected_on.sum()  # within one sample of 1.2x
    assert summary["clusters"]["column"] == "cluster" and summary["clusters"]["count"] == 4


def test_images_are_ranked_and_cut_within_their_cluster():
    table, family, _ = family_pool(3)
    out, summary = select_table(table, SelectionOptions(budget=None, image_keep=0.5, im_min=None, pt_tail=0))
    kept = np.asarray(out.column("reason").is_null())
    for group in summary["clusters"]["groups"]:
        assert group["images_kept"] == int(np.floor(group["images"] * 0.5 + 0.5))
    digit_kept = kept[family == "digit"].mean()
    assert 0.4 < digit_kept < 0.6  # half of the digits' images, although every photo looks richer
    visual = np.asarray(out.column("visual_score"))
    assert visual[family == "digit"].max() > 0.9  # the best digit image ranks at the top of its cluster


def test_meta_field_and_off_and_balance():
    table, family, _ = family_pool(4)
    auto, _ = select_table(table, SelectionOptions(budget=100))
    meta, summary = select_table(table, SelectionOptions(budget=100, clusters="meta.family"))
    assert np.array_equal(np.asarray(auto.column("selected")), np.asarray(meta.column("selected")))
    assert summary["clusters"]["column"] == "meta.family"
    equal, summary = select_table(table, SelectionOptions(budget=100, cluster_balance=1.0))
    assert sorted(g["target"] for g in summary["clusters"]["groups"]) == [25, 25, 25, 25]
    assert all(g["selected"] == 25 for g in summary["clusters"]["groups"])
    proportional = {g["cluster"]: (g["target"], g["pool"]) for g in
                    select_table(table, SelectionOptions(budget=100))[1]["clusters"]["groups"]}
    for target, pool in proportional.values():
        assert abs(target - 100 * pool / table.num_rows) < 1
    off, summary = select_table(table, SelectionOptions(budget=100, clusters="off"))
    assert "clusters" not in summary


def test_summary_names_an_example_per_cluster():
    table, family, _ = family_pool(5)
    _, summary = select_table(table, SelectionOptions(budget="10%"))
    distance = np.asarray(table.column("cluster_distance"))
    cluster = np.asarray(table.column("cluster"))
    for group in summary["clusters"]["groups"]:
        members = np.flatnonzero(cluster == int(group["cluster"]))
        row = group["example"]["row"]
        assert row == members[np.argmin(distance[members])]
        assert group["example"]["image_key"] == table.column("image_key")[row].as_py()
        assert group["pool"] == members.size and 0 <= group["selected"] <= group["survived_filters"]


def test_table_without_clusters_runs_as_before_with_a_note():
    table, _, _ = family_pool(6)
    plain = table.drop_columns(["cluster", "cluster_distance"])
    out, summary = select_table(plain, SelectionOptions(budget=50))
    off, _ = select_table(table, SelectionOptions(budget=50, clusters="off"))
    assert out.equals(off)
    assert any("no content clusters" in note for note in summary["notes"])


def test_bad_cluster_field_is_one_clear_error():
    table, _, _ = family_pool(7)
    with pytest.raises(SelectionError, match="cluster field 'meta.famly' is not a column.*meta.family"):
        select_table(table, SelectionOptions(budget=50, clusters="meta.famly"))
    with pytest.raises(ValueError):
        SelectionOptions(clusters="  ")


def test_run_json_records_the_clusters(tmp_path: Path):
    table, _, _ = family_pool(8)
    run = tmp_path / "run"
    run.mkdir()
    pq.write_table(table, run / "scores.parquet")
    (run / "run.json").write_text(json.dumps({"recipe": {"name": "t", "scores": {}}}))
    result = select(run, SelectionOptions(budget="10%"), write_records=False)
    recorded = json.loads((run / "run.json").read_text())["selection"]["clusters"]
    assert recorded == result.summary["clusters"]
    assert sum(g["selected"] for g in recorded["groups"]) == result.summary["selected"]


def test_im_floor_keeps_a_family_the_im_agents_cannot_read():
    """IM agents blind to one family (all its IM <= 0): the floor keeps the family's best by IM."""
    table, family, noisy = family_pool(9)
    im = np.asarray(table.column("im")).copy()
    blind = family == "digit"
    im[blind] -= 3.0  # every digit sample now looks like "the image does not help"
    table = table.set_column(table.column_names.index("im"), "im", pa.array(im))
    spared, summary = select_table(table, SelectionOptions(budget="10%"))
    strict, _ = select_table(table, SelectionOptions(budget="10%", cluster_im_floor=0.0))
    reason = np.asarray(strict.column("reason").to_pylist(), dtype=object)
    assert not np.asarray(strict.column("selected"))[blind].any() and (reason[blind] == "im_nonpositive").any()
    digits = next(g for g in summary["clusters"]["groups"] if g["cluster"] == str(list(FAMILIES).index("digit")))
    assert digits["selected"] == digits["target"] > 0
    kept = np.asarray(spared.column("selected"))
    assert noisy[kept & blind].mean() < noisy[blind].mean()  # within the family, IM still ranks


def test_rows_without_a_cluster_keep_a_group_of_their_own():
    table, family, centres = _many_small_clusters(0)
    n, extra = table.num_rows, 10  # ten samples without a cluster (text-only questions, say)
    cluster = pa.concat_arrays([table.column("cluster").combine_chunks(), pa.nulls(extra, pa.int32())])
    rng = np.random.default_rng(1)
    table = pa.table({
        "row": pa.array(np.arange(n + extra), pa.int64()),
        "sample_id": pa.array([f"s{i}" for i in range(n + extra)]),
        "image_key": pa.array([f"img{i}" for i in range(n + extra)]),
        "error_kind": pa.nulls(n + extra, pa.string()),
        "cluster": cluster,
        "cluster_distance": pa.array(rng.random(n + extra)),
        "sc": pa.array(rng.normal(size=n + extra)),
        "im": pa.array(rng.normal(1.0, 0.3, n + extra)),
    })
    options = SelectionOptions(budget=5, image_keep=1.0, im_min=None, pt_tail=0, cluster_atypical=0.0)
    out, summary = select_table(table, options, cluster_centres=centres)
    selected = np.asarray(out.column("selected"))
    # the four families' clusters merge into four groups; the rows without a cluster are a fifth
    assert sorted(family[selected[:n]]) == [0, 1, 2, 3] and selected[n:].sum() == 1
    assert summary["clusters"]["merged_targets"] == [1, 1, 1, 1, 1]


def test_merge_clusters_joins_neighbours():
    from visa.selection.crops import merge_clusters

    centres = np.array([[0, 0], [0.2, 0], [0, 0.3], [10, 10], [10.1, 10], [9.8, 10.2], [0.1, 0.1]], dtype=float)
    counts = np.array([5, 4, 3, 6, 2, 2, 0])  # the last cluster has no rows: it joins its nearest
    groups = merge_clusters(centres, counts, 2)
    assert len(set(groups[:3])) == 1 and len(set(groups[3:6])) == 1 and groups[0] != groups[3]
    assert groups[6] == groups[0]
    assert list(merge_clusters(centres, counts, 6)[:6]) == [0, 1, 2, 3, 4, 5]  # enough groups: none merged
    # a cluster with rows but no centre is a group of its own; the others share what is left
    with_rest = np.vstack([centres, [[np.nan, np.nan]]])
    groups = merge_clusters(with_rest, np.append(counts, 4), 3)
    assert groups[7] == 2 and set(groups[:7]) == {0, 1} and groups[0] != groups[3]


def _many_small_clusters(seed: int) -> tuple[pa.Table, np.ndarray, list[list[float]]]:
    """Four task families of 60 samples each, split into content clusters of different sizes: six
    of 10 (a varied kind such as photos), one of 60, two of 30, three of 20. Each family's
    clusters sit near each other (the centres)."""
    rng = np.random.default_rng(seed)
    sizes = [10] * 6 + [60] + [30] * 2 + [20] * 3
    kind = np.repeat([0, 1, 2, 3], [6, 1, 2, 3])
    cluster = np.repeat(np.arange(len(sizes)), sizes).astype(np.int32)
    family = kind[cluster]
    n = cluster.size
    centres = [[10.0 * k + rng.normal(0, 0.5), -10.0 * k + rng.normal(0, 0.5)] for k in kind]
    table = pa.table({
        "row": pa.array(np.arange(n), pa.int64()),
        "sample_id": pa.array([f"s{i}" for i in range(n)]),
        "image_key": pa.array([f"img{i}" for i in range(n)]),
        "error_kind": pa.nulls(n, pa.string()),
        "cluster": pa.array(cluster, pa.int32()),
        "cluster_distance": pa.array(rng.random(n)),
        "sc": pa.array(rng.normal(size=n)),
        "im": pa.array(rng.normal(1.0, 0.3, n)),
    })
    return table, family, centres


def test_a_budget_below_the_number_of_clusters_reaches_every_kind():
    table, family, centres = _many_small_clusters(0)
    options = SelectionOptions(budget=4, image_keep=1.0, im_min=None, pt_tail=0, cluster_atypical=0.0)
    plain, _ = select_table(table, options)
    merged, summary = select_table(table, options, cluster_centres=centres)
    # largest remainders over 12 clusters: the 60-cluster, both 30s and a 20; the varied kind gets none
    assert sorted(family[np.asarray(plain.column("selected"))]) == [1, 2, 2, 3]
    # over 4 groups of neighbouring clusters every family gets its slot
    assert sorted(family[np.asarray(merged.column("selected"))]) == [0, 1, 2, 3]
    report = summary["clusters"]
    assert report["merged_targets"] == [1, 1, 1, 1] and "groups of neighbouring clusters" in report["budget"]
    assert {g["group"] for g in report["groups"]} == {0, 1, 2, 3}
    from visa.report.build import _cluster_rows

    shown = {row["cluster"]: row["target"] for row in _cluster_rows(report)}
    group_of = {g["cluster"]: g["group"] for g in report["groups"]}
    assert shown == {c: f"group {g}: 1" for c, g in group_of.items()}  # the report shows the shared target
    assert any("spread over 4 groups" in note for note in summary["notes"])
    # centres that do not fit the clusters (a damaged run.json) leave the budget to largest remainders
    for bad in ([[0.0, 1.0]] * 3, [[0.0, 1.0], [2.0]] * 6, [[float("nan"), 0.0]] * 12):
        again, noted = select_table(table, options, cluster_centres=bad)
        assert sorted(family[np.asarray(again.column("selected"))]) == [1, 2, 2, 3]
        assert any("clusters.centres do not fit" in note for note in noted["notes"])
    # a budget of at least the number of clusters is spread over the clusters themselves
    _, large = select_table(table, options.model_copy(update={"budget": 24}), cluster_centres=centres)
    assert large["clusters"]["merged_targets"] is None and all(g["target"] is not None for g in large["clusters"]["groups"])
