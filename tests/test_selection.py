"""Two-stage ViSA selection (visa.selection) over synthetic score tables and run folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from visa.fusion import fuse_scores
from visa.selection import (
    REASONS,
    SelectionError,
    SelectionOptions,
    _descending,
    _top,
    llamafactory_entry,
    percentile_ranks,
    rank_within_groups,
    resolve_options,
    select,
    select_table,
)

SOURCES = ["coco", "ocr", "chart", "science", "rare"]


def score_table(
    n: int = 1000, n_images: int = 240, seed: int = 0, families=("sc", "oa", "dp", "im", "pt")
) -> pa.Table:
    """A score table shaped like scores.parquet: errors, text-only rows, shared images, duplicates."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, n_images, n)
    image[1:40:2] = image[0:39:2]  # rows 2i and 2i+1 (i < 20) share an image...
    text_only = rng.random(n) < 0.05
    text_only[:40] = False
    error = rng.random(n) < 0.03
    keys = np.array([f"img{i:04d}" for i in image], dtype=object)
    keys[text_only] = None
    text_hash = np.array([f"t{i}" for i in range(n)], dtype=object)
    text_hash[1:40:2] = text_hash[0:39:2]  # ...and their conversation: 20 exact duplicates
    quality = rng.normal(size=n_images)
    source = rng.choice(len(SOURCES), size=n, p=[0.4, 0.3, 0.15, 0.13, 0.02])
    cols: dict[str, pa.Array] = {
        "row": pa.array(np.arange(n), pa.int64()),
        "line": pa.array(np.arange(n) + 1, pa.int64()),
        "sample_id": pa.array([f"s{i}" for i in range(n)], pa.string()),
        "image_key": pa.array(keys.tolist(), pa.string()),
        "error_kind": pa.array(["agent" if e else None for e in error], pa.string()),
        "error": pa.array(["agent sc.a: boom" if e else None for e in error], pa.string()),
        "meta.source": pa.array([SOURCES[s] for s in source], pa.string()),
        "text_hash": pa.array(text_hash.tolist(), pa.string()),
    }

    def column(name: str, values: np.ndarray, image_level: bool) -> None:
        values = values.astype(np.float64)
        if image_level:
            values[text_only] = np.nan
        cols[name] = pa.array(values, pa.float64(), mask=np.isnan(values))

    per_image = {f: rng.normal(size=n_images) for f in ("sc", "oa", "dp")}
    if "sc" in families:
        column("sc.felzenszwalb", (quality + 0.5 * per_image["sc"])[image] * 40 + 100, True)
        column("sc.ocr_text", (quality + 0.8 * per_image["oa"])[image] * 3, True)
    if "oa" in families:
        column("oa.tagger", (quality + 0.7 * per_image["oa"])[image], True)
    if "dp" in families:
        column("dp.judge", np.clip(np.round(3 + quality + per_image["dp"]), 1, 5)[image], True)
    im = rng.normal(0.4, 1.0, n)
    if "im" in families:
        column("im.lm", im, False)
        column("im.similarity", im + 0.3 * rng.normal(size=n), False)
    if "pt" in families:
        column("pt.lm", rng.gamma(2.0, 1.0, n), False)
    return pa.table(cols)


def run_select(table: pa.Table, **options) -> tuple[pa.Table, dict, pa.Table]:
    fused, shapley = fuse_scores(table)
    out, summary = select_table(fused, SelectionOptions(**options), shapley=shapley)
    return out, summary, fused


def check_reasons(out: pa.Table, summary: dict) -> None:
    selected = np.asarray(out.column("selected").to_pylist())
    reason = out.column("reason").to_pylist()
    assert all((r is None) == s for r, s in zip(reason, selected))
    assert set(reason) - {None} <= set(REASONS)
    assert sum(summary["dropped"].values()) + summary["selected"] == out.num_rows
    ranks = sorted(r for r in out.column("rank").to_pylist() if r is not None)
    assert ranks == list(range(1, int(selected.sum()) + 1))


