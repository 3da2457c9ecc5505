"""Probes end to end: built from the pool, scored by the run's agents, stored, resumed, used by fusion."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_needs import embedded_with_judge
from test_scoring import light_recipe, make_dataset, write_recipe

from visa.fusion import fuse_scores
from visa.pipeline import AgentGroup, plan_agents, warm_agents
from visa.probes.ladder import IM_LADDER, IMAGE_LADDER
from visa.probes.options import ProbeOptions
from visa.probes.run import split_recipe
from visa.recipe import load_recipe
from visa.scoring import score
from visa.store import WorkDir


def test_probes_are_scored_stored_and_resumed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_dataset(tmp_path / "d", 14)
    recipe = light_recipe(tmp_path, with_sample_agent=True)
    log = tmp_path / "calls.log"
    monkeypatch.setenv("VISA_TEST_CALL_LOG", str(log))
    record = score(recipe, data, tmp_path / "run")

    section = record["probes"]
    assert section["ladders"] == {"visual": 12, "placement": 12, "text": 0}  # minimum 12 of the 14 images
    assert 0 < section["share_of_scoring"] < 1 and section["seconds"] > 0
    probes = pq.read_table(tmp_path / "run" / "probes" / "probes.parquet").to_pylist()
    assert len(probes) == 12 * len(IMAGE_LADDER) + 12 * len(IM_LADDER)
    images = [p for p in probes if p["target"] == "visual"]
    assert {p["kind"] for p in images} == {r.kind for r in IMAGE_LADDER}
    assert all(p["light.mean"] is not None and p["error"] is None for p in images)
    flat = [p["light.mean"] for p in images if p["kind"] == "flat"]
    original = [p["light.mean"] for p in images if p["kind"] == "original"]
    assert np.allclose(flat, original, atol=0.6)  # a flat copy keeps the mean colour
    im = [p for p in probes if p["target"] == "placement"]
    by_ladder: dict[int, dict[str, dict]] = {}
    for p in im:
        by_ladder.setdefault(p["ladder"], {})[p["kind"]] = p
        assert p["words.answer"] is not None  # the sample agent ran on every IM probe
    for rungs in by_ladder.values():
        assert rungs["own"]["image_key"] != rungs["other"]["image_key"]
        assert rungs["own"]["words.answer"] == rungs["other"]["words.answer"]  # same conversation

    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["shapley"]["light"]["value"] == "probes"
    assert "probe_auroc" in run["shapley"]["light"]["probes"]
    # brightness carries no information about the ladder: flagged, not hidden
    assert run["shapley"]["light"]["warnings"]

    calls = log.read_text()
    before = (tmp_path / "run" / "probes" / "probes.parquet").read_bytes()
    again = score(recipe, data, tmp_path / "run")
    assert log.read_text() == calls  # nothing scored twice, probes included
    assert again["probes"]["rows"] == section["rows"]
    assert pq.read_table(tmp_path / "run" / "probes" / "probes.parquet").equals(pq.read_table(pa.BufferReader(before)))

    # other probe options make another probe set: it is scored, reusing every stored result
    more = recipe.model_copy(update={"probes": ProbeOptions(minimum=13)})
    third = score(more, data, tmp_path / "run")
    assert third["probes"]["ladders"] == {"visual": 13, "placement": 13, "text": 0}
    new_items = sum(int(x) for x in log.read_text().split()) - sum(int(x) for x in calls.split())
    assert 0 < new_items <= len(IMAGE_LADDER) + len(IM_LADDER)  # one more ladder of each kind, at most


def test_probes_can_be_switched_off(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "d", 4)
    recipe = light_recipe(tmp_path)
    recipe = recipe.model_copy(update={"probes": ProbeOptions(enabled=False)})
    record = score(recipe, data, tmp_path / "run")
    assert "probes" not in record and not (tmp_path / "run" / "probes").exists()
    assert record["shapley"]["light"]["value"] == "consensus"


def logged_recipe(tmp_path: Path, log: Path) -> Path:
    return write_recipe(tmp_path / "logged.yaml", f"""
