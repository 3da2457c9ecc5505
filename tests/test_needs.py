"""Image agents that read other image agents (``needs``): run order, values handed over, recipe errors."""

from __future__ import annotations

import itertools
import textwrap
from importlib import resources
from pathlib import Path

import pytest
import yaml
from test_scoring import make_dataset, table_of, write_recipe

from visa.pipeline import plan_agents
from visa.recipe import RecipeError, load_recipe
from visa.scoring import score
from visa.store import WorkDir


def chain_recipe(tmp_path: Path, *, offset: float = 0.0, follower_reads: str = "[light.mean, image.stats]",
                 extra: str = "") -> Path:
    """``follow.sum`` (listed first) reads ``light.mean`` and ``image.stats``, both listed after it."""
    return write_recipe(
        tmp_path / "chain.yaml",
        f"""
name: chain
execution: {{shard_size: 4}}
probes: {{enabled: false}}  # the call counts below are the pool's (probes add images of their own)
scores:
  follow:
    agents:
      - name: sum
        type: 'agents_for_tests:Follower'
        params: {{reads: {follower_reads}, offset: {offset}}}
  light:
    agents:
      - {{name: mean, type: 'agents_for_tests:MeanBrightness', params: {{batch_size: 3}}}}
  image:
    agents: [{{name: stats, type: image_stats}}]
{extra}""",
    )


def test_image_agent_runs_after_the_image_agents_it_needs(tmp_path, monkeypatch):
    recipe = load_recipe(chain_recipe(tmp_path))
    assert [b.column for b in recipe.build_agents()] == ["light.mean", "image.stats", "follow.sum"]
    data = make_dataset(tmp_path / "d", n_images=5, per_image=2)
    log = tmp_path / "calls.log"
    monkeypatch.setenv("VISA_TEST_CALL_LOG", str(log))
    record = score(recipe, data, tmp_path / "run")
    rows = table_of(tmp_path / "run")
    assert sum(int(x) for x in log.read_text().split()) == 5  # the upstream ran once per unique image
    timings = record["timings"]["agents"]
    assert timings["light.mean"]["items"] == timings["follow.sum"]["items"] == 5
    images = [r for r in rows if r["image_key"]]
    assert len(images) == 10
    for r in images:
        assert r["follow.sum.seen"] == pytest.approx(r["light.mean"] + r["image.stats"])
        assert r["follow.sum"] == r["follow.sum.seen"]
    text_only = rows[-1]
    assert text_only["image_key"] is None and text_only["follow.sum"] is None and text_only["error"] is None


def test_changed_reader_reads_its_upstream_from_the_store(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "d", n_images=4, per_image=1)
    log = tmp_path / "calls.log"
    monkeypatch.setenv("VISA_TEST_CALL_LOG", str(log))
    score(load_recipe(chain_recipe(tmp_path)), data, tmp_path / "run")
    before = {r["sample_id"]: r for r in table_of(tmp_path / "run")}
    log.write_text("")
    changed = score(load_recipe(chain_recipe(tmp_path, offset=10.0)), data, tmp_path / "run")
    assert log.read_text() == "" and "light.mean" not in changed["timings"]["agents"]
    assert changed["timings"]["agents"]["follow.sum"]["items"] == 4
    for row in table_of(tmp_path / "run"):
        if row["image_key"]:
            assert row["follow.sum"] == pytest.approx(before[row["sample_id"]]["follow.sum"] + 10.0)