def test_budget_half_never_takes_errors_and_explains_every_drop():
    table = score_table()
    out, summary, _ = run_select(table, budget="50%", image_keep=0.9, pt_tail=0.0)
    selected = np.asarray(out.column("selected").to_pylist())
    assert 0 < selected.sum() <= 500
    assert summary["budget_rows"] == 500
    errors = np.asarray(table.column("error_kind").is_valid().to_pylist())
    assert not (selected & errors).any()
    assert out.column("reason").to_pylist().count("error") == errors.sum()
    check_reasons(out, summary)
    assert out.column("row").to_pylist() == list(range(1000))


def test_every_stage_removes_what_it_claims():
    out, summary, fused = run_select(score_table(), budget=150, image_keep=0.5, pt_tail=0.05)
    rows = out.to_pylist()
    reason = [r["reason"] for r in rows]
    visual = np.array([np.nan if r["visual_score"] is None else r["visual_score"] for r in rows])
    # stage 1: every dropped image is below every kept image
    below = [i for i, r in enumerate(reason) if r == "image_below_cut"]
    kept = [
        i for i, r in enumerate(reason) if r not in ("error", "image_below_cut") and not np.isnan(visual[i])
    ]
    assert below and kept and np.nanmax(visual[below]) <= np.nanmin(visual[kept])
    assert summary["images"]["kept"] == round(0.5 * summary["images"]["unique"])
    # stage 2: IM <= 0 in the agents' own unit (Shapley-weighted raw IM)
    im = fused.column("im.lm").to_numpy()
    weights = summary_weights(fused)
    raw = weights[0] * im + weights[1] * fused.column("im.similarity").to_numpy()
    for i, r in enumerate(reason):
        if r == "im_nonpositive":
            assert raw[i] <= 1e-12
        elif r in ("pt_tail", "duplicate", "budget", None):
            assert raw[i] > 0
    # pt tail: the top PT values of the pool
    pt = fused.column("pt").to_numpy()
    tail = [i for i, r in enumerate(reason) if r == "pt_tail"]
    survivors = [i for i, r in enumerate(reason) if r in (None, "budget", "duplicate")]
    assert tail and min(pt[tail]) >= max(pt[survivors])
    # duplicates: same image and conversation as a better-ranked survivor
    assert 0 < summary["dropped"]["duplicate"] <= 20
    # the selected set is the top of the instruction ranking
    chosen = sorted((r for r in rows if r["selected"]), key=lambda r: r["rank"])
    scores = [r["instruction_score"] for r in chosen]
    assert scores == sorted(scores, reverse=True) and len(chosen) == 150
    beyond = [r["instruction_score"] for r in rows if r["reason"] == "budget"]
    assert max(beyond) <= min(scores)
    check_reasons(out, summary)


def summary_weights(fused: pa.Table) -> list[float]:
    _, shapley = fuse_scores(fused)
    return [shapley["im"]["weights"]["im.lm"], shapley["im"]["weights"]["im.similarity"]]


def test_percent_and_count_budgets_agree_and_round_half_up():
    table = score_table()
    by_pct, s_pct, _ = run_select(table, budget="10%")
    by_count, _, _ = run_select(table, budget=100)
    assert s_pct["budget_rows"] == 100
    assert by_pct.equals(by_count)
    assert SelectionOptions(budget="0.05%").budget_rows(1000) == 1  # 0.5 rounds up
    assert SelectionOptions(budget="2.5%").budget_rows(3_200_000) == 80_000
    assert SelectionOptions(budget="80000").budget == 80000
    for bad in ("-1", "150%", "abc", "x%", -3, 1.5):
        with pytest.raises(ValueError, match="budget"):
            SelectionOptions(budget=bad)


