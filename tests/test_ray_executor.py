"""The Ray executor against the local one: same score tables, same resume, clear refusals.

Ray runs on one module-scoped local instance (2 CPUs, loopback). Actor pools are sized so that the
prepare/commit tasks keep CPU (0.25 CPU per actor and per task): on a 2-CPU instance, pools taking
every CPU leave the tasks unscheduled and the pipeline stalls.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydantic import BaseModel, Field
from test_scoring import light_recipe, make_dataset, table_of, write_recipe

from visa.agents.base import Agent, AgentParams, Resources, Unit
from visa.executors.ray import ExecutorError, Pool, RayExecutor
from visa.pipeline import plan_agents
from visa.recipe import ExecutionSpec, RecipeError, load_recipe
from visa.scoring import score
from visa.store import ResultIndex, WorkDir

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
SMALL = {"*": {"size": 1, "cpus": 0.25}}


class GpuTagger(Agent):
    """Declares GPU needs (placement tests only; never scored)."""

    unit = Unit.IMAGE

    def resources(self) -> Resources:
        return Resources(cpus=2.0, gpus=1.0, gpu_memory_gb=6.0)

    def score_batch(self, items):
        return [{"score": 0.0} for _ in items]


class Crasher(Agent):
    """Kills its own process on every batch, like a segfault in a model library."""

    unit = Unit.IMAGE

    def score_batch(self, items):
        os._exit(3)


class BrokenSetup(Agent):
    """An agent whose models cannot load."""

    unit = Unit.IMAGE

    def setup(self) -> None:
        raise RuntimeError("weights not found at /models/tagger")

    def score_batch(self, items):
        return [{"score": 0.0} for _ in items]


@pytest.fixture(scope="module")
def ray_address():
    ray = pytest.importorskip("ray")
    with pytest.MonkeyPatch.context() as patch:
        # Ray's workers inherit this process's environment at start: they must import visa and the test agents.
        path = os.pathsep.join([str(SRC), str(TESTS), os.environ.get("PYTHONPATH", "")])
        patch.setenv("PYTHONPATH", path)
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, logging_level="WARNING",
                 object_store_memory=256 * 2**20)
        try:
            yield ray.get_runtime_context().gcs_address
        finally:
            ray.shutdown()


def ray_executor(**kw) -> RayExecutor:
    return RayExecutor(pools=SMALL, task_cpus=0.25, **kw)


@contextlib.contextmanager
def one_thread(monkeypatch):
    """Run the local reference with one thread per model, like the 0.25-CPU actors: float kernels
    (torch, ONNX Runtime) sum in a thread-dependent order, so tables are bit-identical only at equal
    thread counts."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        monkeypatch.undo()


def with_shard_size(recipe, size: int):
    """``recipe`` in shards of ``size``, one thread per model on both executors (``auto`` would give
    the local run every CPU of this machine, and Ray actors one thread each)."""
    return recipe.model_copy(update={"execution": ExecutionSpec(shard_size=size, threads=1)})


#: Bundled example records covering every case: an image seen again in a later shard, OCR text, two
#: images in one sample, text only.
EXAMPLE_IDS = ("astronaut-01", "chelsea-01", "text-01", "portraits-compare-01", "textonly-01")


@pytest.mark.slow  # loads the embedded models (tagger, OCR, language model) in both executors
@pytest.mark.timeout(300)
def test_embedded_examples_same_table_as_local(ray_address, tmp_path, examples, monkeypatch):
    records = [r for r in json.loads((examples / "llava.json").read_text()) if r["id"] in EXAMPLE_IDS]
    data = tmp_path / "examples.json"
    data.write_text(json.dumps(records))
    recipe = with_shard_size(load_recipe("embedded"), 2)
    with one_thread(monkeypatch):
        local = score(recipe, data, tmp_path / "local", image_root=examples)
    pools = len(RayExecutor().placements(recipe))
    executor = RayExecutor(pools={"*": {"size": 1, "cpus": min(0.25, 1.5 / pools)}}, task_cpus=0.25)
    remote = score(recipe, data, tmp_path / "ray", image_root=examples, executor=executor)
    rows = table_of(tmp_path / "ray")
    assert rows == table_of(tmp_path / "local")
    assert len(rows) == len(EXAMPLE_IDS) == remote["counts"]["records"]
    assert remote["shards"] == local["shards"] and remote["shards"]["total"] == 3
    assert remote["counts"] == local["counts"] and remote["counts"]["errors"] == {}
    # every stage is its own Ray Data operator (no prepare work fused into an agent's actors)
    operators = [line for line in executor.last_stats.splitlines() if line.startswith("Operator ")]
    assert any("MapBatches(_prepare_stage)" in op for op in operators)
    assert any("MapBatches(_commit_stage)" in op for op in operators)
    assert all("->" not in op for op in operators), operators


