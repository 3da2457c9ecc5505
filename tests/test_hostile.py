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
def test_empty_input_gives_an_empty_valid_table(tmp_path: Path, stats_recipe, name: str) -> None:
    data = tmp_path / name
    if name == "empty.jsonl":
        data.write_text("")
    elif name == "blank.jsonl":
        data.write_text("\n  \n\n")
    elif name == "array.json":
        data.write_text(" [ ] \n")
    else:
        pq.write_table(pa.table({"id": pa.array([], pa.string())}), data)
    record = score(stats_recipe, data, tmp_path / "run")
    table = pq.read_table(tmp_path / "run" / "scores.parquet")
    assert table.num_rows == 0 and {"row", "sample_id", "error", "image.stats"} <= set(table.column_names)
    assert record["counts"]["records"] == 0
    assert any("no records" in note for note in record["notes"])


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