def test_no_budget_keeps_every_survivor():
    out, summary, _ = run_select(score_table(), image_keep=1.0)
    assert summary["budget_rows"] is None and summary["dropped"]["budget"] == 0
    assert summary["dropped"]["image_below_cut"] == 0
    check_reasons(out, summary)


def test_proportional_quotas_share_the_budget_by_pool_share():
    table = score_table(n=2000, n_images=600, seed=1)
    out, summary, _ = run_select(table, budget=300, image_keep=0.9, quota_field="meta.source", quota_min=5)
    groups = summary["quota"]["groups"]
    assert sum(g["target"] for g in groups.values()) == 300
    assert sum(g["selected"] for g in groups.values()) == summary["selected"] == 300
    for g in groups.values():
        assert g["selected"] >= min(5, g["survived_filters"])
        if g["survived_filters"] >= g["target"]:
            assert g["selected"] >= g["target"] - 5  # minimums of small groups come out of the big ones
    assert groups["rare"]["selected"] >= 5
    # rows pushed out by quotas are ranked inside the budget; the rest are outside it
    assert summary["dropped"]["quota"] > 0
    selected_source = [
        s
        for s, sel in zip(table.column("meta.source").to_pylist(), out.column("selected").to_pylist())
        if sel
    ]
    assert {s: selected_source.count(s) for s in SOURCES} == {k: v["selected"] for k, v in groups.items()}
    check_reasons(out, summary)


def test_capped_quotas_never_exceed_the_cap():
    table = score_table(n=2000, n_images=600, seed=2)
    out, summary, _ = run_select(
        table, budget=200, image_keep=0.9, quota_field="meta.source", quota_mode="capped", quota_max_share=0.3
    )
    groups = summary["quota"]["groups"]
    assert all(g["selected"] <= 60 and g["cap"] == 60 for g in groups.values())
    assert summary["selected"] == 200
    check_reasons(out, summary)


def test_quota_field_errors_are_clear():
    with pytest.raises(ValueError, match="needs a budget"):
        SelectionOptions(quota_field="meta.source")
    fused, shapley = fuse_scores(score_table())
    with pytest.raises(SelectionError, match="did you mean 'meta.source'"):
        select_table(fused, SelectionOptions(budget=10, quota_field="meta.sourc"), shapley=shapley)


@pytest.mark.parametrize(
    "families, ranked_by",
    [
        (("sc",), "visual_score"),
        (("im",), "instruction_score"),
        (("pt",), "row"),
        ((), "row"),
        (("oa", "pt"), "visual_score"),
    ],
)
def test_missing_families_skip_their_stage(families, ranked_by):
    table = score_table(families=families)
    out, summary, _ = run_select(table, budget=100)
    assert summary["ranked_by"] == ranked_by
    if not {"sc", "oa", "dp"} & set(families):
        assert summary["dropped"]["image_below_cut"] == 0
        assert out.column("visual_score").null_count == out.num_rows
    if "im" not in families:
        assert summary["dropped"]["im_nonpositive"] == 0
    if "pt" not in families:
        assert summary["dropped"]["pt_tail"] == 0
    if ranked_by == "row":
        chosen = [r for r, s in zip(out.column("row").to_pylist(), out.column("selected").to_pylist()) if s]
        assert chosen == sorted(chosen)
    check_reasons(out, summary)


def test_text_only_samples_bypass_or_are_dropped():
    table = score_table()
    text_only = np.asarray(table.column("image_key").is_null().to_pylist()) & np.asarray(
        table.column("error_kind").is_null().to_pylist()
    )
    kept, _, _ = run_select(table)
    reasons = np.array(kept.column("reason").to_pylist(), dtype=object)
    assert "image_below_cut" not in set(reasons[text_only])
    assert any(np.asarray(kept.column("selected").to_pylist())[text_only])
    dropped, s_drop, _ = run_select(table, text_only="drop")
    assert s_drop["dropped"]["text_only"] == text_only.sum()
    check_reasons(dropped, s_drop)


