"""Score families are defined once; fusion, selection, report and the noise benchmark agree with them."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from visa import families as fam
from visa.fusion import fuse_scores, score_families


def test_the_method_families_and_what_derives_from_them():
    assert list(fam.FAMILIES) == ["sc", "oa", "dp", "pt", "im", "image"]
    assert fam.VISUAL_FAMILIES == ("sc", "oa", "dp")
    assert fam.SCORE_FAMILIES == ("sc", "oa", "dp", "pt", "im")
    assert {n: s.unit for n, s in fam.FAMILIES.items()} == {
        "sc": "image", "oa": "image", "dp": "image", "pt": "sample", "im": "sample", "image": "image"
    }
    assert [n for n, s in fam.FAMILIES.items() if s.direction < 0] == ["pt"]
    assert not fam.is_score("image") and not fam.is_score("meta") and fam.is_score("custom")
    unknown = fam.spec("custom")
    assert (unknown.unit, unknown.role, unknown.direction, unknown.title) == ("sample", "instruction", 1, "custom")
    assert sorted(["custom", "im", "image", "aaa", "sc"], key=fam.order_key) == ["sc", "im", "image", "aaa", "custom"]


@pytest.mark.parametrize(
    ("column", "parts"),
    [
        ("sc.felzenszwalb", ("sc", "felzenszwalb")),
        ("im.answer_likelihood", ("im", "answer_likelihood")),
        ("sc.felzenszwalb.regions", None),  # an auxiliary field, not a score column
        ("SC.x", None),  # recipes only allow lower-case names
        ("sc", None),
        ("meta.source", ("meta", "source")),
    ],
)
def test_one_column_name_rule(column: str, parts):
    assert fam.split_agent_column(column) == parts
    if parts:
        assert fam.agent_column(*parts) == column


def test_families_from_columns_and_from_agents_agree_on_a_run():
    columns = [
        ("row", True), ("meta.turns", True), ("image.stats", True), ("sc.a", True), ("sc.a.regions", True),
        ("sc.b", True), ("oa.t", True), ("dp.j.text", False), ("custom.x", True), ("im", True),
    ]
    assert fam.families_from_columns(columns) == {"sc": ["sc.a", "sc.b"], "oa": ["oa.t"], "custom": ["custom.x"]}
    assert "image" in fam.families_from_columns(columns, scores_only=False)
    agents = [
        {"column": "sc.a", "score": "sc", "unit": "image"},
        {"column": "sc.b", "score": "sc", "unit": "image"},
        {"column": "oa.t", "score": "oa", "unit": "sample"},  # the run's record wins over the default
        {"column": "image.stats", "score": "image", "unit": "image"},
        {"column": "custom.x", "score": "custom", "unit": "pixel"},  # not a unit: the default applies
        {"column": "gone.y", "score": "gone", "unit": "sample"},  # not in the table
    ]
    families, units = fam.families_from_agents(agents, dict(columns))
    assert families == {"sc": ["sc.a", "sc.b"], "oa": ["oa.t"], "custom": ["custom.x"]}
    assert units == {"sc": "image", "oa": "sample", "gone": "sample"}


def test_fusion_takes_units_and_families_from_the_family_specs():
    rng = np.random.default_rng(0)
    n = 60
    keys = [f"img{i % 20}" for i in range(n)]  # 20 images, three samples each
    base = rng.normal(size=20)
    per_image = np.array([base[i % 20] for i in range(n)])
    table = pa.table(
        {
            "row": np.arange(n),
            "image_key": keys,
            "sc.a": per_image + rng.normal(scale=0.1, size=n),
            "sc.b": per_image,
            "image.stats": rng.normal(size=n),  # descriptive: never fused
            "custom.x": rng.normal(size=n),
            "custom.y": rng.normal(size=n),
        }
    )
    assert set(score_families(table.schema)) == {"sc", "custom"}
    _, reports = fuse_scores(table)
    assert reports["sc"]["unit"] == "image" and reports["sc"]["calibration_pool"] == 20
    assert reports["custom"]["unit"] == "sample" and reports["custom"]["calibration_pool"] == n


def test_report_and_noise_benchmark_read_titles_and_directions_from_the_specs():
    from visa.bench.noise import _direction, signal_columns
    from visa.report.data import Family

    for name, spec in fam.FAMILIES.items():
        family = Family(name, spec.unit, name, [])
        assert (family.title, family.hint) == (spec.title, spec.hint)
    assert _direction("pt.perplexity")[0] is True and _direction("im.x")[0] is False
    table = pa.table({"sc": [1.0], "pt": [1.0], "image.stats": [1.0], "sc.a": [1.0], "note": ["x"]})
    assert signal_columns(table) == ["sc", "pt", "sc.a"]