name: logged
execution: {{shard_size: 4}}
scores:
  sc:
    agents:
      - {{name: width, type: 'agents_for_tests:LoadLog', params: {{log: '{log}'}}}}
  light:
    agents:
      - {{name: mean, type: 'agents_for_tests:MeanBrightness'}}
  words:
    agents:
      - {{name: answer, type: 'agents_for_tests:AnswerLength'}}
""")


def test_probe_parts_reuse_the_pool_runs_loaded_agents(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "d", n_images=6)
    log = tmp_path / "load.log"
    recipe = load_recipe(logged_recipe(tmp_path, log))
    score(recipe, data, tmp_path / "run")
    image_part = json.loads((tmp_path / "run" / "probes" / "image" / "run.json").read_text())
    assert image_part["timings"]["agents"]["sc.width"]["items"] > 0  # the probe images were scored
    # set up once for the pool run and both probe parts, torn down once when the run ends
    assert log.read_text().split() == ["setup", "teardown"]
    log.unlink()
    off = recipe.model_copy(update={"probes": ProbeOptions(enabled=False)})
    score(off, data, tmp_path / "a")
    score(off, data, tmp_path / "b")  # separate commands keep nothing loaded between them
    assert log.read_text().split() == ["setup", "teardown"] * 2


def test_a_failed_setup_is_not_kept_for_the_next_run(tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", """
name: failing
scores:
  sc:
    agents: [{name: slow, type: 'agents_for_tests:SlowSetup', params: {fail: true}}]
