"""Shapley fusion of agents (visa.fusion)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pyarrow as pa
import pytest

from visa.fusion import FusionError, fuse_scores, score_families, shapley_exact, shapley_sampled


def brute_force_shapley(z: np.ndarray) -> np.ndarray:
    """Shapley values by the textbook subset formula, with Pearson computed on the data itself."""
    n = z.shape[1]
    target = z.mean(axis=1)

    def v(coalition: tuple[int, ...]) -> float:
        if not coalition:
            return 0.0
        return float(np.corrcoef(z[:, list(coalition)].mean(axis=1), target)[0, 1])

    phi = np.zeros(n)
    for j in range(n):
        others = [k for k in range(n) if k != j]
        for size in range(n):
            coef = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            for coalition in itertools.combinations(others, size):
                phi[j] += coef * (v(coalition + (j,)) - v(coalition))
    return phi


def correlated(rng: np.random.Generator, m: int, noise: list[float]) -> np.ndarray:
    """Columns = a common signal plus independent noise of the given scales."""
    signal = rng.normal(size=m)
    return np.column_stack([signal + s * rng.normal(size=m) for s in noise])


def sample_table(values: np.ndarray, family: str = "im", errors: np.ndarray | None = None) -> pa.Table:
    m, n = values.shape
    cols: dict[str, pa.Array] = {
        "row": pa.array(np.arange(m), pa.int64()),
        "error_kind": pa.array(
            [("agent" if errors is not None and errors[i] else None) for i in range(m)], pa.string()
        ),
    }
    for j in range(n):
        col = values[:, j]
        cols[f"{family}.a{j}"] = pa.array(col, pa.float64(), mask=np.isnan(col))
    return pa.table(cols)


def test_exact_matches_brute_force_on_random_data():
    rng = np.random.default_rng(7)
    values = correlated(rng, 400, [0.2, 0.5, 1.0, 2.0, 4.0])
    values[:, 3] = -0.5 * values[:, 3] + rng.normal(size=400)  # a partly anti-correlated agent
    table, report = fuse_scores(sample_table(values), calibration_size=10_000)
    weights = np.array([report["im"]["weights"][f"im.a{j}"] for j in range(5)])
    z = (values - values.mean(axis=0)) / values.std(axis=0, ddof=1)
    expected = brute_force_shapley(z)
    assert report["im"]["exact"] is True
    assert report["im"]["calibration_size"] == 400
    np.testing.assert_allclose(weights, expected / expected.sum(), atol=1e-10)
    np.testing.assert_allclose(expected.sum(), 1.0, atol=1e-10)  # efficiency: sum(phi) = v(all) = 1
    fused = table.column("im").to_numpy()
    np.testing.assert_allclose(fused, z @ weights, atol=1e-10)


def test_shapley_exact_on_correlation_matrix_matches_brute_force():
    rng = np.random.default_rng(3)
    values = correlated(rng, 300, [0.1, 1.0, 3.0, 0.7])
    z = (values - values.mean(axis=0)) / values.std(axis=0, ddof=1)
    np.testing.assert_allclose(
        shapley_exact(np.corrcoef(z, rowvar=False)), brute_force_shapley(z), atol=1e-10
    )


@pytest.mark.parametrize("n_agents", [1, 2, 3, 6])
def test_weights_sum_to_one(n_agents: int):
    rng = np.random.default_rng(n_agents)
    values = correlated(rng, 200, list(np.linspace(0.1, 3.0, n_agents)))
    _, report = fuse_scores(sample_table(values))
    assert sum(report["im"]["weights"].values()) == pytest.approx(1.0, abs=1e-12)
    json.dumps(report)  # the report goes into run.json


def test_identical_agents_get_equal_weights_and_noise_gets_less():
    rng = np.random.default_rng(11)
    base = correlated(rng, 500, [0.3, 0.3])
    noise = rng.normal(size=(500, 1))
    values = np.column_stack([base[:, 0], base[:, 0], base[:, 1], noise])
    _, report = fuse_scores(sample_table(values))
    w = report["im"]["weights"]
    assert w["im.a0"] == pytest.approx(w["im.a1"], abs=1e-12)
    assert w["im.a3"] < 0.5 * min(w["im.a0"], w["im.a2"])


def test_constant_and_all_null_agents_get_zero_weight():
    rng = np.random.default_rng(5)
    good = correlated(rng, 300, [0.4, 0.8])
    values = np.column_stack([good, np.full(300, 3.0), np.full(300, np.nan)])
    table, report = fuse_scores(sample_table(values))
    family = report["im"]
    assert family["weights"]["im.a2"] == 0.0 and family["weights"]["im.a3"] == 0.0
    assert family["excluded"] == {"im.a2": "constant", "im.a3": "all null"}
    assert sum(family["weights"].values()) == pytest.approx(1.0)
    _, alone = fuse_scores(sample_table(good))
    assert family["weights"]["im.a0"] == pytest.approx(alone["im"]["weights"]["im.a0"])
    assert not np.isnan(table.column("im").to_numpy()).any()


def test_family_without_usable_agent_fuses_to_null():
    values = np.column_stack([np.full(50, 1.0), np.full(50, np.nan)])
    table, report = fuse_scores(sample_table(values))
    assert table.column("im").null_count == 50
    assert set(report["im"]["excluded"]) == {"im.a0", "im.a1"}


def test_single_agent_has_weight_one_and_fused_is_its_z_score():
    rng = np.random.default_rng(2)
    x = rng.normal(5.0, 2.0, size=(120, 1))
    table, report = fuse_scores(sample_table(x, family="pt"))
    assert report["pt"]["weights"] == {"pt.a0": 1.0}
    np.testing.assert_allclose(
        table.column("pt").to_numpy(), (x[:, 0] - x.mean()) / x.std(ddof=1), atol=1e-12
    )


def test_rows_with_null_agents_are_fused_over_the_available_agents():
    rng = np.random.default_rng(9)
    values = correlated(rng, 200, [0.2, 0.6, 1.5])
    values[0, 1] = np.nan
    values[1, [0, 1]] = np.nan
    values[2, :] = np.nan
    table, report = fuse_scores(sample_table(values))
    family = report["im"]
    assert family["calibration_size"] == 197  # complete rows only
    w = np.array([family["weights"][f"im.a{j}"] for j in range(3)])
    mu = np.array([family["standardisation"][f"im.a{j}"]["mean"] for j in range(3)])
    sd = np.array([family["standardisation"][f"im.a{j}"]["std"] for j in range(3)])
    z = (values - mu) / sd
    fused = table.column("im").to_pylist()
    assert fused[0] == pytest.approx((w[0] * z[0, 0] + w[2] * z[0, 2]) / (w[0] + w[2]))
    assert fused[1] == pytest.approx(z[1, 2])
    assert fused[2] is None


def test_monte_carlo_is_close_to_exact_within_reported_stderr():
    rng = np.random.default_rng(13)
    values = correlated(rng, 300, list(np.linspace(0.2, 4.0, 13)))
    _, exact = fuse_scores(sample_table(values), exact_max_agents=13)
    _, sampled = fuse_scores(sample_table(values), permutations=300, seed=1)
    assert exact["im"]["exact"] is True and sampled["im"]["exact"] is False
    assert sampled["im"]["permutations"] == 300
    assert sum(sampled["im"]["weights"].values()) == pytest.approx(1.0, abs=1e-9)
    for agent, w in exact["im"]["weights"].items():
        se = sampled["im"]["stderr"][agent]
        assert 0 < se < 0.05
        # 5 standard errors: a false failure has probability ~1e-6 per agent
        assert abs(sampled["im"]["weights"][agent] - w) <= 5 * se + 1e-9


def test_sampled_shapley_is_deterministic_for_a_seed():
    corr = np.corrcoef(correlated(np.random.default_rng(0), 100, [0.5] * 14), rowvar=False)
    a, sa = shapley_sampled(corr, permutations=64, seed=4)
    b, sb = shapley_sampled(corr, permutations=64, seed=4)
    assert np.array_equal(a, b) and np.array_equal(sa, sb)
    assert a.sum() == pytest.approx(1.0)


def test_calibration_is_a_seeded_sample_of_error_free_rows():
    rng = np.random.default_rng(21)
    values = correlated(rng, 3000, [0.3, 0.9])
    errors = np.zeros(3000, dtype=bool)
    errors[:100] = True
    values[:100] = 1e6  # error rows must not leak into the standardisation
    table = sample_table(values, errors=errors)
    t1, r1 = fuse_scores(table, calibration_size=500, seed=3)
    t2, r2 = fuse_scores(table, calibration_size=500, seed=3)
    _, r3 = fuse_scores(table, calibration_size=500, seed=4)
    assert r1 == r2 and t1.equals(t2)
    assert r1["im"]["calibration_size"] == 500 and r1["im"]["calibration_pool"] == 2900
    assert r1["im"]["standardisation"] != r3["im"]["standardisation"]
    assert abs(r1["im"]["standardisation"]["im.a0"]["mean"]) < 0.5


def test_image_level_family_calibrates_over_unique_images():
    # image "big" is shared by 500 samples with a high score; 50 other images once each
    rng = np.random.default_rng(4)
    other = rng.normal(size=(50, 2))
    keys = ["big"] * 500 + [f"img{i}" for i in range(50)] + [None] * 10
    values = np.vstack([np.tile([[10.0, 11.0]], (500, 1)), other, np.full((10, 2), np.nan)])
    table = pa.table(
        {
            "row": pa.array(np.arange(560), pa.int64()),
            "image_key": pa.array(keys, pa.string()),
            "error_kind": pa.nulls(560, pa.string()),
            "sc.a": pa.array(values[:, 0], mask=np.isnan(values[:, 0])),
            "sc.b": pa.array(values[:, 1], mask=np.isnan(values[:, 1])),
        }
    )
    fused, report = fuse_scores(table)
    assert report["sc"]["unit"] == "image"
    assert report["sc"]["calibration_pool"] == 51
    unique = np.vstack([[10.0, 11.0], other])
    assert report["sc"]["standardisation"]["sc.a"]["mean"] == pytest.approx(unique[:, 0].mean())
    assert fused.column("sc").null_count == 10
    # the same image gets the same fused value on every sample
    assert len(set(fused.column("sc").to_pylist()[:500])) == 1
    _, as_samples = fuse_scores(table, units={"sc": "sample"})
    assert as_samples["sc"]["calibration_pool"] == 550


def test_score_families_reads_agent_columns_only():
    schema = pa.schema(
        [
            ("row", pa.int64()),
            ("meta.source", pa.string()),
            ("meta.turns", pa.int64()),
            ("image.stats", pa.float64()),
            ("sc.felzenszwalb", pa.float64()),
            ("sc.felzenszwalb.regions", pa.int64()),
            ("sc.ocr_text", pa.float64()),
            ("oa.tagger", pa.float64()),
            ("oa.tagger.labels", pa.list_(pa.string())),
            ("dp.judge.text", pa.string()),
            ("im", pa.float64()),
        ]
    )
    assert score_families(schema) == {"sc": ["sc.felzenszwalb", "sc.ocr_text"], "oa": ["oa.tagger"]}


def test_existing_fused_column_is_replaced_and_bad_input_is_a_clear_error():
    rng = np.random.default_rng(1)
    table = sample_table(correlated(rng, 50, [0.5, 0.5])).append_column("im", pa.array(np.zeros(50)))
    fused, _ = fuse_scores(table)
    assert fused.column_names.count("im") == 1 and fused.column("im").to_numpy().std() > 0
    with pytest.raises(FusionError, match="no column im.zz"):
        fuse_scores(table, {"im": ["im.zz"]})
    bad = pa.table({"row": pa.array([0, 1]), "im.a": pa.array(["x", "y"])})
    with pytest.raises(FusionError, match="not numeric"):
        fuse_scores(bad, {"im": ["im.a"]})
    with pytest.raises(FusionError, match="unit must be"):
        fuse_scores(table, units={"im": "pixel"})
