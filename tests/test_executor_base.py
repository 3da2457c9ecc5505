"""The shared pending-shard loop: finished shards are reported as skipped and never handed out."""

from __future__ import annotations

from pathlib import Path

from test_scoring import light_recipe, make_dataset

from visa.executors.base import RunPlan, iter_shards
from visa.readers import open_input
from visa.scoring import score
from visa.store import WorkDir


def plan_for(recipe, data: Path, run: Path) -> RunPlan:
    return RunPlan(recipe, open_input(data).iter_raw(), data.parent, run, frozenset())


def test_iter_shards_cuts_consecutive_shards():
    shards = list(iter_shards(iter(range(10)), 4))
    assert shards == [(0, [0, 1, 2, 3]), (1, [4, 5, 6, 7]), (2, [8, 9])]
    assert list(iter_shards(iter([]), 4)) == []


def test_pending_skips_finished_shards_and_reports_them(tmp_path: Path):
    data = make_dataset(tmp_path / "data", n_images=5)  # 11 records: shards of 4, 4 and 3
    recipe = light_recipe(tmp_path, shard_size=4)
    run = tmp_path / "run"
    fresh: list = []
    assert [s for s, _ in plan_for(recipe, data, run).pending(fresh.append)] == [0, 1, 2]
    assert fresh == []

    score(recipe, data, run)
    skipped: list = []
    assert list(plan_for(recipe, data, run).pending(skipped.append)) == []
    assert [(s.shard, s.records, s.skipped) for s in skipped] == [(0, 4, True), (1, 4, True), (2, 3, True)]

    marker = WorkDir(run).samples_dir / "shard-00001.done"
    marker.unlink()
    skipped.clear()
    pending = plan_for(recipe, data, run).pending(skipped.append)
    first = next(pending)
    assert first[0] == 1 and [r.index for r in first[1]] == [4, 5, 6, 7]
    later: list = []
    pending.on_skipped = later.append  # a new receiver takes the rest
    assert list(pending) == []
    assert [s.shard for s in skipped] == [0] and [s.shard for s in later] == [2]


def test_a_changed_recipe_makes_every_shard_pending_again(tmp_path: Path):
    data = make_dataset(tmp_path / "data", n_images=3)
    run = tmp_path / "run"
    score(light_recipe(tmp_path, shard_size=4), data, run)
    changed = light_recipe(tmp_path, shard_size=4, scale=2.0)  # another agent fingerprint
    skipped: list = []
    assert [s for s, _ in plan_for(changed, data, run).pending(skipped.append)] == [0, 1]
    assert skipped == []