"""))
    planned, decode = plan_agents(recipe)
    with warm_agents():
        group = AgentGroup(WorkDir(tmp_path / "run"), planned, planned, decode["fingerprint"], recipe.images)
        group.setup(background=True)
        group.teardown()
        again, _ = plan_agents(recipe)
        second = AgentGroup(WorkDir(tmp_path / "run"), again, again, decode["fingerprint"], recipe.images)
        with pytest.raises(RuntimeError, match="damaged"):  # set up anew, not handed the broken instance
            second.setup()


def test_split_recipe_keeps_what_sample_agents_read(tmp_path) -> None:
    assert set(split_recipe(load_recipe("embedded"))[0].scores) == {"image", "sc", "oa"}
    image_part, sample_part = split_recipe(load_recipe(embedded_with_judge(tmp_path)))
    assert image_part is not None and sample_part is not None
    assert set(image_part.scores) == {"image", "sc", "oa", "dp"}
    assert "im" in sample_part.scores
    assert "pt" not in sample_part.scores  # one PT agent: no text ladders, nothing for it to score
    assert "dp" not in sample_part.scores  # nothing reads the judge
    needed = {f"{s}.{a.name}" for s, spec in sample_part.scores.items() for a in spec.agents}
    assert "oa.tagger" in needed  # the language agents read its labels
    assert not image_part.probes.enabled and not sample_part.probes.enabled
    recipe = load_recipe("embedded")
    pt = recipe.scores["pt"]
    second = pt.agents[0].model_copy(update={"name": "lm2"})
    two = recipe.model_copy(update={"scores": {**recipe.scores, "pt": pt.model_copy(update={"agents": [*pt.agents, second]})}})
    assert "pt" in split_recipe(two)[1].scores  # two PT agents: the text ladders need them


def _probe_table(truth: np.ndarray, ladder: np.ndarray, tier: np.ndarray, agents: dict[str, np.ndarray]) -> pa.Table:
    return pa.table({
        "sample_id": [f"p{i}" for i in range(truth.size)],
        "target": ["visual"] * truth.size,
        "ladder": ladder, "tier": tier, "chain": [""] * truth.size,
        **{name: values for name, values in agents.items()},
    })


def test_fuse_scores_with_probe_value_weights_right_agents() -> None:
    rng = np.random.default_rng(0)
    n = 300
    truth = rng.normal(0, 1, n)
    pool = pa.table({
        "row": np.arange(n), "sample_id": [f"s{i}" for i in range(n)], "image_key": [f"k{i}" for i in range(n)],
        "error_kind": pa.nulls(n, pa.string()),
        "sc.real": truth + rng.normal(0, 0.3, n),
        "sc.noise": rng.normal(0, 1, n),
        "sc.inverted": -truth + rng.normal(0, 0.3, n),
    })
    ladder = np.repeat(np.arange(30), 4)
    tier = np.tile(np.arange(4), 30)
    level = rng.normal(0, 1, 30)[ladder] - 0.8 * tier
    probes = _probe_table(level, ladder, tier, {
        "sc.real": level + rng.normal(0, 0.3, level.size),
        "sc.noise": rng.normal(0, 1, level.size),
        "sc.inverted": -level + rng.normal(0, 0.3, level.size),
    })
    _, consensus = fuse_scores(pool)
    _, probed = fuse_scores(pool, value="probes", probes=probes)
    w = probed["sc"]["weights"]
    assert w["sc.real"] > 0.8 and w["sc.inverted"] == 0.0
    assert probed["sc"]["value"] == "probes" and consensus["sc"]["value"] == "consensus"
    assert any("sc.inverted" in line for line in probed["sc"]["warnings"])
    # the consensus value is unchanged by the new option (reference behaviour)
    assert consensus["sc"]["weights"]["sc.real"] < 0.5
    _, no_probes = fuse_scores(pool, value="probes", probes=None)
    assert no_probes["sc"]["weights"] == consensus["sc"]["weights"]
    assert "no probes" in no_probes["sc"]["warnings"][-1]


def test_im_weights_are_played_on_the_other_image_chain() -> None:
    """An IM agent that only notices a flat image (it reads that the image holds nothing) must not
    outweigh one that tells a conversation's own image from another real image."""
    rng = np.random.default_rng(1)
    n, ladders = 200, 30
    pool = pa.table({
        "row": np.arange(n), "sample_id": [f"s{i}" for i in range(n)], "image_key": [f"k{i}" for i in range(n)],
        "error_kind": pa.nulls(n, pa.string()),
        "im.placement": rng.normal(0, 1, n), "im.flatness": rng.normal(0, 1, n),
    })
    kinds = [r.kind for r in IM_LADDER]  # own, other, flat
    ladder = np.repeat(np.arange(ladders), len(kinds))
    kind = np.array(kinds * ladders)
    base = rng.normal(0, 1, ladders)[ladder]
    placement = base + np.where(kind == "own", 1.0, 0.0) + rng.normal(0, 0.3, ladder.size)
    flatness = base + np.where(kind == "flat", -5.0, 0.0) + rng.normal(0, 0.3, ladder.size)  # own ~ other
    probes = pa.table({
        "sample_id": [f"p{i}" for i in range(ladder.size)], "target": ["placement"] * ladder.size,
        "ladder": ladder, "tier": [r.tier for r in IM_LADDER] * ladders,
        "chain": [r.chain for r in IM_LADDER] * ladders,
        "im.placement": placement, "im.flatness": flatness,
    })
    _, report = fuse_scores(pool, value="probes", probes=probes)
    weights, found = report["im"]["weights"], report["im"]["probes"]
    assert weights["im.placement"] > 0.9 > weights["im.flatness"]
    assert found["probe_auroc"]["im.placement"] > 0.9 and abs(found["probe_auroc"]["im.flatness"] - 0.5) < 0.15


