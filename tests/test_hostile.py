"""Hostile input end to end: valid-but-hostile JSON, empty inputs, metadata that would explode the table.

Every case must give exactly one row per record (an error row with its line for a bad one), lose
no other row, and give the same table when the run is resumed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from visa.assemble import MAX_META_COLUMNS, MAX_META_FIELDS_PER_RECORD, META_OVERFLOW
from visa.readers import open_input
from visa.recipe import load_recipe
from visa.scoring import score

hostile = pytest.importorskip("hostile")

STATS = """
name: stats
execution: {shard_size: 5}
scores:
  image:
    agents: [{name: stats, type: image_stats}]
"""


def same(a: pa.Table, b: pa.Table) -> bool:
    """Tables equal column for column, NaN equal to NaN (hostile metadata holds NaN)."""
    text = lambda t: json.dumps(t.to_pylist(), default=str)  # noqa: E731 - NaN serialises as NaN
    return a.schema.equals(b.schema) and text(a) == text(b)


@pytest.fixture()
def stats_recipe(tmp_path: Path):
    path = tmp_path / "stats.yaml"
    path.write_text(STATS)
    return load_recipe(path)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reader_gives_one_record_per_hostile_element(tmp_path: Path, seed: int) -> None:
    jsonl, array, expected = hostile.write_hostile_json(tmp_path, seed)
    kinds = list(expected.values())
    for path in (jsonl, array):
        raws = list(open_input(path).iter_raw())
        assert [r.index for r in raws] == list(range(len(kinds)))
        for raw, kind in zip(raws, kinds, strict=True):
            if kind == "malformed":
                assert raw.record is None and raw.error.startswith(f"line {raw.line}:"), raw.error[:200]
            else:
                assert raw.record is not None, raw.error


@pytest.mark.parametrize("seed", [0, 1])
def test_hostile_json_scores_to_one_row_per_record_and_resumes(tmp_path: Path, stats_recipe, seed: int) -> None:
    jsonl, array, expected = hostile.write_hostile_json(tmp_path / "d", seed)
    kinds = list(expected.values())
    tables = {}
    for path in (jsonl, array):
        run = tmp_path / f"run-{path.suffix}"
        score(stats_recipe, path, run)
        table = pq.read_table(run / "scores.parquet")
        rows = table.to_pylist()
        assert len(rows) == len(kinds)
        for row, kind in zip(rows, kinds, strict=True):
            assert row["error_kind"] == kind, (row["sample_id"][:40], row["error"])
            if kind is None:
                assert row["image.stats.width"] == 451  # the photo was scored for every usable record
            else:
                assert row["error"].startswith(f"malformed: line {row['line']}:")
        meta = [c for c in table.column_names if c.startswith("meta.")]
        assert len(meta) <= MAX_META_COLUMNS
        overflow = [json.loads(v) for v in table.column(META_OVERFLOW).to_pylist() if v is not None]
        assert any(len(v) >= 1000 for v in overflow)  # the wide record's fields were kept, as text
        for row in rows:
            assert sum(row[c] is not None for c in meta) <= MAX_META_FIELDS_PER_RECORD
        score(stats_recipe, path, run)  # resume: same table
        assert same(pq.read_table(run / "scores.parquet"), table)
        tables[path.suffix] = table
    ignore = ["line", "error"]  # the array file starts one line later
    assert same(tables[".jsonl"].drop_columns(ignore), tables[".json"].drop_columns(ignore))


def test_integers_beyond_64_bits_are_kept_as_text(tmp_path: Path, stats_recipe) -> None:
    data = tmp_path / "d.jsonl"
    turns = '"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]'
    data.write_text(
        f'{{"id": "a", "n": {2**63}, "m": {{"k": {-(2**64)}}}, {turns}}}\n'
        f'{{"id": "b", "n": 3, "m": {{"k": 4}}, {turns}}}\n'
        f'{{"id": "c", "big": {"9" * 5000}, {turns}}}\n'
    )
    score(stats_recipe, data, tmp_path / "run")
    table = pq.read_table(tmp_path / "run" / "scores.parquet")
    assert table.column("meta.n").to_pylist() == [str(2**63), "3", None]
    assert table.column("meta.m.k").to_pylist() == [str(-(2**64)), "4", None]
    assert table.column("meta.big").to_pylist() == [None, None, "9" * 5000]
    assert table.column("error").null_count == 3


def test_many_distinct_metadata_fields_are_capped(tmp_path: Path, stats_recipe) -> None:
    data = tmp_path / "d.jsonl"
    turns = '"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]'
    lines = [f'{{"id": "r{i}", "f{i}": {i}, "g{i}": "x", {turns}}}' for i in range(400)]  # 800 distinct fields
    data.write_text("\n".join(lines) + "\n")
    score(stats_recipe, data, tmp_path / "run")
    table = pq.read_table(tmp_path / "run" / "scores.parquet")
    meta = [c for c in table.column_names if c.startswith("meta.")]
    assert len(meta) == MAX_META_COLUMNS
    assert meta[:2] == ["meta.f0", "meta.g0"]  # first come, in input order
    overflow = table.column(META_OVERFLOW).to_pylist()
    assert overflow[0] is None and json.loads(overflow[-1]) == {"f399": 399, "g399": "x"}


@pytest.mark.parametrize("name", ["empty.jsonl", "blank.jsonl", "array.json", "rows.parquet"])
def test_empty_input_is_one_clear_line(tmp_path: Path, name: str) -> None:
    """Nothing to score: refused with one line and exit 2 before any model loads, no run folder made."""
    from visa.assemble import assemble
    from visa.pipeline import plan_agents
    from visa.store import WorkDir

    data = tmp_path / name
    if name == "empty.jsonl":
        data.write_text("")
    elif name == "blank.jsonl":
        data.write_text("\n  \n\n")
    elif name == "array.json":
        data.write_text(" [ ] \n")
    else:
        pq.write_table(pa.table({"id": pa.array([], pa.string())}), data)
    recipe = tmp_path / "stats.yaml"
    recipe.write_text(STATS)
    rc, err = _cli(["score", "--recipe", str(recipe), "--data", str(data), "--out", str(tmp_path / "run")])
    assert rc == 2 and "no records" in _one_line_error(err)
    assert not (tmp_path / "run").exists()
    # and a store with no shards assembles to an empty table with every column, not a KeyError
    planned, decode = plan_agents(load_recipe(recipe))
    table = assemble(WorkDir(tmp_path / "empty-run"), 0, planned, decode["fingerprint"])
    assert table.num_rows == 0 and {"row", "sample_id", "error", "image.stats"} <= set(table.column_names)


def test_parquet_text_that_is_not_utf8_is_one_error_row(tmp_path: Path, stats_recipe) -> None:
    turns = [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]
    ids = pa.array([b"a", b"b\xff\xfe", b"c"], pa.binary()).view(pa.string())  # Parquet does not check UTF-8
    data = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": ids, "conversations": pa.array([turns] * 3)}), data)
    record = score(stats_recipe, data, tmp_path / "run")
    rows = pq.read_table(tmp_path / "run" / "scores.parquet").to_pylist()
    assert [r["error_kind"] for r in rows] == [None, "malformed", None]
    assert rows[1]["error"] == "malformed: line 2: a text value holds bytes that are not valid UTF-8 (byte 1)"
    assert [r["sample_id"] for r in rows] == ["a", "row:1", "c"]
    assert record["counts"]["malformed_lines"] == [2]


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_data_that_is_not_a_regular_file_is_refused_at_once(tmp_path: Path, kind: str) -> None:
    import os
    import time

    from visa.readers import InputError

    if kind == "fifo":
        path = tmp_path / "data.jsonl"
        os.mkfifo(path)  # reading it would block forever
    else:
        path = Path("/dev/zero")  # reading it would never end
    started = time.monotonic()
    with pytest.raises(InputError, match="not a regular file"):
        open_input(path)
    assert time.monotonic() - started < 5


def _swap_forever(folder: str, target: str) -> None:
    """Turn ``folder`` into a symlink to ``target`` and back, as fast as possible, until killed."""
    import os
    import time

    parked = folder + ".parked"
    while True:
        os.rename(folder, parked)
        os.symlink(target, folder)
        time.sleep(0.0005)
        os.unlink(folder)
        os.rename(parked, folder)
        time.sleep(0.0005)


def test_folder_swapped_for_a_symlink_while_reading_never_reads_outside(tmp_path: Path) -> None:
    import multiprocessing as mp

    from visa.images import ImageError, ImageSource
    from visa.samples import ImageRef

    root, outside = tmp_path / "root", tmp_path / "outside"
    for base, text in ((root / "images", b"INSIDE"), (outside, b"OUTSIDE-SECRET")):
        (base / "dir").mkdir(parents=True)
        (base / "dir" / "a.jpg").write_bytes(text)
    swapper = mp.get_context("fork").Process(
        target=_swap_forever, args=(str(root / "images" / "dir"), str(outside / "dir")), daemon=True
    )
    source = ImageSource(root)
    seen: dict[str, int] = {}
    swapper.start()
    try:
        for _ in range(20_000):
            try:
                outcome = source.read_bytes(ImageRef(path="images/dir/a.jpg")).decode()
            except ImageError as err:
                assert "OUTSIDE" not in err.message
                outcome = err.kind
            seen[outcome] = seen.get(outcome, 0) + 1
    finally:
        swapper.kill()
        swapper.join()
    assert "OUTSIDE-SECRET" not in seen, seen
    assert seen.get("INSIDE", 0) > 0 and seen.get("path_escape", 0) > 0, seen  # the race did happen
    assert set(seen) <= {"INSIDE", "path_escape", "missing"}, seen


# -- a damaged run folder ------------------------------------------------------------------------------

LIGHT = """
name: light
execution: {shard_size: 3}
scores:
  image:
    agents: [{name: stats, type: image_stats}]
  light:
    agents: [{name: mean, type: 'agents_for_tests:MeanBrightness', params: {batch_size: 2}}]
  words:
    agents: [{name: answer, type: 'agents_for_tests:AnswerLength'}]
