"""The image gate and the typicality cut in the selection: what they drop, and what the clusters'
budget shares count afterwards."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from visa.selection import SelectionError, SelectionOptions, select_table


def pool(n_per: int = 40, seed: int = 0) -> tuple[pa.Table, np.ndarray]:
    """Three clusters of one row per image; cluster 2 holds only damaged images (guard value 0)."""
    rng = np.random.default_rng(seed)
    cluster = np.repeat([0, 1, 2], n_per).astype(np.int32)
    n = cluster.size
    guard = np.where(cluster == 2, 0.0, 1.0)
    guard[5] = 0.0  # one damaged image among the clean ones of cluster 0
    typicality = rng.uniform(0.6, 0.9, n)
    typicality[[10, 11, 50]] = [0.05, 0.1, 0.0]  # conversations on the wrong image
    table = pa.table({
        "row": pa.array(np.arange(n), pa.int64()),
        "sample_id": pa.array([f"s{i}" for i in range(n)]),
        "image_key": pa.array([f"img{i}" for i in range(n)]),
        "error_kind": pa.nulls(n, pa.string()),
        "cluster": pa.array(cluster),
        "cluster_distance": pa.array(rng.random(n)),
        "cluster_typicality": pa.array(typicality),
        "sc.guard": pa.array(guard),
        "sc": pa.array(rng.normal(size=n) + (cluster == 2)),  # damaged images look busy
        "im": pa.array(rng.uniform(0.1, 1.0, n)),
    })
    return table, cluster


def reasons(out: pa.Table) -> np.ndarray:
    return np.array(out.column("reason").to_pylist(), dtype=object)


def test_gated_rows_go_first_and_claim_no_budget_share() -> None:
    table, cluster = pool()
    options = SelectionOptions(budget=30, image_gate={"sc.guard": 1.0}, im_min=None, pt_tail=0, cluster_atypical=0)
    out, summary = select_table(table, options)
    why = reasons(out)
    assert set(np.flatnonzero(why == "image_gate")) == set(np.flatnonzero(cluster == 2)) | {5}
    assert summary["images"]["unique"] == 120 - 41  # the image cut ranks only the images that passed
    selected = np.asarray(out.column("selected"))
    assert selected.sum() == 30 and not selected[cluster == 2].any()
    targets = {g["cluster"]: g["target"] for g in summary["clusters"]["groups"]}
    assert targets["2"] == 0 and targets["0"] + targets["1"] == 30
    assert any("image gate: 41 rows dropped (sc.guard < 1: 41)" in note for note in summary["notes"])
    # without clusters the gate applies all the same
    off, _ = select_table(table, options.model_copy(update={"clusters": "off"}))
    assert (reasons(off) == "image_gate").sum() == 41


def test_without_a_gate_the_damaged_cluster_takes_its_share() -> None:
    table, cluster = pool()
    out, _ = select_table(table, SelectionOptions(budget=30, im_min=None, pt_tail=0, cluster_atypical=0))
    assert np.asarray(out.column("selected"))[cluster == 2].sum() == 10


def test_a_gate_column_must_exist() -> None:
    table, _ = pool()
    with pytest.raises(SelectionError, match="did you mean 'sc.guard'"):
        select_table(table, SelectionOptions(budget=30, image_gate={"sc.gaurd": 1.0}))


def test_each_cluster_drops_its_least_typical_rows() -> None:
    table, cluster = pool()
    options = SelectionOptions(budget=None, im_min=None, pt_tail=0, image_keep=1.0, cluster_atypical=0.1)
    out, _ = select_table(table, options)
    atypical = np.flatnonzero(reasons(out) == "atypical")
    assert {10, 11, 50} <= set(atypical)
    assert np.array_equal(np.bincount(cluster[atypical], minlength=3), [4, 4, 4])  # 10% of 40 each
    # after the gate: cluster 2 is gone, cluster 0 has 39 rows left -> drops 4 of them
    gated = options.model_copy(update={"image_gate": {"sc.guard": 1.0}})
    out, _ = select_table(table, gated)
    assert np.array_equal(np.bincount(cluster[reasons(out) == "atypical"], minlength=3), [4, 4, 0])
    # the cut is a cluster rule: off without clusters or without the column
    off, _ = select_table(table, options.model_copy(update={"clusters": "off"}))
    assert not (reasons(off) == "atypical").any()
    plain, _ = select_table(table.drop_columns(["cluster_typicality"]), options)
    assert not (reasons(plain) == "atypical").any()