def _photo_pool(folder: Path, photos: int = 12) -> Path:
    """Bundled photos (shrunk), two samples each, plus flat and noise images with their own samples."""
    from PIL import Image

    from visa.probes.ladder import degrade

    examples = Path(__file__).resolve().parent.parent / "examples" / "images"
    (folder / "img").mkdir(parents=True)
    records = []
    sources = sorted(p for p in examples.iterdir() if p.suffix in {".jpg", ".png"})[:photos]
    for i, path in enumerate(sources):
        with Image.open(path) as im:
            image = im.convert("RGB")
        image.thumbnail((256, 256))
        image.save(folder / "img" / f"{path.stem}.png")
        for j in range(2):
            records.append({"id": f"{path.stem}-{j}", "image": f"img/{path.stem}.png",
                            "conversations": [{"from": "human", "value": "<image>\nWhat is shown?"},
                                              {"from": "gpt", "value": f"{path.stem} " * (j + 2)}]})
        if i < 4:
            kind = ("flat", "noise")[i % 2]
            degrade(image, kind, path.stem).save(folder / "img" / f"{kind}-{i}.png")
            records.append({"id": f"{kind}-{i}", "image": f"img/{kind}-{i}.png",
                            "conversations": [{"from": "human", "value": "<image>\nWhat is shown?"},
                                              {"from": "gpt", "value": "nothing"}]})
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


def test_select_uses_the_probes(tmp_path: Path) -> None:
    from visa.report import build_report
    from visa.selection import SelectionOptions, select

    data = _photo_pool(tmp_path / "d")
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(
        "name: probe-test\nexecution: {shard_size: 16}\nprobes: {minimum: 8}\nscores:\n"
        "  sc:\n    agents:\n      - {name: bits, type: jpeg_bits}\n"
        "      - {name: brightness, type: 'agents_for_tests:MeanBrightness'}\n"
    )
    score(load_recipe(recipe_path), data, tmp_path / "run")
    result = select(tmp_path / "run", SelectionOptions(budget="50%"), write_records=False)
    sc = result.shapley["sc"]
    assert sc["value"] == "probes"
    assert sc["weights"]["sc.bits"] > sc["weights"]["sc.brightness"]
    auroc = sc["probes"]["probe_auroc"]
    # (every poorer rung counts once: the crops, which bits per pixel barely sees, weigh as much as noise)
    assert auroc["sc.bits"] > 0.6 and auroc["sc.bits"] > auroc["sc.brightness"] + 0.1
    summary = result.summary
    assert summary["image_cut"] is not None and summary["image_cut"]["kept_poor"] < 0.5
    rows = result.table.to_pylist()
    degraded = [r for r in rows if r["sample_id"].startswith(("flat", "noise"))]
    assert all(r["reason"] == "image_below_cut" for r in degraded)
    clean_cut = {r["sample_id"].rsplit("-", 1)[0] for r in rows if r["reason"] == "image_below_cut"} - {
        r["sample_id"].rsplit("-", 1)[0] for r in degraded}
    assert len(clean_cut) <= 1  # at most the motion-blurred clock
    clean_kept = sum(r["selected"] for r in rows if not r["sample_id"].startswith(("flat", "noise")))
    assert clean_kept == summary["selected"] > 0
    # the budget needs its images: the cut never leaves fewer samples than the budget asks for
    assert summary["selected"] == summary["budget_rows"]
    consensus = select(tmp_path / "run", SelectionOptions(budget="50%", value="consensus"), write_records=False)
    assert consensus.shapley["sc"]["value"] == "consensus"
    select(tmp_path / "run", SelectionOptions(budget="50%"), write_records=False)
    html = build_report(tmp_path / "run").read_text()
    assert "probe AUROC" in html and "5-95%" in html


def test_youden_cut_and_budget_floor() -> None:
    from visa.probes.calibrate import budget_floor, pool_percentile, youden_cut

    good = np.array([3.0, 4.0, 5.0, 0.5])
    cut = youden_cut(good, np.array([0.0, 1.0, 2.0, 10.0]))
    assert cut is not None and cut.threshold == 2.5 and cut.kept_sources == 0.75 and cut.kept_poor == 0.25
    # Youden's J alone would cut at 2.95; the poor probes' 90th percentile (1.0) bounds it
    cut = youden_cut(np.array([3.0, 4.0, 5.0, 6.0]), np.array([0.0] * 9 + [1.0, 2.9]))
    assert cut is not None and cut.threshold == 1.0 and cut.kept_sources == 1.0
    assert youden_cut(np.array([0.0, 1.0]), np.array([2.0, 3.0])) is None  # inverted: no cut
    assert pool_percentile(np.array([0.0, 2.0, 10.0, np.nan]), np.array([1.0, 2.0, 3.0])).tolist()[:3] == [
        0.0, 0.5, 1.0]
    visual = np.array([0.9, 0.1, 0.5, np.nan])
    assert budget_floor(visual, np.array([2, 5, 3, 1]), 4) == 2  # 0.9 (2 samples) + 0.5 (3 samples)
    assert budget_floor(visual, np.array([2, 5, 3, 1]), 100) == 4
    assert budget_floor(visual, np.array([2, 5, 3, 1]), None) == 0


