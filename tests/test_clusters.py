"""Content clusters: recovered groups, null handling, weights, determinism, recipe checks, scoring."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from visa.clusters import ClusterError, ClusterSpec, add_clusters, k_grid, typical_rows
from visa.recipe import RecipeError, load_recipe
from visa.report import build_report
from visa.scoring import score
from visa.selection import SelectionOptions, select


def _list_column(matrix: np.ndarray, missing: np.ndarray | None = None) -> pa.Array:
    rows = [None if missing is not None and missing[i] else m.astype(np.float32).tolist()
            for i, m in enumerate(matrix)]
    return pa.array(rows, pa.list_(pa.float32()))


def _groups(n: int, k: int, dim: int, seed: int, spread: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim))
    labels = rng.integers(0, k, n)
    return centres[labels] + spread * rng.normal(size=(n, dim)), labels


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when the two labelings group the rows identically (up to renaming)."""
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def _ids(table: pa.Table) -> np.ndarray:
    return np.asarray(table.column("cluster").to_numpy(zero_copy_only=False))


def test_recovers_groups_and_picks_their_number():
    image, labels = _groups(600, 5, 24, seed=0)
    text = np.random.default_rng(1).normal(size=(600, 16))  # weight 0: must not matter
    table = pa.table({"row": np.arange(600), "img": _list_column(image), "txt": _list_column(text)})
    out, summary = add_clusters(table, ClusterSpec(embeddings=["img", "txt"], weights=[1.0, 0.0], k_min=2))
    assert summary["k"] == 5 and summary["chosen_by"] == "silhouette"
    assert _same_partition(_ids(out), labels)
    assert sum(summary["sizes"]) == 600 and summary["sizes"] == sorted(summary["sizes"], reverse=True)
    distance = np.asarray(out.column("cluster_distance"))
    for cluster, row in enumerate(summary["typical_rows"]):
        members = np.flatnonzero(_ids(out) == cluster)
        assert row == members[np.argmin(distance[members])]


def test_centres_are_kept_in_cluster_id_order():
    image, _ = _groups(300, 4, 12, seed=5)
    table = pa.table({"row": np.arange(300), "img": _list_column(image)})
    out, summary = add_clusters(table, ClusterSpec(embeddings=["img"], k=4, dims=64))  # no PCA: 12 dims
    centres = np.asarray(summary["centres"])
    assert centres.shape == (4, 12)
    unit = image / np.linalg.norm(image, axis=1, keepdims=True)
    ids = _ids(out)
    # every row is nearest to the centre of its own cluster, at the distance recorded for it
    assert (np.linalg.norm(unit[:, None, :] - centres[None], axis=2).argmin(axis=1) == ids).all()
    gaps = np.linalg.norm(unit - centres[ids], axis=1)
    assert np.allclose(gaps, np.asarray(out.column("cluster_distance")), atol=1e-4)


def test_weights_decide_which_embedding_groups_the_rows():
    image, by_image = _groups(300, 3, 12, seed=2)
    text, by_text = _groups(300, 4, 12, seed=3)
    table = pa.table({"img": _list_column(image), "txt": _list_column(text)})
    follow_image, _ = add_clusters(table, ClusterSpec(embeddings=["img", "txt"], weights=[1, 0], k=3))
    follow_text, _ = add_clusters(table, ClusterSpec(embeddings=["img", "txt"], weights=[0, 1], k=4))
    assert _same_partition(_ids(follow_image), by_image)
    assert _same_partition(_ids(follow_text), by_text)
    assert not _same_partition(_ids(follow_image), by_text)