@pytest.mark.slow  # loads the embedded models in both executors
@pytest.mark.timeout(400)
def test_embedded_with_default_pools_on_two_cpus_equals_local(ray_address, tmp_path, examples, monkeypatch):
    """What `visa score --executor ray --recipe embedded` does on a 2-CPU machine: no pool settings at
    all; the executor fits its pools to the cluster and gives the local table."""
    records = [r for r in json.loads((examples / "llava.json").read_text()) if r["id"] in EXAMPLE_IDS]
    data = tmp_path / "examples.json"
    data.write_text(json.dumps(records))
    recipe = with_shard_size(load_recipe("embedded"), 2)
    with one_thread(monkeypatch):
        score(recipe, data, tmp_path / "local", image_root=examples)
    executor = RayExecutor()
    remote = score(recipe, data, tmp_path / "ray", image_root=examples, executor=executor)
    assert table_of(tmp_path / "ray") == table_of(tmp_path / "local")
    assert remote["counts"]["errors"] == {} and remote["counts"]["records"] == len(EXAMPLE_IDS)


def _awkward_dataset(folder: Path) -> Path:
    """Gradient images shared across shards, plus every kind of per-sample trouble."""
    data = make_dataset(folder, n_images=7, per_image=2)
    Image.new("RGB", (40, 40), (5, 5, 5)).save(folder / "img" / "dark.png")  # the agent raises on it
    (folder / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # cannot be decoded
    records = json.loads(data.read_text())
    turn = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a picture"}]
    extra = [
        {"id": "dark", "image": "img/dark.png", "conversations": turn},
        {"id": "missing", "image": "img/none.png", "conversations": turn},
        {"id": "broken", "image": "img/broken.png", "conversations": turn},
        {"id": "bad", "conversations": "not a list"},
        {"id": "again", "image": "img/0.png", "conversations": turn},  # an image first seen shards earlier
        {"id": "dark-again", "image": "img/dark.png", "conversations": turn},
    ]
    data.write_text(json.dumps(records[:5] + extra[:3] + records[5:11] + extra[3:] + records[11:]))
    return data


@pytest.mark.timeout(90)
def test_test_agents_with_needs_and_errors_same_table_as_local(ray_address, tmp_path):
    data = _awkward_dataset(tmp_path / "d")
    recipe = light_recipe(tmp_path, shard_size=4, fail_on_dark=True, with_sample_agent=True)
    score(recipe, data, tmp_path / "local")
    # the two image agents share one pool (one decode per image); the sample agent gets its upstream
    # values from the other pool, with the shard or from the store
    executor = RayExecutor(
        pools={"*": SMALL["*"], "image.stats": {"group": "pixels"}, "light.mean": {"group": "pixels"}}, task_cpus=0.25
    )
    assert [p.columns for p in executor.placements(recipe)] == [("image.stats", "light.mean"), ("words.answer",)]
    record = score(recipe, data, tmp_path / "ray", executor=executor)
    rows = table_of(tmp_path / "ray")
    assert rows == table_of(tmp_path / "local")

    by_id = {r["sample_id"]: r for r in rows}
    assert by_id["missing"]["error_kind"] == "missing"
    assert by_id["bad"]["error_kind"] == "malformed"
    assert by_id["broken"]["light.mean"] is None and by_id["broken"]["image.stats"] is None
    for sid in ("dark", "dark-again"):
        assert by_id[sid]["error_kind"] == "agent" and "too dark" in by_id[sid]["error"]
        assert by_id[sid]["image.stats"] is not None  # the other image agent still scored it
    assert by_id["again"]["light.mean"] == by_id["s0-0"]["light.mean"] is not None
    good = [r for r in rows if r["error"] is None and r["image_key"]]
    assert len(good) == 15
    for r in good:  # the sample agent got its upstream value, whichever actor computed it
        assert r["words.answer.seen_brightness"] == pytest.approx(r["light.mean"])
    assert by_id["broken"]["error_kind"] == "truncated"  # decoded (and refused) inside the agent's actor
    assert record["counts"]["errors"] == {"agent": 2, "malformed": 1, "missing": 1, "truncated": 1}
    assert record["shards"]["total"] == 6
    # each unique image was scored once, although it reappears in later shards
    planned, _ = plan_agents(recipe)
    mean = next(p for p in planned if p.column == "light.mean")
    stored = WorkDir(tmp_path / "ray").read_results(mean.fingerprint)
    files = WorkDir(tmp_path / "ray").result_files(mean.fingerprint)
    assert sum(pq.read_metadata(f).num_rows for f in files) == stored.num_rows == 8  # 7 gradients + dark


@pytest.mark.timeout(90)
def test_image_agent_reading_image_agents_in_earlier_pools(ray_address, tmp_path):
    from test_needs import chain_recipe

    data = _awkward_dataset(tmp_path / "d")
    text = chain_recipe(tmp_path).read_text().replace("{batch_size: 3}", "{batch_size: 3, fail_on_dark: true}")
    recipe = with_shard_size(load_recipe(write_recipe(tmp_path / "chain-dark.yaml", text)), 4)
    score(recipe, data, tmp_path / "local")
    executor = ray_executor()
    # one pool per agent; the reader's pool comes after the pools of the agents it needs
    assert [p.columns for p in executor.placements(recipe)] == [("light.mean",), ("image.stats",), ("follow.sum",)]
    record = score(recipe, data, tmp_path / "ray", executor=executor)
    rows = table_of(tmp_path / "ray")
    assert rows == table_of(tmp_path / "local")
    good = [r for r in rows if r["light.mean"] is not None]
    assert len(good) == 15
    for r in good:  # the values crossed from the earlier pools with the shard, or from the store
        assert r["follow.sum.seen"] == pytest.approx(r["light.mean"] + r["image.stats"])
    assert record["timings"]["agents"]["follow.sum"]["items"] == 8  # 7 gradients and dark (an error there), once each


DRIVER = """
import sys
from pathlib import Path
from visa.executors.ray import RayExecutor
from visa.recipe import load_recipe
from visa.scoring import score
recipe, data, out, address = sys.argv[1:5]
executor = RayExecutor(address, pools={"*": {"size": 1, "cpus": 0.25}}, task_cpus=0.25)
score(load_recipe(recipe), Path(data), Path(out), executor=executor)
"""


def _calls(log: Path) -> int:
    return sum(int(x) for x in log.read_text().split()) if log.exists() else 0


@pytest.mark.timeout(180)
def test_killed_driver_then_rerun_equals_uninterrupted(ray_address, tmp_path):
    data = make_dataset(tmp_path / "d", n_images=20, per_image=2)  # 41 records, 14 shards
    log = tmp_path / "calls.log"  # the test agent appends the size of every batch it scores
    recipe = write_recipe(
        tmp_path / "slow.yaml",
        f"""
execution: {{shard_size: 3}}
probes: {{enabled: false}}  # the call counts below are the pool's shards (probes are a run of their own)
scores:
  image:
    agents: [{{name: stats, type: image_stats}}]
  light:
    agents:
      - name: mean
        type: 'agents_for_tests:MeanBrightness'
        params: {{delay_s: 0.3, batch_size: 1, call_log: '{log}'}}
  words:
    agents: [{{name: answer, type: 'agents_for_tests:AnswerLength'}}]
""",
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS), os.environ.get("PYTHONPATH", "")])}
    run = tmp_path / "killed"
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(recipe), str(data), str(run), ray_address],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    work = WorkDir(run)
    light_fp = next(p.fingerprint for p in plan_agents(load_recipe(recipe))[0] if p.column == "light.mean")

    def progress() -> tuple[int, int]:
        """(finished shards, images whose brightness is stored)."""
        stored = len(work.known_keys(light_fp)) if (work.results_dir / light_fp).exists() else 0
        return len(list(work.samples_dir.glob("*.done"))), stored

    # Ray streams shards through the stages, so markers may arrive late and together: interrupt as
    # soon as either finished shards or stored agent results exist.
    deadline = time.time() + 90
    while progress() == (0, 0) and time.time() < deadline and driver.poll() is None:
        time.sleep(0.02)
    driver.send_signal(signal.SIGKILL)
    _, err = driver.communicate(timeout=30)
    time.sleep(2)  # the dead driver's actors are stopped by Ray, not at once
    done_before, stored_before = progress()
    calls_before = _calls(log)
    assert done_before < 14 and stored_before < 20, (
        f"the run must be interrupted mid-way for this test to mean anything: {err.decode()[-2000:]}"
    )
    assert done_before + stored_before > 0
    assert not (run / "scores.parquet").exists()

    record = score(load_recipe(recipe), data, run, executor=ray_executor())
    assert record["shards"]["resumed"] >= done_before and record["shards"]["total"] == 14
    assert _calls(log) - calls_before == 20 - stored_before  # what was stored is not computed again
    score(load_recipe(recipe), data, tmp_path / "clean")
    assert table_of(run) == table_of(tmp_path / "clean")