def test_dedupe_and_per_image_cap():
    table = score_table()
    out, _, _ = run_select(table, image_keep=1.0, im_min=None, pt_tail=0.0)
    reason = out.column("reason").to_pylist()
    errors = table.column("error_kind").to_pylist()
    pairs = [(2 * i, 2 * i + 1) for i in range(20) if errors[2 * i] is None and errors[2 * i + 1] is None]
    dup_rows = {i for i, r in enumerate(reason) if r == "duplicate"}
    assert len(dup_rows) == len(pairs)  # exactly one of each clean pair is dropped
    assert all(len(dup_rows & set(p)) == 1 for p in pairs)
    _, s_off, _ = run_select(table, image_keep=1.0, im_min=None, pt_tail=0.0, dedupe=False)
    assert s_off["dropped"]["duplicate"] == 0
    capped, s_cap, _ = run_select(
        table, image_keep=1.0, im_min=None, pt_tail=0.0, dedupe=False, max_per_image=1
    )
    keys = [
        k
        for k, s in zip(table.column("image_key").to_pylist(), capped.column("selected").to_pylist())
        if s and k
    ]
    assert len(keys) == len(set(keys)) and s_cap["dropped"]["duplicate"] > 0
    no_hash = table.drop_columns(["text_hash"])
    _, s_nohash, _ = run_select(no_hash)
    assert s_nohash["dropped"]["duplicate"] == 0 and any("text_hash" in n for n in s_nohash["notes"])


def test_pt_blend_changes_the_ranking_and_visual_weights_apply():
    table = score_table()
    plain, _, _ = run_select(table, budget=100)
    blended, _, _ = run_select(table, budget=100, pt_blend=0.5)
    assert plain.column("selected") != blended.column("selected")
    # families not named keep weight 1, so "only dp" sets the other two to 0
    only_dp, s_dp, fused_dp = run_select(table, budget=100, visual_weights={"dp": 1.0, "sc": 0.0, "oa": 0.0})
    assert s_dp["visual_weights"] == {"dp": 1.0}
    # the visual score is then dp's percentile over unique images
    keys = table.column("image_key").to_pylist()
    errors = table.column("error_kind").to_pylist()
    first = {}
    for i, (k, e) in enumerate(zip(keys, errors)):
        if k is not None and e is None:
            first.setdefault(k, i)
    rows = sorted(first.values())
    expected = percentile_ranks(fused_dp.column("dp").to_numpy()[rows])
    np.testing.assert_allclose(
        np.asarray(only_dp.column("visual_score").to_pylist(), dtype=float)[rows], expected
    )
    with pytest.raises(ValueError, match="at least one visual weight"):
        SelectionOptions(visual_weights={"sc": 0.0, "oa": 0.0, "dp": 0.0})
    fused, shapley = fuse_scores(table)
    with pytest.raises(SelectionError, match="image-level"):
        select_table(fused, SelectionOptions(visual_weights={"im": 1.0}), shapley=shapley)


def test_helpers():
    np.testing.assert_allclose(
        percentile_ranks(np.array([3.0, np.nan, 1.0, 3.0, 2.0])), [0.75, np.nan, 0.125, 0.75, 0.375]
    )
    assert rank_within_groups(np.array([2, 1, 2, 2, 1, 0])).tolist() == [0, 0, 1, 2, 1, 0]
    assert rank_within_groups(np.array([70_000, 5, 70_000])).tolist() == [0, 0, 1]
    values = np.array([1.0, 5.0, np.nan, 5.0, 3.0, 5.0])
    rows = np.array([10, 14, 11, 12, 13, 9])
    assert sorted(_top(values, rows, 2).tolist()) == [3, 5]  # ties at 5.0: lower rows 9 and 12 first
    assert sorted(_top(values, rows, 5).tolist()) == [0, 1, 3, 4, 5]  # NaN last
    assert _top(values, rows, 0).size == 0 and sorted(_top(values, rows, 9).tolist()) == list(range(6))
    assert _descending(values, rows).tolist() == [5, 3, 1, 4, 0, 2]  # lexsort path: rows not ascending
    assert _descending(values, np.arange(6)).tolist() == [1, 3, 5, 4, 0, 2]