def test_rows_without_embeddings_or_with_errors_get_null():
    matrix, _ = _groups(80, 2, 8, seed=4)
    missing = np.zeros(80, dtype=bool)
    missing[[3, 7]] = True
    other = [m.astype(np.float32).tolist() for m in matrix]
    other[10] = [1.0, 2.0]  # wrong length
    other[11] = [float("nan")] * 8  # not finite
    other[12] = [0.0] * 8  # no direction
    errors = [None] * 80
    errors[20] = "agent"
    table = pa.table({"a": _list_column(matrix, missing), "b": pa.array(other, pa.list_(pa.float32())),
                      "error_kind": pa.array(errors, pa.string())})
    out, summary = add_clusters(table, ClusterSpec(embeddings=["a", "b"], k=2))
    nulls = set(np.flatnonzero(np.asarray(out.column("cluster").is_null())).tolist())
    assert nulls == {3, 7, 10, 11, 12, 20}
    assert out.column("cluster_distance").null_count == 6
    assert summary["unclustered"] == 6 and summary["rows"] == 74


def test_same_table_same_clusters():
    matrix, _ = _groups(400, 6, 20, seed=5, spread=1.0)
    table = pa.table({"a": _list_column(matrix)})
    spec = ClusterSpec(embeddings=["a"], fit_rows=150, chunk_rows=64)
    first, s1 = add_clusters(table, spec)
    second, s2 = add_clusters(table, spec)
    assert first.column("cluster").equals(second.column("cluster"))
    assert first.column("cluster_distance").equals(second.column("cluster_distance"))
    assert s1["sizes"] == s2["sizes"]


@pytest.mark.parametrize("rows", [0, 1, 5])
def test_tiny_pools_get_one_cluster_or_none(rows):
    matrix = np.random.default_rng(6).normal(size=(rows, 4))
    table = pa.table({"a": _list_column(matrix) if rows else pa.array([], pa.list_(pa.float32()))})
    out, summary = add_clusters(table, ClusterSpec(embeddings=["a"]))
    assert out.num_rows == rows
    assert summary["k"] == (1 if rows else 0)
    assert set(_ids(out).tolist()) <= {0}


def test_bad_columns_are_one_line_errors():
    table = pa.table({"a": pa.array([1.0, 2.0])})
    with pytest.raises(ClusterError, match="no embedding column 'b'"):
        add_clusters(table, ClusterSpec(embeddings=["b"]))
    with pytest.raises(ClusterError, match="not a list of numbers"):
        add_clusters(table, ClusterSpec(embeddings=["a"]))
    with pytest.raises(ValueError, match="one weight per embedding"):
        ClusterSpec(embeddings=["a", "b"], weights=[1.0])


def test_k_grid_respects_size_limits():
    spec = ClusterSpec(k_min=4, k_max=64, min_cluster_size=8)
    assert k_grid(10, spec) == [1]
    assert k_grid(40, spec) == [4, 5]
    grid = k_grid(100_000, spec)
    assert grid[:7] == [4, 5, 6, 7, 8, 9, 10] and grid[-1] == 64 and grid == sorted(set(grid))


def test_typical_rows_nearest_to_centre():
    ids = np.array([0, 0, 1, 1, 1, 0])
    distance = np.array([0.5, 0.2, 0.9, 0.1, 0.3, 0.2])
    present = np.array([True, True, True, False, True, True])
    assert typical_rows(ids, distance, present, 3).tolist() == [1, 4, -1]


def test_recipe_checks_the_embedding_columns(tmp_path):
    assert load_recipe("embedded").clusters is not None
    bad = tmp_path / "bad.yaml"
    bad.write_text("scores:\n  sc:\n    agents: [{name: felzenszwalb, type: felzenszwalb}]\n"
                   "clusters: {embeddings: [im.similarity.text_embeding]}\n")
    with pytest.raises(RecipeError, match="no agent of the recipe writes 'im.similarity.text_embeding'"):
        load_recipe(bad)