@pytest.mark.timeout(60)
def test_agent_that_cannot_set_up_stops_the_run_with_its_message(ray_address, tmp_path):
    data = make_dataset(tmp_path / "d", n_images=2, per_image=1)
    recipe = load_recipe(write_recipe(
        tmp_path / "broken.yaml", "scores:\n  tags:\n    agents: [{name: t, type: 'test_ray_executor:BrokenSetup'}]\n"
    ))
    with pytest.raises(ExecutorError, match="weights not found at /models/tagger"):
        score(recipe, data, tmp_path / "run", executor=ray_executor())
    assert not list((tmp_path / "run" / "work" / "samples").glob("*.done"))


@pytest.mark.timeout(90)
def test_an_input_that_crashes_the_actor_stops_the_run_instead_of_looping(ray_address, tmp_path):
    data = make_dataset(tmp_path / "d", n_images=1, per_image=1)
    recipe = load_recipe(write_recipe(
        tmp_path / "crash.yaml", "scores:\n  sc:\n    agents: [{name: c, type: 'test_ray_executor:Crasher'}]\n"
    ))
    with pytest.raises(ExecutorError, match="shard 0 was started 2 times by sc.c without finishing"):
        score(recipe, data, tmp_path / "run", executor=ray_executor(max_attempts=2))


