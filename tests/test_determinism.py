"""Two runs of the same data on the same machine give byte-identical score tables; threads are fixed."""

from __future__ import annotations

import json

import pytest

from visa.executors.local import LocalExecutor
from visa.recipe import ExecutionSpec, load_recipe
from visa.scoring import score
from visa.threads import available_cpus, resolve_threads

#: photos with text, faces and plain texture, a multi-image and a text-only record
IDS = ("astronaut-01", "text-01", "brick-01", "portraits-compare-01", "textonly-01")


@pytest.mark.slow  # the embedded recipe's real models (tagger, OCR, SmolLM2, MiniLM), twice
@pytest.mark.timeout(1200)
def test_embedded_recipe_twice_gives_byte_identical_scores(tmp_path, examples):
    records = [r for r in json.loads((examples / "llava.json").read_text()) if r["id"] in IDS]
    assert len(records) == len(IDS)
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    recipe = load_recipe("embedded")  # the default threads: auto
    recipe = recipe.model_copy(update={"execution": ExecutionSpec(shard_size=2)})
    runs = [score(recipe, data, tmp_path / name, image_root=examples) for name in ("first", "second")]
    first, second = ((tmp_path / name / "scores.parquet").read_bytes() for name in ("first", "second"))
    assert first == second
    assert all(run["recipe"]["execution"]["threads"] == available_cpus() for run in runs)
    assert all(run["counts"]["errors"] == {} for run in runs)
    # the language agents really ran (their columns are in the identical tables)
    assert runs[0]["timings"]["agents"]["pt.lm"]["items"] == len(IDS)


def test_threads_are_fixed_by_the_recipe_not_the_machine(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from test_scoring import cheap_recipe, make_dataset

    from visa.backends.embedded_lm import EmbeddedLMBackend
    from visa.threads import worker_threads

    seen: list[int] = []

    def spy(self, prepared, progress=None):
        seen.append(torch.get_num_threads())
        return original(self, prepared, progress)

    from visa.pipeline import AgentGroup

    original = AgentGroup.run
    monkeypatch.setattr(AgentGroup, "run", spy)
    monkeypatch.setattr("os.getloadavg", lambda: (50.0, 50.0, 50.0))  # a busy machine changes nothing
    before = torch.get_num_threads()
    recipe = load_recipe(cheap_recipe(tmp_path))
    recipe = recipe.model_copy(update={"execution": ExecutionSpec(shard_size=4, threads=3)})
    record = score(recipe, make_dataset(tmp_path / "d", n_images=3), tmp_path / "run")
    assert seen and set(seen) == {3}
    assert torch.get_num_threads() == before  # restored after an in-process run
    assert json.loads((tmp_path / "run" / "run.json").read_text())["recipe"]["execution"]["threads"] == 3
    assert record["recipe"]["execution"]["threads"] == 3
    with worker_threads(2):
        assert EmbeddedLMBackend().forward_threads() == 2
    assert EmbeddedLMBackend(EmbeddedLMBackend.Params(threads=1)).forward_threads() == 1


def test_auto_is_the_cpus_this_process_may_use_divided_among_workers(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 2, 4, 5, 6, 7}, raising=False)
    assert available_cpus() == 6
    assert [resolve_threads("auto", workers) for workers in (1, 2, 3, 4, 6, 12)] == [6, 3, 2, 1, 1, 1]
    assert resolve_threads(5, workers=2) == 5  # a number is used as it is
    assert LocalExecutor(2).auto_threads() == 3
    monkeypatch.setattr("os.getloadavg", lambda: (50.0, 50.0, 50.0))  # a busy machine changes nothing
    assert resolve_threads("auto", 2) == 3
    with pytest.raises(ValueError, match="workers"):
        resolve_threads("auto", 0)


@pytest.mark.parametrize("load", [0.0, 80.0])
def test_auto_threads_are_resolved_once_and_recorded_as_a_number(tmp_path, monkeypatch, load):
    """The default: the run's workers use the affinity mask's CPUs, whatever the load; run.json says how many."""
    torch = pytest.importorskip("torch")
    from test_scoring import cheap_recipe, make_dataset

    from visa.pipeline import AgentGroup

    assert ExecutionSpec().threads == "auto"
    assert load_recipe("embedded").execution.threads == "auto"
    seen: list[int] = []
    original = AgentGroup.run

    def spy(self, prepared, progress=None):
        seen.append(torch.get_num_threads())
        return original(self, prepared, progress)

    monkeypatch.setattr(AgentGroup, "run", spy)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr("os.getloadavg", lambda: (load, load, load))
    recipe = load_recipe(cheap_recipe(tmp_path))
    recipe = recipe.model_copy(update={"execution": ExecutionSpec(shard_size=4)})
    record = score(recipe, make_dataset(tmp_path / "d", n_images=3), tmp_path / "run")
    assert seen and set(seen) == {3}
    assert json.loads((tmp_path / "run" / "run.json").read_text())["recipe"]["execution"]["threads"] == 3
    assert record["recipe"]["execution"]["threads"] == 3


def test_a_thread_count_that_is_not_a_number_or_auto_is_refused(tmp_path):
    from visa.recipe import RecipeError

    for bad in ("all", 0, 1000):
        path = tmp_path / "bad.yaml"
        path.write_text(f"name: bad\nexecution: {{threads: {bad}}}\nscores:\n  image:\n    agents:\n"
                        "      - {name: stats, type: image_stats}\n")
        with pytest.raises(RecipeError, match="threads"):
            load_recipe(path)