def test_upstream_failure_reaches_the_reader_as_a_missing_value(tmp_path):
    data = make_dataset(tmp_path / "d", n_images=2, per_image=1)
    from PIL import Image

    Image.new("RGB", (40, 40), (5, 5, 5)).save(tmp_path / "d" / "img" / "0.png")  # too dark to score
    path = chain_recipe(tmp_path).read_text().replace("{batch_size: 3}", "{batch_size: 3, fail_on_dark: true}")
    recipe = load_recipe(write_recipe(tmp_path / "dark.yaml", path))
    score(recipe, data, tmp_path / "run")
    rows = {r["sample_id"]: r for r in table_of(tmp_path / "run")}
    assert rows["s0-0"]["light.mean"] is None and rows["s0-0"]["follow.sum"] is None
    assert rows["s0-0"]["error"] == "agent light.mean: ValueError: too dark to score"  # the cause is named
    follower = next(p for p in plan_agents(recipe)[0] if p.column == "follow.sum")
    stored = WorkDir(tmp_path / "run").read_results(follower.fingerprint).to_pylist()
    errors = {r["key"]: r["error"] for r in stored}
    assert errors[rows["s0-0"]["image_key"]] == "ValueError: no upstream value"
    assert errors[rows["s1-0"]["image_key"]] is None
    assert rows["s1-0"]["follow.sum"] == pytest.approx(rows["s1-0"]["light.mean"] + rows["s1-0"]["image.stats"])


def test_a_cycle_is_a_recipe_error_at_load_time(tmp_path):
    extra = """  loop:
    agents:
      - {name: a, type: 'agents_for_tests:Follower', params: {reads: [loop.b.seen]}}
      - {name: b, type: 'agents_for_tests:Follower', params: {reads: [light.mean, loop.c]}}
      - {name: c, type: 'agents_for_tests:Follower', params: {reads: [loop.a]}}
"""
    with pytest.raises(RecipeError, match=r"cycle: loop\.a -> loop\.b -> loop\.c -> loop\.a"):
        load_recipe(chain_recipe(tmp_path, extra=extra))
    with pytest.raises(RecipeError, match="follow.sum needs its own output"):
        load_recipe(chain_recipe(tmp_path, follower_reads="[light.mean, follow.sum.seen]"))


def test_a_missing_need_is_a_recipe_error_at_load_time(tmp_path):
    with pytest.raises(RecipeError, match="follow.sum needs column 'light.median', which no image agent"):
        load_recipe(chain_recipe(tmp_path, follower_reads="[light.median]"))
    # a value that only exists after the pool-level finalize (the tagger's score) cannot be read
    extra = "  oa:\n    agents: [{name: tagger, type: tagger}]\n"
    with pytest.raises(RecipeError, match="needs column 'oa.tagger'"):
        load_recipe(chain_recipe(tmp_path, follower_reads="[oa.tagger]", extra=extra))
    assert load_recipe(chain_recipe(tmp_path, follower_reads="[oa.tagger.entropy]", extra=extra))


def embedded_with_judge(tmp_path: Path) -> Path:
    """The bundled embedded recipe plus the ``dp`` section its comment tells users to add."""
    text = (resources.files("visa") / "recipes" / "embedded.yaml").read_text(encoding="utf-8")
    lines = text.splitlines()
    start = lines.index("#   dp:")
    snippet = [line[1:] for line in itertools.takewhile(lambda x: x.startswith("#  "), lines[start:])]
    recipe = yaml.safe_load(text)
    recipe["scores"].update(yaml.safe_load(textwrap.dedent("\n".join(snippet))))
    path = tmp_path / "embedded-judge.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def test_embedded_judge_reads_the_recipe_tagger_and_statistics(tmp_path) -> None:
    assert "dp" not in load_recipe("embedded").scores
    recipe = load_recipe(embedded_with_judge(tmp_path))  # as the bundled recipe's comment says
    bound = recipe.build_agents()
    order = [b.column for b in bound]
    judge = next(b.agent for b in bound if b.column == "dp.judge")
    assert judge.needs and all(c.startswith(("oa.tagger.", "image.stats")) for c in judge.needs)
    assert order.index("dp.judge") > max(order.index("oa.tagger"), order.index("image.stats"))
    assert [type(b.agent).__name__ for b in bound].count("TaggerAgent") == 1