def test_scoring_writes_cluster_columns_and_run_summary(tmp_path):
    """Two colours of image, several samples each: the clusters follow the colour."""
    (tmp_path / "img").mkdir()
    records = []
    for i in range(12):
        colour = (200 + i, 20, 30) if i % 2 else (20, 30, 200 + i)
        Image.new("RGB", (32, 24), colour).save(tmp_path / "img" / f"{i}.png")
        for j in range(2):
            records.append({"id": f"s{i}-{j}", "image": f"img/{i}.png",
                            "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                              {"from": "gpt", "value": f"answer {j}"}]})
    records.append({"id": "text", "conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]})
    (tmp_path / "data.json").write_text(json.dumps(records))
    (tmp_path / "r.yaml").write_text(
        "execution: {shard_size: 8}\nscores:\n  look:\n    agents: [{name: colour, type: 'agents_for_tests:MeanColour'}]\n"
        "clusters: {embeddings: [look.colour.embedding], k_min: 2, min_cluster_size: 4}\n"
    )
    record = score(load_recipe(tmp_path / "r.yaml"), tmp_path / "data.json", tmp_path / "run")
    table = pq.read_table(tmp_path / "run" / "scores.parquet")
    ids = table.column("cluster").to_pylist()
    assert ids[-1] is None  # the text-only sample has no embedding
    reds = {ids[k] for k in range(24) if (k // 2) % 2}
    blues = {ids[k] for k in range(24) if not (k // 2) % 2}
    assert len(reds) == len(blues) == 1 and reds != blues
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["clusters"]["k"] == 2 and run["clusters"]["sizes"] == [12, 12] == record["clusters"]["sizes"]

    # selection spreads the budget over both colours; the report shows each cluster with an example
    result = select(tmp_path / "run", SelectionOptions(budget=8), write_records=False)
    groups = {g["cluster"]: g for g in result.summary["clusters"]["groups"]}
    assert {groups["0"]["selected"], groups["1"]["selected"]} == {4}
    html = build_report(tmp_path / "run").read_text()
    assert "Content clusters" in html and html.count('alt="example of cluster') == 2


def test_typicality_finds_the_rows_whose_image_does_not_fit_their_questions():
    rng = np.random.default_rng(7)
    text, kind = _groups(400, 4, 16, seed=5, spread=0.2)  # the questions define four kinds of task
    image_centres = rng.normal(size=(4, 24))
    image = image_centres[kind] + 0.3 * rng.normal(size=(400, 24))
    misplaced = rng.choice(400, 20, replace=False)
    image[misplaced] = image_centres[(kind[misplaced] + 1) % 4] + 0.3 * rng.normal(size=(20, 24))
    table = pa.table({"row": np.arange(400), "img": _list_column(image), "txt": _list_column(text)})
    out, _ = add_clusters(table, ClusterSpec(embeddings=["img", "txt"], weights=[1.0, 3.0], k=4))
    assert _same_partition(_ids(out), kind)  # the questions win: misplaced rows stay with their kind
    typicality = np.asarray(out.column("cluster_typicality"))
    others = np.setdiff1d(np.arange(400), misplaced)
    assert typicality[misplaced].max() < typicality[others].min()
    assert np.all(typicality <= 1.0 + 1e-6) and np.all(typicality >= -1.0 - 1e-6)


def test_typicality_of_another_column_and_its_nulls():
    image, kind = _groups(120, 3, 8, seed=9)
    other = np.vstack([np.ones((60, 5)), -np.ones((60, 5))])
    missing = np.zeros(120, dtype=bool)
    missing[[3, 50]] = True
    table = pa.table({"img": _list_column(image), "tags": _list_column(other, missing)})
    out, _ = add_clusters(table, ClusterSpec(embeddings=["img"], typicality="tags", k=3))
    typicality = out.column("cluster_typicality")
    assert typicality.null_count == 2 and not typicality[3].is_valid and not typicality[50].is_valid
    with pytest.raises(ClusterError, match="no typicality column 'tagz'"):
        add_clusters(table, ClusterSpec(embeddings=["img"], typicality="tagz", k=3))