def test_im_cut_from_probes_drops_wrong_image_samples() -> None:
    from visa.probes.calibrate import calibrate_im
    from visa.selection import SelectionOptions, select_table

    rng = np.random.default_rng(5)
    n = 200
    misaligned = np.arange(n) % 5 == 0
    signal = np.where(misaligned, rng.normal(-1.0, 0.4, n), rng.normal(1.0, 0.4, n))
    pool = pa.table({
        "row": np.arange(n), "sample_id": [f"s{i}" for i in range(n)], "image_key": [f"k{i}" for i in range(n)],
        "error_kind": pa.nulls(n, pa.string()),
        "im.a": signal + rng.normal(0, 0.2, n),
        "im.b": signal + rng.normal(0, 0.5, n),
    })
    m = 20
    own = rng.normal(1.0, 0.4, m)
    other = rng.normal(-1.0, 0.4, m)
    flat = rng.normal(-0.5, 0.4, m)
    probes = pa.table({
        "sample_id": [f"p{i}" for i in range(3 * m)], "target": ["placement"] * (3 * m),
        "ladder": np.tile(np.arange(m), 3), "tier": np.repeat([0, 1, 1], m),
        "chain": [""] * m + ["other"] * m + ["flat"] * m,
        "im.a": np.concatenate([own, other, flat]) + rng.normal(0, 0.2, 3 * m),
        "im.b": np.concatenate([own, other, flat]) + rng.normal(0, 0.5, 3 * m),
    })
    fused, shapley = fuse_scores(pool, value="probes", probes=probes)
    cut, why = calibrate_im(probes, shapley["im"])
    assert cut is not None and why is None
    assert cut.kept_sources >= 0.85 and cut.kept_poor <= 0.2
    selection, summary = select_table(fused, SelectionOptions(), shapley=shapley, probes=probes)
    reasons = np.array(selection.column("reason").to_pylist(), dtype=object)
    dropped = reasons == "im_nonpositive"
    assert dropped[misaligned].mean() > 0.8 and dropped[~misaligned].mean() < 0.1
    assert summary["im_cut"]["unit"] == "fused im"
    # without probes the old rule (raw IM <= 0) applies and says so
    _, old = select_table(fused, SelectionOptions(), shapley=shapley, probes=None)
    assert old["im_cut"] is None and any("raw IM <= 0" in note for note in old["notes"])


def test_probe_table_keeps_numeric_agent_fields_and_drops_lists() -> None:
    from visa.probes.run import _probe_table

    scores = pa.table({
        "sample_id": ["a", "b"], "row": [0, 1], "image_key": ["k1", "k2"], "error_kind": pa.nulls(2, pa.string()),
        "error": pa.nulls(2, pa.string()), "oa": [0.1, 0.2], "oa.tagger": [1.0, 2.0],
        "oa.tagger.labels": [["cat"], []], "oa.tagger.faces": pa.array([0, 1], pa.int32()),
    })
    manifest = [
        {"sample_id": "a", "target": "visual", "ladder": 0, "kind": "original", "tier": 0, "chain": ""},
        {"sample_id": "b", "target": "visual", "ladder": 0, "kind": "flat", "tier": 3, "chain": ""},
    ]
    table = _probe_table([scores], manifest)
    assert table.num_rows == 2
    assert "oa.tagger" in table.column_names and "oa.tagger.faces" in table.column_names
    assert "oa.tagger.labels" not in table.column_names and "oa" not in table.column_names
