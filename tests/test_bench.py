"""`visa bench`: noisy pool builder, metrics, report table, and the commands end to end on a cheap recipe."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from visa.bench.noise import (
    DEGRADATIONS,
    BenchError,
    PoolOptions,
    auroc,
    budget_count,
    build_pool,
    evaluate,
    markdown_table,
    precision_at,
    rate_selection,
)

CHEAP_RECIPE = """
description: image statistics and regions only (fast)
scores:
  image:
    agents:
      - name: stats
        type: image_stats
  sc:
    agents:
      - name: felzenszwalb
        type: felzenszwalb
        params: {working_side: 96}
"""


def brute_auroc(clean, noisy) -> float:
    total = 0.0
    for c in clean:
        for n in noisy:
            total += 1.0 if c > n else 0.5 if c == n else 0.0
    return total / (len(clean) * len(noisy))


def test_auroc_equals_pairwise_count_with_ties():
    rng = np.random.default_rng(3)
    for _ in range(50):
        clean = rng.integers(0, 5, rng.integers(1, 12)).astype(float)  # many ties
        noisy = rng.integers(0, 5, rng.integers(1, 12)).astype(float)
        assert auroc(clean, noisy) == pytest.approx(brute_auroc(clean, noisy), abs=1e-12)
    assert auroc(np.array([1.0, 2.0]), np.array([0.0])) == 1.0
    assert auroc(np.array([-np.inf]), np.array([0.0])) == 0.0
    assert np.isnan(auroc(np.array([]), np.array([1.0])))


def test_precision_and_budget_helpers():
    values = np.array([5.0, 4.0, 3.0, 3.0, 1.0])
    clean = np.array([True, False, True, False, True])
    assert precision_at(values, clean, 2) == 0.5
    # the third place is a tie between a clean and a noisy sample: expected half a clean sample
    assert precision_at(values, clean, 3) == pytest.approx((1 + 0.5) / 3)
    assert budget_count("50%", 91) == 46 and budget_count("10", 5) == 5 and budget_count(None, 7) == 7
    with pytest.raises(BenchError):
        budget_count("half", 10)


def small_set(tmp_path: Path, photos: int = 4) -> Path:
    """A clean LLaVA set on a few real example photos, plus records the builder must skip."""
    examples = Path(__file__).resolve().parents[1] / "examples"
    records = [
        r
        for r in json.loads((examples / "llava.json").read_text())
        if r["meta"]["kind"] == "clean" and isinstance(r.get("image"), str)
    ]
    chosen, seen = [], set()
    for r in records:
        if r["image"] not in seen and len(seen) < photos:
            seen.add(r["image"])
            chosen.append(r)
    images = tmp_path / "src" / "images"
    images.mkdir(parents=True)
    for r in chosen:  # shrink the photos so the scoring test is fast
        with Image.open(examples / r["image"]) as im:
            small = im.convert("RGB")
            small.thumbnail((128, 128))
            small.save(images / Path(r["image"]).name)
    skipped = [
        {"id": "bad", "image": chosen[0]["image"], "conversations": [], "meta": {"kind": "clean"}},
        {
            "id": "noisy",
            "image": chosen[0]["image"],
            "conversations": chosen[0]["conversations"],
            "meta": {"kind": "garbled"},
        },
    ]
    data = tmp_path / "src" / "llava.json"
    data.write_text(json.dumps(chosen * 2 + skipped))
    return data


def test_pool_has_every_kind_with_correct_labels_and_valid_images(tmp_path: Path):
    data = small_set(tmp_path)
    source = {r["id"]: r for r in json.loads(data.read_text())}
    pool_path = build_pool(
        data, tmp_path / "pool", PoolOptions(seed=1, misaligned=0.5, degraded=0.25, text_only=0.5)
    )
    pool = json.loads(pool_path.read_text())
    counts = Counter(r["meta"]["noise"] for r in pool)
    assert counts["clean"] == 8  # 4 photos x 2 copies; the empty and the garbled records are skipped
    assert counts["misaligned"] == 4 and counts["text_only"] == 4
    assert all(counts[k] == 2 for k in DEGRADATIONS)
    for record in pool:
        kind = record["meta"]["noise"]
        path = pool_path.parent / record["image"]
        with Image.open(path) as im:
            im.load()
            pixels = np.asarray(im.convert("RGB"), dtype=np.float64)
        assert "<image>" in record["conversations"][0]["value"]
        if kind == "text_only":
            continue
        origin = source[record["meta"]["source"]]
        original_name = Path(origin["image"]).name
        assert record["conversations"] == origin["conversations"]
        if kind == "clean":
            assert Path(record["image"]).name == original_name
        elif kind == "misaligned":
            assert Path(record["image"]).name != original_name
        else:
            with Image.open(data.parent / origin["image"]) as im:
                original = np.asarray(im.convert("RGB"), dtype=np.float64)
            assert pixels.shape == original.shape
            if kind == "blank":
                assert pixels.std(axis=(0, 1)).max() == 0
            elif kind in ("blur", "thumbnail"):  # detail is gone: far fewer sharp edges
                assert np.abs(np.diff(pixels, axis=1)).mean() < 0.6 * np.abs(np.diff(original, axis=1)).mean()
            elif kind == "noise":
                assert 110 < pixels.mean() < 145 and pixels.std() > 60
            elif kind == "jpeg":
                assert (
                    path.suffix == ".jpg"
                    and path.stat().st_size < (data.parent / origin["image"]).stat().st_size
                )
    with pytest.raises(BenchError, match="unknown noise kind"):
        build_pool(data, tmp_path / "bad", PoolOptions(kinds=("smudge",)))


def test_report_on_a_synthetic_score_table(tmp_path: Path):
    kinds = ["clean"] * 6 + ["misaligned"] * 2 + ["blank"] * 2
    pool = [{"id": str(i), "meta": {"noise": k}, "conversations": []} for i, k in enumerate(kinds)]
    (tmp_path / "pool.json").write_text(json.dumps(pool))
    sc = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]  # perfect
    pt = [1, 1, 1, 1, 1, 1, 5, 5, None, 5]  # perplexity: noisy is higher; a null counts as least clean
    table = pa.table(
        {
            "row": list(range(10)),
            "sc": [float(v) for v in sc],
            "sc.felzenszwalb": [float(v) for v in sc],
            "pt": pa.array([None if v is None else float(v) for v in pt], pa.float64()),
            "error": pa.array([None] * 10, pa.string()),
        }
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    pq.write_table(table, run_dir / "scores.parquet")
    (run_dir / "run.json").write_text(json.dumps({"agents": [{"column": "sc.felzenszwalb", "score": "sc"}]}))
    selected = np.array([1, 1, 1, 0, 0, 0, 1, 0, 0, 0], dtype=bool)
    report = evaluate(run_dir, tmp_path / "pool.json", selected, "40%", draws=200)
    rows = {s["signal"]: s for s in report["signals"]}
    assert list(rows) == ["sc", "pt", "sc.felzenszwalb", "selection", "random"]
    assert rows["sc"]["auroc"] == {"misaligned": 1.0, "blank": 1.0, "all": 1.0}
    assert rows["sc"]["precision"] == 1.0 and rows["sc"]["selected"] == 4
    assert rows["pt"]["direction"].startswith("lower") and rows["pt"]["auroc"]["all"] == 1.0
    assert rows["pt"]["missing"] == 1
    assert rows["selection"]["precision"] == 0.75 and rows["selection"]["noise_rate_selected"] == 0.25
    assert rows["selection"]["auroc"]["misaligned"] == pytest.approx(
        brute_auroc([1, 1, 1, 0, 0, 0], [1, 0]), abs=1e-3
    )
    assert abs(rows["random"]["auroc"]["all"] - 0.5) < 0.05 and rows["random"]["spread"]["all"] > 0
    assert abs(rows["random"]["precision"] - 0.6) < 0.03
    assert report["pool"]["noise_rate"] == 0.4 and report["similarity_baseline"].startswith("not available")
    text = markdown_table(report)
    assert "| sc | higher = cleaner | 1.000 | 1.000 | 1.000 | 1.000 |" in text
    assert "pt (1 null)" in text and "0.250 (4 kept)" in text


def test_selection_row_counts_ties_as_half():
    kinds = np.array(["clean", "clean", "noise", "noise"], dtype=object)
    row = rate_selection(np.array([True, False, True, False]), kinds)
    assert row.auroc["noise"] == 0.5 and row.precision == 0.5


def test_bench_noise_and_speed_commands_end_to_end(tmp_path: Path):
    from typer.testing import CliRunner

    from visa.cli import app  # the `visa` command, which registers `bench`

    recipe = tmp_path / "cheap.yaml"
    recipe.write_text(CHEAP_RECIPE)
    data = small_set(tmp_path, photos=3)
    out = tmp_path / "bench"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "noise",
            "--recipe",
            str(recipe),
            "--data",
            str(data),
            "--out",
            str(out),
            "--kinds",
            "blank,noise,misaligned",
            "--degraded",
            "0.5",
            "--budget",
            "50%",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "noise.json").read_text())
    assert report["pool"]["counts"] == {"clean": 6, "misaligned": 2, "blank": 3, "noise": 3}
    rows = {s["signal"]: s for s in report["signals"]}
    assert {"sc", "sc.felzenszwalb", "selection", "random"} <= set(rows)
    assert rows["sc"]["auroc"]["blank"] == 1.0  # a flat image has one region, every photo more
    assert rows["selection"]["selected"] == 7
    by_kind = report["selection_by_kind"]
    assert sum(e["kept"] for e in by_kind.values()) == 7
    assert {k: e["pool"] for k, e in by_kind.items()} == report["pool"]["counts"]
    assert by_kind["blank"]["kept"] + sum(by_kind["blank"]["dropped"].values()) == 3
    assert (out / "noise.md").read_text().startswith("| signal |")
    assert "AUROC" in result.output

    bad = CliRunner().invoke(
        app,
        [
            "bench",
            "noise",
            "--recipe",
            str(recipe),
            "--data",
            str(tmp_path / "nope.json"),
            "--out",
            str(out / "x"),
        ],
    )
    assert bad.exit_code == 2 and "input not found" in bad.output

    speed_out = tmp_path / "speed"
    result = CliRunner().invoke(
        app, ["bench", "speed", "--recipe", str(recipe), "--data", str(data), "--out", str(speed_out)]
    )
    assert result.exit_code == 0, result.output
    speed = json.loads((speed_out / "speed.json").read_text())
    agents = {a["agent"]: a for a in speed["agents"]}
    assert agents["sc.felzenszwalb"]["items"] == 3 and agents["sc.felzenszwalb"]["rate_unit"] == "images/s"
    assert speed["records"] == 8 and speed["end_to_end"]["samples_per_second"] > 0
    assert 20 < speed["peak_rss_mib"] < 4096


@pytest.mark.slow
def test_similarity_baseline_is_computed_from_evidence_when_the_run_has_no_similarity_agent():
    pytest.importorskip("sentence_transformers")
    from visa.bench.noise import SIMILARITY_COLUMN, similarity_values

    def turns(question: str, answer: str) -> list[dict]:
        return [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]

    pool = [
        {"image": "a.jpg", "conversations": turns("What animal is this?", "A tabby cat curled up asleep.")},
        {"image": "b.jpg", "conversations": turns("What animal is this?", "A tabby cat curled up asleep.")},
    ]
    table = pa.table(
        {
            "row": [0, 1],
            "oa.tagger.top_labels": [["tabby cat", "Egyptian cat"], ["space shuttle", "missile"]],
            "oa.tagger.top_probs": [[0.7, 0.2], [0.8, 0.1]],
        }
    )
    values, source = similarity_values(table, pool)
    assert source.startswith("computed") and values[0] > values[1] + 0.1
    with_column = table.append_column(SIMILARITY_COLUMN, pa.array([0.1, None], pa.float64()))
    values, source = similarity_values(with_column, pool)
    assert source == f"column {SIMILARITY_COLUMN}" and values[0] == 0.1 and values[1] == -np.inf
