"""End-to-end scoring through the local executor: one row per record, errors isolated, resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from visa.recipe import Recipe, load_recipe
from visa.scoring import score
from visa.store import WorkDirMismatch

TESTS = Path(__file__).resolve().parent


def write_recipe(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


CHEAP = """
name: cheap
execution: {shard_size: 4}
scores:
  image:
    agents: [{name: stats, type: image_stats}]
  sc:
    agents: [{name: felzenszwalb, type: felzenszwalb}]
"""


def cheap_recipe(tmp_path: Path) -> Path:
    """Real image agents that cost milliseconds (the full embedded recipe runs language models)."""
    return write_recipe(tmp_path / "cheap.yaml", CHEAP)


def light_recipe(tmp_path: Path, *, delay: float = 0.0, scale: float = 1.0, shard_size: int = 4,
                 fail_on_dark: bool = False, with_sample_agent: bool = False) -> Recipe:
    sample = (
        "  words:\n    agents:\n      - {name: answer, type: 'agents_for_tests:AnswerLength'}\n"
        if with_sample_agent else ""
    )
    body = f"""
name: light
execution: {{shard_size: {shard_size}}}
scores:
  image:
    agents:
      - {{name: stats, type: image_stats}}
  light:
    agents:
      - name: mean
        type: 'agents_for_tests:MeanBrightness'
        params: {{delay_s: {delay}, scale: {scale}, fail_on_dark: {str(fail_on_dark).lower()}, batch_size: 4}}
{sample}"""
    return load_recipe(write_recipe(tmp_path / "light.yaml", body))


def make_dataset(folder: Path, n_images: int, per_image: int = 2) -> Path:
    """Real-photo-free synthetic set: gradient images, several samples per image, one text-only."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n_images):
        Image.linear_gradient("L").resize((64 + i, 48)).point(lambda v, i=i: (v + 13 * i) % 256).convert(
            "RGB"
        ).save(folder / "img" / f"{i}.png")
        for j in range(per_image):
            records.append(
                {"id": f"s{i}-{j}", "image": f"img/{i}.png",
                 "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                   {"from": "gpt", "value": "word " * (j + 1)}]}
            )
    records.append({"id": "text", "conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]})
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


def table_of(run_dir: Path) -> list[dict]:
    return pq.read_table(run_dir / "scores.parquet").to_pylist()


@pytest.mark.slow
def test_embedded_recipe_on_examples_one_row_per_record(tmp_path, examples):
    # Every third example (language models are the slow part), plus the multi-image and text-only ones.
    raw = [r for i, r in enumerate(json.loads((examples / "llava.json").read_text()))
           if i % 3 == 0 or "image" not in r or isinstance(r["image"], list)]
    data = tmp_path / "examples.json"
    data.write_text(json.dumps(raw))
    record = score(load_recipe("embedded"), data, tmp_path / "run", image_root=examples)
    rows = table_of(tmp_path / "run")
    assert [r["row"] for r in rows] == list(range(len(raw)))
    assert [r["sample_id"] for r in rows] == [str(r["id"]) for r in raw]
    assert record["counts"]["records"] == len(raw)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["recipe"]["name"] == "embedded" and run["counts"]["records"] == len(raw)
    for r, source in zip(rows, raw, strict=True):
        if "image" not in source:  # text-only: no image score, no error
            assert r["error"] is None and r["image_key"] is None and r["image.stats"] is None
        else:
            assert r["error"] is None and r["image_key"] and r["image.stats"] > 0
    columns = set(rows[0])
    assert {"sc", "oa", "pt", "im"} <= columns and "dp" not in columns  # no DP in the embedded recipe
    assert len([c for c in columns if c.startswith("sc.") and c.count(".") == 1]) >= 2
    assert set(run["shapley"]) >= {"sc", "oa", "im"}


def test_shared_image_scored_once_and_joined_to_every_sample(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "d", n_images=5, per_image=3)
    log = tmp_path / "calls.log"
    monkeypatch.setenv("VISA_TEST_CALL_LOG", str(log))
    score(light_recipe(tmp_path), data, tmp_path / "run")
    probes = pq.read_table(tmp_path / "run" / "probes" / "probes.parquet", columns=["image_key"])
    probe_images = len(set(probes.column("image_key").to_pylist()))  # the probes' own distinct images
    # 5 unique images (15 image samples), each scored once, plus each distinct probe image once
    assert sum(int(x) for x in log.read_text().split()) == 5 + probe_images
    rows = table_of(tmp_path / "run")
    by_image: dict[str, set] = {}
    for r in rows[:-1]:
        by_image.setdefault(r["image_key"], set()).add(r["light.mean"])
    assert len(by_image) == 5 and all(len(v) == 1 for v in by_image.values())
    assert rows[-1]["light.mean"] is None and rows[-1]["error"] is None


def test_failing_item_becomes_error_row_without_costing_its_batch(tmp_path):
    data = make_dataset(tmp_path / "d", n_images=1, per_image=1)
    Image.new("RGB", (40, 40), (5, 5, 5)).save(tmp_path / "d" / "img" / "dark.png")
    records = json.loads(data.read_text())
    records.insert(0, {"id": "dark", "image": "img/dark.png",
                       "conversations": [{"from": "human", "value": "?"}, {"from": "gpt", "value": "dark"}]})
    data.write_text(json.dumps(records))
    score(light_recipe(tmp_path, fail_on_dark=True), data, tmp_path / "run")
    rows = {r["sample_id"]: r for r in table_of(tmp_path / "run")}
    assert rows["dark"]["error_kind"] == "agent"
    assert "light.mean" in rows["dark"]["error"] and "too dark" in rows["dark"]["error"]
    assert rows["dark"]["image.stats"] is not None  # the other agent still scored it
    assert rows["s0-0"]["error"] is None and rows["s0-0"]["light.mean"] > 0


def test_sample_agent_reads_upstream_image_agent(tmp_path):
    data = make_dataset(tmp_path / "d", n_images=3, per_image=2)
    score(light_recipe(tmp_path, with_sample_agent=True), data, tmp_path / "run")
    rows = table_of(tmp_path / "run")
    for r in rows[:-1]:
        assert r["words.answer.seen_brightness"] == pytest.approx(r["light.mean"])
    assert [r["words.answer"] for r in rows[:2]] == [1.0, 2.0]
    assert rows[-1]["words.answer"] == 1.0 and rows[-1]["words.answer.seen_brightness"] is None


def test_changing_one_agent_recomputes_only_that_agent(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "d", n_images=4, per_image=1)
    log = tmp_path / "calls.log"
    monkeypatch.setenv("VISA_TEST_CALL_LOG", str(log))
    first = score(light_recipe(tmp_path, scale=1.0), data, tmp_path / "run")
    assert first["timings"]["agents"]["image.stats"]["items"] == 4
    log.write_text("")
    again = score(light_recipe(tmp_path, scale=1.0), data, tmp_path / "run")
    assert again["shards"]["resumed"] == again["shards"]["total"] and log.read_text() == ""
    before = {r["sample_id"]: r for r in table_of(tmp_path / "run")}
    changed = score(light_recipe(tmp_path, scale=2.0), data, tmp_path / "run")
    assert "image.stats" not in changed["timings"]["agents"]  # reused from the store
    assert changed["timings"]["agents"]["light.mean"]["items"] == 4
    after = {r["sample_id"]: r for r in table_of(tmp_path / "run")}
    for sid, row in after.items():
        assert row["image.stats"] == before[sid]["image.stats"]
        if row["light.mean"] is not None:
            assert row["light.mean"] == pytest.approx(2 * before[sid]["light.mean"])


def test_workers_give_the_same_table(tmp_path):
    data = make_dataset(tmp_path / "d", n_images=6, per_image=2)
    recipe = load_recipe(cheap_recipe(tmp_path))
    score(recipe, data, tmp_path / "one")
    score(recipe, data, tmp_path / "two", workers=2)
    assert table_of(tmp_path / "one") == table_of(tmp_path / "two")


def test_changed_input_is_refused(tmp_path):
    data = make_dataset(tmp_path / "d", n_images=2)
    recipe = load_recipe(cheap_recipe(tmp_path))
    score(recipe, data, tmp_path / "run")
    time.sleep(0.01)
    data.write_text(data.read_text().replace("Describe", "Explain"))
    with pytest.raises(WorkDirMismatch, match="different input"):
        score(recipe, data, tmp_path / "run")


def _visa(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "visa.cli", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw
    )


def test_sigkill_mid_run_then_rerun_equals_uninterrupted(tmp_path):
    data = make_dataset(tmp_path / "d", n_images=12, per_image=2)
    recipe = write_recipe(
        tmp_path / "slow.yaml",
        """
execution: {shard_size: 3}
scores:
  image:
    agents: [{name: stats, type: image_stats}]
  light:
    agents: [{name: mean, type: 'agents_for_tests:MeanBrightness', params: {delay_s: 0.25, batch_size: 1}}]
""",
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    run = tmp_path / "killed"
    proc = _visa("score", "--recipe", str(recipe), "--data", str(data), "--out", str(run), env=env)
    markers = run / "work" / "samples"
    deadline = time.time() + 60
    while len(list(markers.glob("*.done"))) < 1 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(markers.glob("*.done")))
    assert 1 <= done_before < 9, "the run must be interrupted mid-way for this test to mean anything"
    assert not (run / "scores.parquet").exists()

    rerun = _visa("score", "--recipe", str(recipe), "--data", str(data), "--out", str(run), env=env)
    assert rerun.wait(timeout=120) == 0, rerun.stderr.read().decode()
    record = json.loads((run / "run.json").read_text())
    assert record["shards"]["resumed"] >= done_before

    clean = tmp_path / "clean"
    full = _visa("score", "--recipe", str(recipe), "--data", str(data), "--out", str(clean), env=env)
    assert full.wait(timeout=120) == 0, full.stderr.read().decode()
    assert table_of(run) == table_of(clean)


def test_cli_errors_are_one_clear_line(tmp_path, examples):
    cases = [
        (["score", "--recipe", "embeded", "--data", str(examples / "llava.json"), "--out", str(tmp_path / "a")],
         "did you mean 'embedded'"),
        (["score", "--recipe", "embedded", "--data", str(tmp_path / "nope.json"), "--out", str(tmp_path / "b")],
         "input not found"),
    ]
    bad_field = write_recipe(tmp_path / "bad.yaml", "scores: {}\nexecutoin: {}\n")
    cases.append(
        (["score", "--recipe", str(bad_field), "--data", str(examples / "llava.json"), "--out", str(tmp_path / "c")],
         "unknown field 'executoin' (did you mean 'execution'?)")
    )
    for args, expected in cases:
        proc = _visa(*args)
        assert proc.wait(timeout=60) == 2
        err = proc.stderr.read().decode()
        assert expected in err and "Traceback" not in err, err


def test_hostile_corpus_errors_exactly_the_bad_records(tmp_path):
    hostile = pytest.importorskip("hostile")
    data, expected = hostile.build_hostile_corpus(tmp_path / "h")
    recipe = cheap_recipe(tmp_path)
    proc = _visa("score", "--recipe", str(recipe), "--data", str(data), "--out", str(tmp_path / "run"))
    assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()
    rows = table_of(tmp_path / "run")
    lines = [line for line in data.read_text().splitlines() if line.strip()]
    assert len(rows) == len(lines)  # one row per input record, the malformed line included
    by_id = {r["sample_id"]: r for r in rows}
    for record_id, kind in expected.items():
        row = by_id[record_id]
        assert row["error_kind"] == kind, (record_id, row["error"])
        if kind is None:
            assert row["image.stats"] is not None and row["sc.felzenszwalb"] >= 1
        else:
            assert row["error"] and len(row["error"]) > len(kind) + 2
    malformed = [r for r in rows if r["error_kind"] == "malformed"]
    assert len(malformed) == 1 and malformed[0]["sample_id"].startswith("row:")
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["counts"]["malformed"] == 1 and run["counts"]["malformed_lines"] == [malformed[0]["line"]]
    shutil.rmtree(tmp_path / "h")


@pytest.mark.timeout(240)
def test_cli_ray_executor_gives_the_local_table(tmp_path):
    pytest.importorskip("ray")
    data = make_dataset(tmp_path / "d", n_images=3, per_image=2)
    # Pools sized from the recipe so that a 2-CPU machine keeps CPU for the prepare/commit tasks.
    recipe = write_recipe(tmp_path / "pools.yaml", CHEAP.replace("}]", ", pool: {cpus: 0.5}}]"))
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"}
    for executor, out in (("local", "local"), ("ray", "ray")):
        proc = _visa("score", "--recipe", str(recipe), "--data", str(data), "--out", str(tmp_path / out),
                     "--executor", executor, env=env)
        assert proc.wait(timeout=200) == 0, proc.stderr.read().decode()[-2000:]
    assert table_of(tmp_path / "ray") == table_of(tmp_path / "local")


def test_missing_backend_library_fails_before_any_work(tmp_path, examples):
    pytest.importorskip("transformers")
    if __import__("importlib").util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    recipe = write_recipe(tmp_path / "v.yaml", """
scores:
  im:
    agents:
      - {name: big, type: mutual_information, params: {backend: {type: vllm, params: {model: some/model}}}}
""")
    proc = _visa("score", "--recipe", str(recipe), "--data", str(examples / "llava.json"), "--out", str(tmp_path / "r"))
    assert proc.wait(timeout=60) == 2
    assert "im.big needs vllm (pip install 'visa[vllm]')" in proc.stderr.read().decode()
    assert not (tmp_path / "r").exists()


def test_doctor_reports_what_runs_here():
    proc = _visa("doctor")
    assert proc.wait(timeout=120) == 0
    text = proc.stdout.read().decode()
    assert "embedded" in text and "image_stats" in text and "embedded_lm" in text


SLOW_SETUP = """
name: slow
execution: {{shard_size: 3}}
scores:
  image:
    agents: [{{name: stats, type: image_stats}}]
  slow:
    agents: [{{name: width, type: 'agents_for_tests:SlowSetup', params: {{delay: 0.5, fail: {fail}}}}}]
"""


def test_models_load_in_the_background_and_each_agent_waits_for_its_own(tmp_path):
    data = make_dataset(tmp_path / "d", n_images=4)
    recipe = load_recipe(write_recipe(tmp_path / "slow.yaml", SLOW_SETUP.format(fail="false")))
    record = score(recipe, data, tmp_path / "run")
    assert record["counts"]["errors"] == {}
    table = pq.read_table(tmp_path / "run" / "scores.parquet")
    assert table.column("slow.width").to_pylist() == table.column("image.stats.width").to_pylist()


def test_a_failed_background_setup_stops_the_run_with_its_error(tmp_path):
    data = make_dataset(tmp_path / "d", n_images=4)
    recipe = load_recipe(write_recipe(tmp_path / "slow.yaml", SLOW_SETUP.format(fail="true")))
    with pytest.raises(RuntimeError, match="the model file is damaged"):
        score(recipe, data, tmp_path / "run")
    assert not (tmp_path / "run" / "scores.parquet").exists()