# ---------------------------------------------------------------------------------------------
# Run folders
# ---------------------------------------------------------------------------------------------
def make_run(tmp_path: Path, n: int = 400) -> Path:
    """A run folder with a LLaVA JSONL input, scores.parquet and run.json."""
    data = tmp_path / "data.jsonl"
    lines = []
    for i in range(n):
        record = {
            "id": f"s{i}",
            "image": f"images/{i % 97}.jpg",
            "conversations": [
                {"from": "human", "value": f"<image>\nWhat is shown in picture {i}?"},
                {"from": "gpt", "value": f"Answer number {i}."},
            ],
        }
        lines.append(json.dumps(record))
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    table = score_table(n=n, n_images=97)
    pq.write_table(table, run_dir / "scores.parquet")
    agents = [
        {
            "column": c,
            "score": c.split(".")[0],
            "name": c.split(".")[1],
            "unit": "image" if c.split(".")[0] in ("sc", "oa", "dp") else "sample",
        }
        for c in table.column_names
        if c.split(".")[0] in ("sc", "oa", "dp", "im", "pt") and c.count(".") == 1
    ]
    run = {
        "input": {"path": str(data), "format": "jsonl", "image_root": str(tmp_path)},
        "recipe": {"name": "test", "selection": {"budget": "20%", "image_keep": 0.8}},
        "agents": agents,
    }
    (run_dir / "run.json").write_text(json.dumps(run), encoding="utf-8")
    return run_dir


def test_select_writes_selection_table_and_updates_run_json(tmp_path: Path):
    run_dir = make_run(tmp_path)
    result = select(run_dir, write_records=False)
    assert result.summary["options"]["budget"] == "20%"  # from the recipe's selection section
    assert result.summary["budget_rows"] == 80
    table = pq.read_table(run_dir / "selection.parquet")
    assert table.column_names == [
        "row",
        "sample_id",
        "selected",
        "rank",
        "visual_score",
        "instruction_score",
        "reason",
    ]
    assert table.schema.field("rank").type == pa.int64()
    assert table.equals(result.table)
    assert result.selected_rows.tolist() == sorted(
        r for r, s in zip(table.column("row").to_pylist(), table.column("selected").to_pylist()) if s
    )
    run = json.loads((run_dir / "run.json").read_text())
    assert run["selection"]["selected"] == result.summary["selected"]
    assert set(run["shapley"]) == {"sc", "oa", "dp", "im", "pt"}
    assert run["shapley"]["sc"]["unit"] == "image"
    assert run["input"]["format"] == "jsonl"  # the rest of run.json is kept


def test_select_is_byte_identical_across_runs(tmp_path: Path):
    run_dir = make_run(tmp_path)
    options = SelectionOptions(budget=60, quota_field="meta.source")
    select(run_dir, options, write_records=False)
    first = (run_dir / "selection.parquet").read_bytes()
    first_run = (run_dir / "run.json").read_bytes()
    select(run_dir, options, write_records=False)
    assert (run_dir / "selection.parquet").read_bytes() == first
    assert (run_dir / "run.json").read_bytes() == first_run


def test_select_copies_records_and_writes_llamafactory_entry(tmp_path: Path):
    pytest.importorskip("visa.readers")
    run_dir = make_run(tmp_path)
    result = select(run_dir, SelectionOptions(budget=50))
    assert result.subset_path == run_dir / "selected.jsonl"
    source = (tmp_path / "data.jsonl").read_text().splitlines()
    written = result.subset_path.read_text().splitlines()
    assert written == [source[r] for r in result.selected_rows]
    info = json.loads((run_dir / "dataset_info.json").read_text())
    assert info == {
        "visa_selected": {
            "file_name": "selected.jsonl",
            "formatting": "sharegpt",
            "columns": {"messages": "conversations", "images": "image"},
            "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"},
        }
    }
    first = result.subset_path.read_bytes()
    select(run_dir, SelectionOptions(budget=50))
    assert result.subset_path.read_bytes() == first