def test_pools_larger_than_the_cluster_are_refused_before_any_work(ray_address, tmp_path):
    data = make_dataset(tmp_path / "d", n_images=2, per_image=1)
    greedy = RayExecutor(pools={"*": {"size": 2, "cpus": 1.0}}, task_cpus=0.25)
    with pytest.raises(RecipeError, match=r"need \d+ CPUs .* but the Ray cluster has 2 "):
        score(load_recipe("embedded"), data, tmp_path / "run", executor=greedy)
    assert not (tmp_path / "run" / "work" / "samples").exists()


def placed(executor: RayExecutor, recipe) -> dict:
    return {"+".join(p.columns): p for p in executor.placements(recipe)}


def test_placement_layers_and_gpu_packing(tmp_path):
    pytest.importorskip("ray")
    recipe = load_recipe(write_recipe(tmp_path / "gpu.yaml", """
scores:
  image:
    agents: [{name: stats, type: image_stats}]
  oa:
    agents: [{name: tagger, type: 'test_ray_executor:GpuTagger'}]
"""))
    declared = placed(RayExecutor(), recipe)
    assert (declared["oa.tagger"].cpus, declared["oa.tagger"].gpus, declared["oa.tagger"].size) == (2.0, 1.0, 1)
    assert (declared["image.stats"].cpus, declared["image.stats"].gpus) == (1.0, 0.0)

    packed = placed(RayExecutor(gpu_memory_gb=24), recipe)
    assert packed["oa.tagger"].gpus == 0.25  # 6 GB of a 24 GB GPU

    layered = RayExecutor(pools={"*": {"cpus": 0.5}, "oa.tagger": Pool(size=(1, 4), gpus=0.5, memory_gb=2)})
    by_column = placed(layered, recipe)
    assert by_column["image.stats"].cpus == 0.5
    tagger = by_column["oa.tagger"]
    assert (tagger.cpus, tagger.gpus, tagger.size, tagger.memory_bytes) == (0.5, 0.5, (1, 4), 2 * 2**30)

    shared = placed(RayExecutor(pools={"*": {"group": "one"}}), recipe)  # one process runs both
    assert list(shared) == ["image.stats+oa.tagger"] and (shared["image.stats+oa.tagger"].cpus, shared[
        "image.stats+oa.tagger"].gpus) == (2.0, 1.0)

    cpu_only = [{"CPU": 16.0}]
    with pytest.raises(RecipeError, match="need 1 GPUs but the Ray cluster has 0"):
        RayExecutor().check_fits(RayExecutor().placements(recipe), cpu_only)
    two_small_gpus = [{"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}]
    wide = RayExecutor(pools={"oa.tagger": {"gpus": 2}})
    with pytest.raises(RecipeError, match="no node of the Ray cluster can hold one actor of oa.tagger"):
        wide.check_fits(wide.placements(recipe), two_small_gpus)
    RayExecutor().check_fits(RayExecutor().placements(recipe), two_small_gpus)  # fits: no error

    for bad in ({"size": 0}, {"size": (3, 2)}, {"cpus": 0}, {"gpus": -1}, {"sise": 2}):
        with pytest.raises(ValueError):
            Pool.of(bad)


class ModelSpec(BaseModel):
    model: str = "m"


class ModelReader(Agent):
    """A sample agent that queries a model backend named by its params (placement tests only)."""

    unit = Unit.SAMPLE
    uses_images = False

    class Params(AgentParams):
        backend: ModelSpec = Field(default_factory=ModelSpec)

    def score_batch(self, items):
        return [{"score": 0.0} for _ in items]


def test_agents_on_one_backend_share_a_pool_and_needs_keep_order(tmp_path):
    pytest.importorskip("ray")
    recipe = load_recipe(write_recipe(tmp_path / "lm.yaml", """
scores:
  pt:
    agents: [{name: lm, type: 'test_ray_executor:ModelReader'}]
  im:
    agents:
      - {name: lm, type: 'test_ray_executor:ModelReader'}
      - {name: big, type: 'test_ray_executor:ModelReader', params: {backend: {model: other}}}
"""))
    assert [p.columns for p in RayExecutor().placements(recipe)] == [("pt.lm", "im.lm"), ("im.big",)]
    separate = RayExecutor(pools={"im.lm": {"group": "alone"}})
    assert [p.columns for p in separate.placements(recipe)] == [("pt.lm",), ("im.lm",), ("im.big",)]

    needs = light_recipe(tmp_path, with_sample_agent=True)  # words.answer needs light.mean
    backwards = RayExecutor(pools={"image.stats": {"group": "g"}, "words.answer": {"group": "g"}})
    with pytest.raises(RecipeError, match="words.answer needs 'light.mean', which is computed in a later actor pool"):
        backwards.placements(needs)


def test_result_index_reads_only_new_files(tmp_path):
    work = WorkDir(tmp_path)

    def results(keys: list[str]) -> pa.Table:
        return pa.table({"key": keys, "score": [float(len(k)) for k in keys], "error": [None] * len(keys)})

    work.write_results("fp", 0, results(["a", "bb"]))
    index = ResultIndex(work, "fp", ["score"])
    assert index.refresh() == 1 and index.keys == {"a", "bb"} and index.values["bb"] == {"score": 2.0}
    assert index.refresh() == 0
    mine = work.write_results("fp", 1, results(["ccc"]))
    index.add(results(["ccc"]))
    index.mark_seen(mine)
    work.write_results("fp", 2, results(["dddd", "a"]))  # another worker; "a" again
    assert index.refresh() == 1 and "dddd" in index and index.values["a"] == {"score": 1.0}


def test_local_runs_never_import_ray_and_a_missing_ray_is_one_clear_error(tmp_path):
    data = make_dataset(tmp_path / "d", n_images=2, per_image=1)
    recipe = write_recipe(tmp_path / "stats.yaml", "scores:\n  image:\n    agents: [{name: stats, type: image_stats}]\n")
    code = f"""
import sys
sys.modules["ray"] = None  # as if Ray were not installed
from pathlib import Path
from visa.agents.base import MissingDependency
from visa.recipe import load_recipe
from visa.scoring import score
recipe, data = load_recipe({str(recipe)!r}), Path({str(data)!r})
score(recipe, data, Path({str(tmp_path / "local")!r}))
from visa.executors.ray import RayExecutor
try:
    score(recipe, data, Path({str(tmp_path / "ray")!r}), executor=RayExecutor())
except MissingDependency as err:
    print("MISSING:", err)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "local" / "scores.parquet").exists()
    assert "MISSING: the Ray executor needs the 'ray' package: pip install 'visa[ray]'" in proc.stdout


def test_default_pools_fit_a_small_cluster_and_explicit_pools_win(tmp_path, examples):
    pytest.importorskip("ray")
    recipe = load_recipe("embedded")
    planned = plan_agents(recipe)[0]
    executor = RayExecutor()
    default = executor.placements(recipe, planned)
    assert len(default) > 2  # one pool per agent or shared model: more CPUs than a laptop has
    two_cpus = [{"CPU": 2.0}]
    fitted = executor.fit(recipe, planned, default, two_cpus)
    executor.check_fits(fitted, two_cpus)  # no error: it runs on 2 CPUs
    # every CPU-only agent in one pool, in pipeline order, as one local process runs them
    assert [p.columns for p in fitted] == [tuple(p.column for p in planned)]
    # a cluster that holds the default pools keeps them
    assert executor.fit(recipe, planned, default, [{"CPU": 64.0}]) == default

    # Grouping that would put a need behind its producer is not done: CPUs are scaled instead.
    needs = light_recipe(tmp_path, with_sample_agent=True)
    split = RayExecutor(pools={"light.mean": {"group": "late"}})
    needs_planned = plan_agents(needs)[0]
    one_cpu = [{"CPU": 1.5}]
    shrunk = split.fit(needs, needs_planned, split.placements(needs, needs_planned), one_cpu)
    split.check_fits(shrunk, one_cpu)
    assert sum(p.min_size * p.cpus for p in shrunk) <= 0.5

    # Explicit pool settings are never shrunk: the refusal names them.
    greedy = RayExecutor(pools={"*": {"cpus": 1.0}})
    explicit = greedy.placements(recipe, planned)
    assert greedy.fit(recipe, planned, explicit, two_cpus) == explicit
    with pytest.raises(RecipeError, match="lower pool size or cpus"):
        greedy.check_fits(explicit, two_cpus)


def test_default_gpu_pools_share_a_small_gpu_box(tmp_path):
    pytest.importorskip("ray")
    recipe = load_recipe(write_recipe(tmp_path / "gpu.yaml", """
scores:
  oa:
    agents:
      - {name: a, type: 'test_ray_executor:GpuTagger'}
      - {name: b, type: 'test_ray_executor:GpuTagger'}
      - {name: c, type: 'test_ray_executor:GpuTagger', pool: {gpus: 1}}
"""))
    planned = plan_agents(recipe)[0]
    executor = RayExecutor()
    one_gpu_box = [{"CPU": 16.0, "GPU": 2.0}]
    fitted = {"+".join(p.columns): p for p in executor.fit(recipe, planned, executor.placements(recipe, planned), one_gpu_box)}
    assert fitted["oa.c"].gpus == 1.0  # set in the recipe: kept
    assert fitted["oa.a"].gpus == fitted["oa.b"].gpus == 0.5  # the defaults share the other GPU
    executor.check_fits(list(fitted.values()), one_gpu_box)