"""

DAMAGES = {
    "random": lambda data, rng: rng.randbytes(max(len(data), 16)),
    "empty": lambda data, rng: b"",
    "truncated": lambda data, rng: data[: len(data) // 2],
    "flipped": lambda data, rng: data[:-40] + bytes([data[-40] ^ 0x10]) + data[-39:] if len(data) > 40 else b"x",
    "invalid": lambda data, rng: b'{"agents": 7, "state": ',
    "deleted": None,
}


def _store_files(work: Path) -> dict[str, list[Path]]:
    """The files of a run's store, by kind."""
    results = sorted(work.glob("results/*/*.parquet"))
    return {
        "state": [work / "state.json"],
        "marker": sorted(work.glob("samples/*.done")),
        "samples": sorted(work.glob("samples/*.parquet")),
        "identity": sorted(work.glob("results/*/agent.json")),
        "results": results,
    }


def _light_dataset(tmp_path: Path) -> Path:
    from PIL import Image

    folder = tmp_path / "data"
    (folder / "img").mkdir(parents=True)
    records = []
    for i in range(5):
        Image.linear_gradient("L").resize((40 + i, 30)).point(lambda v, i=i: (v + 40 * i) % 256).save(
            folder / "img" / f"{i}.png"
        )
        for j in range(2):
            records.append({"id": f"s{i}-{j}", "image": f"img/{i}.png", "conversations": [
                {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "word " * (j + i + 1)}]})
    records.append({"id": "text", "conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]})
    (folder / "data.json").write_text(json.dumps(records))
    return folder / "data.json"


@pytest.mark.parametrize("kind", ["state", "marker", "samples", "identity", "results"])
def test_damaged_store_is_recomputed_and_said_so(tmp_path: Path, kind: str) -> None:
    import random
    import shutil

    path = tmp_path / "light.yaml"
    path.write_text(LIGHT)
    recipe = load_recipe(path)
    data = _light_dataset(tmp_path)
    clean = tmp_path / "clean"
    score(recipe, data, clean)
    expected = pq.read_table(clean / "scores.parquet")
    rng = random.Random(kind)
    for damage, how in DAMAGES.items():
        run = tmp_path / f"run-{damage}"
        shutil.copytree(clean, run)
        files = _store_files(run / "work")[kind]
        for victim in rng.sample(files, min(len(files), 3)):
            if how is None:
                victim.unlink()
            else:
                victim.write_bytes(how(victim.read_bytes(), rng))
        record = score(recipe, data, run)
        assert same(pq.read_table(run / "scores.parquet"), expected), (kind, damage)
        # a missing marker is the ordinary state of a shard cut short by a crash (redone without a
        # note); a missing agent.json is only an identity card, written again
        if kind not in ("marker", "identity") or how is not None:
            assert any(note.startswith("repaired:") for note in record["notes"]), (kind, damage, record["notes"])
        again = score(recipe, data, run)  # the repaired store is whole: nothing left to repair
        assert not any(note.startswith("repaired:") for note in again["notes"]), (kind, damage, again["notes"])
        assert again["shards"]["resumed"] == again["shards"]["total"]


def test_a_lost_result_is_never_a_silent_null(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Even with the resume check switched off, a row whose stored result is gone is an error row."""
    import visa.scoring

    path = tmp_path / "light.yaml"
    path.write_text(LIGHT)
    recipe = load_recipe(path)
    data = _light_dataset(tmp_path)
    run = tmp_path / "run"
    score(recipe, data, run)
    for victim in sorted((run / "work" / "results").glob("*/*.parquet")):
        if "seen_brightness" in pq.read_schema(victim).names:  # the sample agent's results
            victim.unlink()
            break
    monkeypatch.setattr(visa.scoring, "missing_results", lambda *args: {})
    score(recipe, data, run)
    rows = pq.read_table(run / "scores.parquet").to_pylist()
    lost = [r for r in rows if r["words.answer"] is None]
    assert lost and all(r["error_kind"] == "agent" and "no stored result" in r["error"] for r in lost)
    assert all(r["error"] is None for r in rows if r["words.answer"] is not None)


# -- bounded memory ------------------------------------------------------------------------------------

def _big_images(folder: Path, n: int, side: int = 1000) -> Path:
    """``n`` distinct side x side noise PNGs (~3 MB files, 4 MB each once decoded at 4 bytes a pixel)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(3)
    (folder / "img").mkdir(parents=True)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / "img" / f"{i}.png")
        lines.append(json.dumps({"id": f"r{i}", "image": f"img/{i}.png", "conversations": [
            {"from": "human", "value": "Describe."}, {"from": "gpt", "value": "Squares."}]}))
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "data.jsonl"


def test_memory_budget_bounds_payloads_and_decoded_pixels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from visa.images import ImageSource
    from visa.pipeline import AgentGroup, prepare_shard
    from visa.readers import open_input
    from visa.recipe import ExecutionSpec

    data = _big_images(tmp_path / "d", 8)
    records = list(open_input(data).iter_raw())
    budget = 1 << 24  # 16 MiB: 8 MiB of file bytes (2 files), 8 MiB of decoded pixels (2 images)
    file_size = (tmp_path / "d" / "img" / "0.png").stat().st_size
    execution = ExecutionSpec(memory_budget_bytes=budget)
    prepared = prepare_shard(0, records, ImageSource(tmp_path / "d"), frozenset(), execution)
    assert sum(len(b) for b in prepared.payloads.values()) <= budget // 2
    assert len(prepared.payloads) + len(prepared.reload) == 8
    assert len(prepared.reload) == 8 - (budget // 2) // file_size

    decoded: list[int] = []
    real = AgentGroup._decode

    def spy(self, shard, keys, prepared):  # noqa: ANN001, ANN202 - records how many images are held at once
        decoded.append(len(keys))
        return real(self, shard, keys, prepared)

    monkeypatch.setattr(AgentGroup, "_decode", spy)
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(STATS.replace("shard_size: 5", f"shard_size: 8, memory_budget_bytes: {budget}"))
    score(load_recipe(recipe_path), data, tmp_path / "tight")
    assert decoded and max(decoded) == 2  # two images of 4 MB fit the 8 MiB decoded half
    decoded.clear()
    recipe_path.write_text(STATS.replace("shard_size: 5", "shard_size: 8"))
    score(load_recipe(recipe_path), data, tmp_path / "default")
    assert max(decoded) == 8
    tight, default = (pq.read_table(tmp_path / r / "scores.parquet") for r in ("tight", "default"))
    assert same(tight, default) and tight.column("error").null_count == 8


def test_overlong_conversation_is_refused_before_any_agent(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    turns = lambda answer: [{"from": "human", "value": "Q"}, {"from": "gpt", "value": answer}]  # noqa: E731
    data.write_text("\n".join(json.dumps({"id": rid, "conversations": turns(a)}) for rid, a in (
        ("short", "fine"), ("long", "w" * 2_000_001), ("edge", "e" * 999_997))) + "\n")
    path = tmp_path / "light.yaml"
    path.write_text(LIGHT)
    record = score(load_recipe(path), data, tmp_path / "run")
    rows = pq.read_table(tmp_path / "run" / "scores.parquet").to_pylist()
    assert [r["error_kind"] for r in rows] == [None, "text_too_long", None]
    assert "2000002 characters" in rows[1]["error"] and rows[1]["words.answer"] is None
    assert rows[2]["words.answer"] == 1.0
    assert record["counts"]["errors"] == {"text_too_long": 1}


def test_an_image_read_again_must_be_the_same_image(tmp_path: Path) -> None:
    from visa.images import ImageError, ImageLimits, ImageSource
    from visa.pipeline import prepare_shard
    from visa.readers import open_input
    from visa.recipe import ExecutionSpec

    data = _big_images(tmp_path / "d", 4)
    prepared = prepare_shard(0, list(open_input(data).iter_raw()), ImageSource(tmp_path / "d"), frozenset(),
                             ExecutionSpec(memory_budget_bytes=1 << 24))
    key, ref = next(iter(prepared.reload.items()))
    assert prepared.payload(key, ImageLimits()) == (tmp_path / "d" / ref.path).read_bytes()
    (tmp_path / "d" / ref.path).write_bytes((tmp_path / "d" / "img" / "0.png").read_bytes())
    with pytest.raises(ImageError, match="changed while the run read it"):
        prepared.payload(key, ImageLimits())


# -- operating-system failures: one line, exit 2, and the rerun resumes -------------------------------

INJECT = """
import errno, os, sys
import visa.run_folder, visa.store

budget = int(os.environ["VISA_TEST_WRITES"])
real = visa.run_folder.atomic_write

def failing(path, content):
    global budget
    budget -= 1
    if budget < 0:
        raise OSError(int(os.environ["VISA_TEST_ERRNO"]), os.strerror(int(os.environ["VISA_TEST_ERRNO"])))
    return real(path, content)

visa.run_folder.atomic_write = visa.store.atomic_write = failing
sys.argv[0] = "visa"
from visa.cli import main
main()
"""


def _cli(args: list[str], env: dict[str, str] | None = None, inject: str | None = None) -> tuple[int, str]:
    import os
    import subprocess
    import sys

    code = ["-c", inject] if inject else ["-m", "visa.cli"]
    tests = str(Path(__file__).resolve().parent)
    path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, *code, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": path, **(env or {})})
    return proc.returncode, proc.stderr


def _one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize(("code", "words"), [(28, "no space left"), (30, "read-only file system"),
                                             (13, "permission denied")])
def test_write_failures_are_one_line_and_the_rerun_resumes(tmp_path: Path, code: int, words: str) -> None:
    path = tmp_path / "light.yaml"
    path.write_text(LIGHT)
    data = _light_dataset(tmp_path)
    args = ["score", "--recipe", str(path), "--data", str(data), "--out", str(tmp_path / "run")]
    rc, err = _cli(args, {"VISA_TEST_WRITES": "9", "VISA_TEST_ERRNO": str(code)}, INJECT)
    assert rc == 2
    line = _one_line_error(err)
    assert words in line and "rerun the same command" in line, line
    assert not list((tmp_path / "run").rglob(".*.tmp"))  # no temporary file left behind
    rc, err = _cli(["--debug", *args], {"VISA_TEST_WRITES": "0", "VISA_TEST_ERRNO": str(code)}, INJECT)
    assert rc != 0 and "Traceback" in err  # --debug shows where it failed
    assert _cli(args)[0] == 0
    score(load_recipe(path), data, tmp_path / "clean")
    assert same(pq.read_table(tmp_path / "run" / "scores.parquet"), pq.read_table(tmp_path / "clean" / "scores.parquet"))


def test_a_full_disk_is_one_line_and_the_rerun_resumes(tmp_path: Path) -> None:
    """A real full file system: a 64 KiB tmpfs (needs root and mount; else skipped, the injected
    ENOSPC above still runs)."""
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        path = tmp_path / "light.yaml"
        path.write_text(LIGHT)
        data = _light_dataset(tmp_path)
        args = ["score", "--recipe", str(path), "--data", str(data), "--out", str(mount / "run")]
        rc, err = _cli(args)
        assert rc == 2 and "no space left" in _one_line_error(err)
        assert not list(mount.rglob(".*.tmp"))
        subprocess.run(["mount", "-o", "remount,size=16m", str(mount)], check=True)
        assert _cli(args)[0] == 0
        score(load_recipe(path), data, tmp_path / "clean")
        assert same(pq.read_table(mount / "run" / "scores.parquet"), pq.read_table(tmp_path / "clean" / "scores.parquet"))
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_killed_worker_is_one_line_and_the_rerun_resumes(tmp_path: Path) -> None:
    data = _light_dataset(tmp_path)
    path = tmp_path / "kill.yaml"
    path.write_text(f"""
execution: {{shard_size: 3}}
scores:
  light:
    agents: [{{name: mean, type: 'agents_for_tests:KillOnce', params: {{marker: '{tmp_path / "killed"}'}}}}]
""")
    args = ["score", "--recipe", str(path), "--data", str(data), "--out", str(tmp_path / "run"), "--workers", "2"]
    rc, err = _cli(args)
    assert rc == 2 and "worker process died" in _one_line_error(err)
    assert _cli(args)[0] == 0
    rows = pq.read_table(tmp_path / "run" / "scores.parquet").to_pylist()
    assert len(rows) == 11 and all(r["error"] is None for r in rows)
    assert all(r["light.mean"] is not None for r in rows if r["image_key"])


# -- a shared run folder ---------------------------------------------------------------------------------

def test_a_second_command_on_a_busy_run_folder_is_refused_or_waits(tmp_path: Path) -> None:
    import os
    import threading
    import time

    from visa.run_lock import RunLock

    data = _light_dataset(tmp_path)
    path = tmp_path / "light.yaml"
    path.write_text(LIGHT)
    run = tmp_path / "run"
    args = ["score", "--recipe", str(path), "--data", str(data), "--out", str(run)]
    with RunLock(run):  # this test process plays the visa command that is using the folder
        (run / "work").mkdir()
        in_flight = run / "work" / ".state.json.123.tmp"  # a file the holder is writing
        in_flight.write_text("{}")
        rc, err = _cli(args)
        assert rc == 2 and f"pid {os.getpid()}" in _one_line_error(err) and "--wait" in err
        assert in_flight.exists() and not (run / "scores.parquet").exists()  # nothing of the holder's touched
    holder = RunLock(run).__enter__()
    released = threading.Timer(3.0, holder.__exit__, (None, None, None))
    started = time.monotonic()
    released.start()
    try:
        rc, err = _cli([*args, "--wait"])  # queues behind the holder, then runs
    finally:
        released.join()
    assert rc == 0 and time.monotonic() - started >= 3.0, err[-2000:]
    score(load_recipe(path), data, tmp_path / "clean")
    assert same(pq.read_table(run / "scores.parquet"), pq.read_table(tmp_path / "clean" / "scores.parquet"))


def test_an_input_inside_the_run_folder_outputs_is_refused(tmp_path: Path, stats_recipe) -> None:
    from visa.readers import InputError

    run = tmp_path / "run"
    (run / "work").mkdir(parents=True)
    for name in ("scores.parquet", "run.json", "selected.jsonl", "work/data.jsonl"):
        data = run / name
        data.write_text('{"id": "a", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}\n')
        with pytest.raises(InputError, match="run folder's own"):
            score(stats_recipe, data, run)
        assert data.read_text().startswith('{"id": "a"')  # untouched
    inside = run / "mine.jsonl"  # a file of the user's own inside --out is fine
    inside.write_text((run / "run.json").read_text())
    score(stats_recipe, inside, run)


def test_datasets_folder_listing_files_outside_itself_is_refused(tmp_path: Path) -> None:
    from visa.readers import InputError

    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "data-00000-of-00001.arrow").write_bytes(b"")
    (tmp_path / "secret.arrow").write_bytes(b"")
    for name in ("../secret.arrow", "/etc/passwd", "sub/../../secret.arrow"):
        (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": name}]}))
        with pytest.raises(InputError, match="must be .arrow files of the folder itself"):
            open_input(folder).files()


def test_run_folder_inside_the_input_folder_is_refused(tmp_path: Path, stats_recipe) -> None:
    from visa.readers import InputError

    folder = tmp_path / "parquet"
    folder.mkdir()
    pq.write_table(pa.table({"id": ["a"], "conversations": [[{"from": "human", "value": "Q"},
                                                              {"from": "gpt", "value": "A"}]]}), folder / "0.parquet")
    for out in (folder, folder / "run"):
        with pytest.raises(InputError, match="inside the input folder"):
            score(stats_recipe, folder, out)
    assert sorted(p.name for p in folder.iterdir()) == ["0.parquet"]


# -- visa select writes one generation ---------------------------------------------------------------------

KILL_AT = """
import os, signal, sys
count = 0
limit = int(os.environ["VISA_TEST_KILL_AT"])

def counted(real):
    def call(*args, **kwargs):
        global count
        count += 1
        if count == limit:
            os.kill(os.getpid(), signal.SIGKILL)  # as abrupt as a power cut for this process
        result = real(*args, **kwargs)
        with open(os.environ["VISA_TEST_COUNT"], "w") as fh:
            fh.write(str(count))
        return result
    return call

os.replace, os.rename = counted(os.replace), counted(os.rename)
sys.argv[0] = "visa"
from visa.cli import main
main()
"""


def _selection_set(run: Path) -> tuple:
    """What identifies one selection's outputs: the files' bytes and run.json's selection counts."""
    files = tuple((run / n).read_bytes() if (run / n).exists() else None
                  for n in ("selection.parquet", "selected.json", "dataset_info.json"))
    summary = json.loads((run / "run.json").read_text()).get("selection") or {}
    return (*files, summary.get("selected"), summary.get("budget"))


def test_select_killed_at_any_point_leaves_the_old_or_the_new_set(tmp_path: Path) -> None:
    import shutil

    from visa.run_folder import RunFolder

    path = tmp_path / "light.yaml"
    path.write_text(LIGHT)
    data = _light_dataset(tmp_path)
    base = tmp_path / "base"
    score(load_recipe(path), data, base)
    assert _cli(["select", str(base), "--budget", "3"])[0] == 0
    old = _selection_set(base)
    new_run = tmp_path / "new"
    shutil.copytree(base, new_run)
    count_file = tmp_path / "count"
    env = {"VISA_TEST_KILL_AT": "0", "VISA_TEST_COUNT": str(count_file)}
    assert _cli(["select", str(new_run), "--budget", "7"], env, KILL_AT)[0] == 0
    new = _selection_set(new_run)
    points = int(count_file.read_text())
    assert old != new and points >= 5
    outcomes = []
    for k in range(1, points + 1):
        run = tmp_path / f"kill{k}"
        shutil.copytree(base, run)
        rc, err = _cli(["select", str(run), "--budget", "7"], {**env, "VISA_TEST_KILL_AT": str(k)}, KILL_AT)
        assert rc == -9, (k, rc, err[-1500:])
        folder = RunFolder(run)
        with folder.lock():  # what the next visa command does first
            folder.recover()
        now = _selection_set(run)
        assert now in (old, new), k
        outcomes.append("new" if now == new else "old")
        leftovers = [p.name for p in run.iterdir() if p.name.startswith(".") and p.name != ".lock"]
        assert leftovers == [], (k, leftovers)
    assert "old" in outcomes and "new" in outcomes, outcomes  # kills landed before and after the commit point


def test_select_refuses_an_input_among_its_outputs_and_a_damaged_score_table(tmp_path: Path) -> None:
    import shutil

    path = tmp_path / "light.yaml"
    path.write_text(LIGHT)
    run = tmp_path / "run"
    data = _light_dataset(tmp_path)
    score(load_recipe(path), data, run)
    # the input moved to where selection writes its records (score refuses that; an older run.json may not)
    shutil.copyfile(data, run / "selected.json")
    record = json.loads((run / "run.json").read_text())
    record["input"].update(path=str(run / "selected.json"), fingerprint=open_input(run / "selected.json").fingerprint())
    (run / "run.json").write_text(json.dumps(record))
    before = (run / "selected.json").read_bytes()
    rc, err = _cli(["select", str(run), "--budget", "3"])
    assert rc == 2 and "run folder's own 'selected.json'" in _one_line_error(err)
    assert (run / "selected.json").read_bytes() == before and not (run / "selection.parquet").exists()

    other = tmp_path / "other"
    score(load_recipe(path), data, other)
    scores = other / "scores.parquet"
    for damage in (b"", b"PAR1" + bytes(64), scores.read_bytes()[: scores.stat().st_size // 2]):
        scores.write_bytes(damage)
        rc, err = _cli(["select", str(other), "--budget", "3"])
        assert rc == 2 and "rerun `visa score`" in _one_line_error(err), err[-1500:]
    assert _cli(["score", "--recipe", str(path), "--data", str(data), "--out", str(other)])[0] == 0
    assert _cli(["select", str(other), "--budget", "3"])[0] == 0


# -- the whole hostile corpus on every executor --------------------------------------------------------------

def _combined_corpus(folder: Path) -> tuple[Path, list[str | None]]:
    """The hostile image corpus followed by the hostile JSON records (same image root); expected kinds in order."""
    data, expected_images = hostile.build_hostile_corpus(folder)
    image_lines = [line for line in data.read_text().splitlines() if line.strip()]
    kinds: list[str | None] = []
    for k, line in enumerate(image_lines):
        try:
            kinds.append(expected_images[json.loads(line)["id"]])
        except ValueError:
            kinds.append(expected_images[f"row:{k}"])
    jsonl, _, expected_json = hostile.write_hostile_json(folder / "json", seed=5)
    json_lines = [line.replace('"images/chelsea.jpg"', '"json/images/chelsea.jpg"')
                  for line in jsonl.read_text().splitlines() if line.strip()]
    data.write_text("\n".join(image_lines + json_lines) + "\n")
    return data, kinds + list(expected_json.values())


@pytest.mark.timeout(600)
@pytest.mark.parametrize("executor", ["workers", "ray"])
def test_hostile_corpus_end_to_end_on_every_executor(tmp_path: Path, executor: str) -> None:
    if executor == "ray":
        pytest.importorskip("ray")
    data, kinds = _combined_corpus(tmp_path / "h")
    recipe = tmp_path / "cheap.yaml"
    recipe.write_text("""
execution: {shard_size: 7}
scores:
  image:
    agents: [{name: stats, type: image_stats, pool: {cpus: 0.5}}]
  sc:
    agents: [{name: felzenszwalb, type: felzenszwalb, pool: {cpus: 0.5}}]
""")
    score(load_recipe(recipe), data, tmp_path / "in-process")
    reference = pq.read_table(tmp_path / "in-process" / "scores.parquet")
    assert [r["error_kind"] for r in reference.select(["error_kind"]).to_pylist()] == kinds
    extra = ["--workers", "2"] if executor == "workers" else ["--executor", "ray"]
    env = {"RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"}
    run = tmp_path / executor
    rc, err = _cli(["score", "--recipe", str(recipe), "--data", str(data), "--out", str(run), *extra], env)
    assert rc == 0, err[-3000:]
    assert same(pq.read_table(run / "scores.parquet"), reference)
    rc, err = _cli(["score", "--recipe", str(recipe), "--data", str(data), "--out", str(run), *extra], env)
    assert rc == 0 and same(pq.read_table(run / "scores.parquet"), reference), err[-3000:]  # resumed: same table