def test_llamafactory_entry_follows_openai_dialect(tmp_path: Path):
    path = tmp_path / "selected.json"
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "<image>What is it?"},
            {"role": "assistant", "content": "A cat."},
        ],
        "images": ["a.jpg"],
    }
    path.write_text(json.dumps([record]))
    entry, notes = llamafactory_entry(path, tmp_path)
    assert entry["visa_selected"]["columns"] == {"messages": "messages", "images": "images"}
    assert entry["visa_selected"]["tags"] == {
        "role_tag": "role",
        "content_tag": "content",
        "user_tag": "user",
        "assistant_tag": "assistant",
        "system_tag": "system",
    }
    assert notes == []
    parquet = tmp_path / "selected.parquet"
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in record.items() if k != "images"}]), parquet)
    entry, _ = llamafactory_entry(parquet, tmp_path)
    assert "images" not in entry["visa_selected"]["columns"]


def test_bad_run_folders_and_options_are_clear_errors(tmp_path: Path):
    with pytest.raises(SelectionError, match="no run.json"):
        select(tmp_path)
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(SelectionError, match="not readable JSON"):
        select(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"input": {"path": "x.jsonl", "format": "jsonl"}}))
    with pytest.raises(SelectionError, match="no scores.parquet"):
        select(tmp_path)
    with pytest.raises(SelectionError, match="image_keep"):
        resolve_options({"recipe": {"selection": {"image_keep": 2}}})
    with pytest.raises(SelectionError, match="unknown|Extra inputs"):
        resolve_options({}, {"budgett": 5})
    opts = resolve_options(
        {"recipe": {"selection": {"budget": 10, "pt_tail": 0.1}}}, {"budget": "5%", "seed": None}
    )
    assert opts.budget == "5%" and opts.pt_tail == 0.1 and opts.seed == 0


def test_options_accept_command_line_text():
    opts = resolve_options(
        {"recipe": {"selection": {"budget": 10, "im_min": 0.5, "max_per_image": 3}}},
        {
            "budget": "all",
            "im_min": "off",
            "max_per_image": "none",
            "visual_weights": "sc=1, dp=2.5",
            "image_keep": "0.3",
        },
    )
    assert opts.budget is None and opts.im_min is None and opts.max_per_image is None
    assert opts.visual_weights == {"sc": 1.0, "dp": 2.5} and opts.image_keep == 0.3
    with pytest.raises(SelectionError, match="sc=1,oa=1,dp=2"):
        resolve_options({}, {"visual_weights": "sc:1"})
    with pytest.raises(SelectionError, match="text_only"):
        resolve_options({}, {"text_only": "maybe"})


def test_select_refuses_an_input_changed_since_scoring(tmp_path: Path):
    readers = pytest.importorskip("visa.readers")
    run_dir = make_run(tmp_path)
    run = json.loads((run_dir / "run.json").read_text())
    run["input"]["fingerprint"] = readers.open_input(run["input"]["path"]).fingerprint()
    (run_dir / "run.json").write_text(json.dumps(run))
    assert select(run_dir, SelectionOptions(budget=5)).subset_path is not None
    with (tmp_path / "data.jsonl").open("a") as f:
        f.write(json.dumps({"id": "late", "conversations": []}) + "\n")
    (run_dir / "selection.parquet").unlink()
    with pytest.raises(SelectionError, match="changed since it was scored"):
        select(run_dir, SelectionOptions(budget=5))
    assert not (run_dir / "selection.parquet").exists()  # failed before writing anything
    assert select(run_dir, SelectionOptions(budget=5), write_records=False).subset_path is None
