"""Readers: format detection, streaming every record in order, error records, subsets written unchanged."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from visa.readers import Input, InputError, duplicate_ids, open_input
from visa.readers.json_array import JsonArrayInput
from visa.readers.jsonl import JsonlInput
from visa.samples import ImageRef, RecordError, normalize, sample_id

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(40))

RECORDS = [
    {
        "id": 0,
        "image": "coco/0.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": "A cat."},
        ],
    },
    {
        "id": 1,
        "image": ["a.jpg", "b.jpg"],
        "source": "multi",
        "conversations": [
            {"from": "human", "value": "<image>\n<image>\nCompare."},
            {"from": "gpt", "value": 'Left "red", right {blue} [x]\\'},
        ],
    },
    {
        "id": "t-2",
        "conversations": [
            {"from": "human", "value": "Text only, ünïcödé 字 🐱"},
            {"from": "gpt", "value": "ok"},
        ],
    },
    {
        "id": 3,
        "images": ["c.png"],
        "category": "chart",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read it."}]},
            {"role": "assistant", "content": "42"},
        ],
    },
    {
        "id": 4,
        "image": "d.jpg",
        "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}],
    },
]


def write_json(path: Path, records: list, *, indent: int | None = None) -> list[str]:
    """Write a JSON array; return each element's exact source text."""
    texts = [json.dumps(r, indent=indent, ensure_ascii=False) for r in records]
    path.write_text("[\n" + ",\n".join(texts) + "\n]\n", encoding="utf-8")
    return texts


def records_of(inp: Input) -> list:
    return [raw.record for raw in inp.iter_raw()]


# -- detection -------------------------------------------------------------------------------------


def test_open_input_detects_formats_and_rejects_others(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", RECORDS)
    (tmp_path / "a.jsonl").write_text(json.dumps(RECORDS[0]) + "\n")
    (tmp_path / "a.ndjson").write_text(json.dumps(RECORDS[0]) + "\n")
    pq.write_table(pa.table({"id": [1]}), tmp_path / "a.parquet")
    assert open_input(tmp_path / "a.json").format == "json"
    assert open_input(str(tmp_path / "a.jsonl")).format == "jsonl"
    assert open_input(tmp_path / "a.ndjson").format == "jsonl"
    inp = open_input(tmp_path / "a.parquet")
    assert (inp.format, inp.path) == ("parquet", tmp_path / "a.parquet")

    (tmp_path / "obj.json").write_text('{"id": 1}\n{"id": 2}\n')
    (tmp_path / "empty.json").write_text("  \n")
    (tmp_path / "a.csv").write_text("id\n1\n")
    (tmp_path / "nothing").mkdir()
    for name, words in [
        ("missing.json", "not found"),
        ("obj.json", "not an array"),
        ("empty.json", "empty"),
        ("a.csv", "unsupported input format '.csv'"),
        ("nothing", "neither"),
    ]:
        with pytest.raises(InputError, match=words) as err:
            open_input(tmp_path / name)
        assert isinstance(err.value, ValueError) and "\n" not in str(err.value)


# -- JSON array ------------------------------------------------------------------------------------


@pytest.mark.parametrize("indent", [None, 2])
def test_json_array_round_trip(tmp_path: Path, indent: int | None) -> None:
    texts = write_json(tmp_path / "in.json", RECORDS, indent=indent)
    inp = open_input(tmp_path / "in.json")
    raws = list(inp.iter_raw())
    assert [r.index for r in raws] == list(range(len(RECORDS)))
    assert [r.record for r in raws] == RECORDS
    assert [r.text for r in raws] == texts
    assert all(r.error is None for r in raws)
    assert raws[0].line == 2
    if indent is None:
        assert [r.line for r in raws] == [2, 3, 4, 5, 6]

    samples = [normalize(r) for r in raws]
    assert [s.record_id for s in samples] == ["0", "1", "t-2", "3", "4"]
    assert [len(s.images) for s in samples] == [1, 2, 0, 1, 1]
    assert samples[2].text_only and samples[3].turns[0].role == "system"

    out = inp.write_subset([1, 2, 4], tmp_path / "out")
    assert out == tmp_path / "out" / "selected.json"
    assert json.loads(out.read_text(encoding="utf-8")) == [RECORDS[1], RECORDS[2], RECORDS[4]]
    again = open_input(out)
    assert [r.text for r in again.iter_raw()] == [texts[1], texts[2], texts[4]]
    assert json.loads(inp.write_subset([], tmp_path / "none").read_text()) == []


@pytest.mark.parametrize("chunk_chars", [1, 3, 64])
def test_json_array_chunk_boundaries_anywhere(tmp_path: Path, chunk_chars: int) -> None:
    path = tmp_path / "in.json"
    texts = write_json(path, RECORDS * 3, indent=1)
    expected = [(r.line, r.text, r.record) for r in JsonArrayInput(path).iter_raw()]
    small = [(r.line, r.text, r.record) for r in JsonArrayInput(path, chunk_chars=chunk_chars).iter_raw()]
    assert small == expected
    assert [t for _, t, _ in small] == texts


def test_json_array_edge_layouts(tmp_path: Path) -> None:
    one = json.dumps(RECORDS[0])
    cases = {
        "[]": [],
        " \n [ \n ] \n": [],
        "\ufeff[" + one + "]": [RECORDS[0]],
        "[" + one + " ,\n\n " + one + ",]": [RECORDS[0], RECORDS[0]],  # trailing comma tolerated
        "[\r\n" + one + "\r\n]": [RECORDS[0]],
    }
    for k, (content, expected) in enumerate(cases.items()):
        path = tmp_path / f"case{k}.json"
        path.write_text(content, encoding="utf-8")
        raws = list(open_input(path).iter_raw())
        assert [r.record for r in raws] == expected, content
        assert all(r.error is None for r in raws)


@pytest.mark.parametrize("chunk_chars", [5, 1 << 20])
def test_json_array_broken_element_is_one_error_record(tmp_path: Path, chunk_chars: int) -> None:
    lines = [
        "[",
        json.dumps(RECORDS[0]) + ",",
        '{"id": 7, "conversations": [{"from": "human", "value": "x"}], "bad": tru },',  # line 3
        '{"id": 8 "missing": "comma"},',  # line 4
        "[1, 2],",  # line 5: valid JSON, not an object
        '"just a string",',
        json.dumps(RECORDS[4]),
        "]",
    ]
    path = tmp_path / "broken.json"
    path.write_text("\n".join(lines) + "\n")
    raws = list(JsonArrayInput(path, chunk_chars=chunk_chars).iter_raw())
    assert [r.index for r in raws] == list(range(6))
    assert [r.line for r in raws] == [2, 3, 4, 5, 6, 7]
    assert raws[0].record == RECORDS[0] and raws[5].record == RECORDS[4]
    assert raws[1].record is None and "line 3" in raws[1].error and "invalid JSON" in raws[1].error
    assert raws[1].text == lines[2].rstrip(",")
    assert raws[2].record is None and "line 4" in raws[2].error
    assert "array, expected an object" in raws[3].error
    assert "string, expected an object" in raws[4].error
    with pytest.raises(RecordError, match="line 3"):
        normalize(raws[1])


@pytest.mark.parametrize("indent", [None, 2])
@pytest.mark.parametrize("chunk_chars", [7, 1 << 20])
def test_json_array_unclosed_string_does_not_swallow_the_file(
    tmp_path: Path, indent: int | None, chunk_chars: int
) -> None:
    broken = '{"id": 1, "a": "x"y"}'  # an odd number of quotes: the string state is lost
    for position in range(3):
        path = tmp_path / f"quote{position}.json"
        texts = write_json(path, RECORDS[:2], indent=indent)
        texts.insert(position, broken)
        path.write_text("[\n" + ",\n".join(texts) + "\n]\n")
        raws = list(JsonArrayInput(path, chunk_chars=chunk_chars).iter_raw())
        assert len(raws) == 3
        assert raws[position].record is None and raws[position].text == broken
        assert [r.record for k, r in enumerate(raws) if k != position] == RECORDS[:2]

        if indent is None:
            continue  # everything on one line: no line structure to resynchronise on
        nested = tmp_path / f"nested{position}.json"  # json.dump(indent=...) layout: elements indented too
        items: list = list(RECORDS[:2])
        items.insert(position, "BROKEN")
        nested.write_text(json.dumps(items, indent=indent).replace('"BROKEN"', broken))
        raws = list(JsonArrayInput(nested, chunk_chars=chunk_chars).iter_raw())
        assert [r.record for r in raws] == [None if k == position else r for k, r in enumerate(items)]


def test_json_array_truncated_and_trailing_garbage(tmp_path: Path) -> None:
    full = "[\n" + json.dumps(RECORDS[0]) + ",\n" + json.dumps(RECORDS[1])
    cut = tmp_path / "cut.json"
    cut.write_text(full[:-10])
    raws = list(open_input(cut).iter_raw())
    assert raws[0].record == RECORDS[0]
    assert len(raws) == 2 and raws[1].line == 3 and "truncated" in raws[1].error

    unclosed = tmp_path / "unclosed.json"
    unclosed.write_text(full + "\n")
    raws = list(open_input(unclosed).iter_raw())
    assert [r.record for r in raws[:2]] == RECORDS[:2]
    assert "before the array is closed" in raws[2].error

    after_comma = tmp_path / "comma.json"
    after_comma.write_text(full + ",\n")
    assert "before the array is closed" in list(open_input(after_comma).iter_raw())[-1].error

    garbage = tmp_path / "garbage.json"
    garbage.write_text(full + "\n] }} more\n")
    raws = list(open_input(garbage).iter_raw())
    assert [r.record for r in raws[:2]] == RECORDS[:2]
    assert len(raws) == 3 and raws[2].line == 4 and "after the closing" in raws[2].error


def test_json_array_bad_utf8_is_one_error_record(tmp_path: Path) -> None:
    path = tmp_path / "bytes.json"
    path.write_bytes(
        b'[{"id": 1, "x": "ok"},\n{"id": 2, "x": "\xff\xfe"},\n' + json.dumps(RECORDS[0]).encode() + b"]"
    )
    raws = list(open_input(path).iter_raw())
    assert raws[0].record == {"id": 1, "x": "ok"}
    assert raws[1].record is None and "UTF-8" in raws[1].error and raws[1].line == 2
    assert raws[2].record == RECORDS[0]


def test_json_array_oversized_element(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    write_json(path, [RECORDS[0], {"id": 9, "blob": "x" * 5000, "n": [[1], {"a": "]"}]}, RECORDS[4]])
    raws = list(JsonArrayInput(path, max_record_bytes=1000, chunk_chars=256).iter_raw())
    assert [r.record for r in raws] == [RECORDS[0], None, RECORDS[4]]
    assert "larger than 1000" in raws[1].error and raws[1].text is None


# -- JSONL -----------------------------------------------------------------------------------------


def test_jsonl_round_trip_and_errors(tmp_path: Path) -> None:
    lines = [
        json.dumps(RECORDS[0]).encode(),
        b"",
        json.dumps(RECORDS[1], ensure_ascii=False).encode() + b"\r",
        b'{"id": 5, "oops": }',
        b"   ",
        json.dumps(RECORDS[2], ensure_ascii=False).encode(),
        b"[1]",
        b'{"id": 6, "x": "\xff"}',
        json.dumps(RECORDS[3]).encode(),
    ]
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines))  # BOM, and no newline at the end
    inp = open_input(path)
    raws = list(inp.iter_raw())
    assert [r.index for r in raws] == list(range(7))
    assert [r.line for r in raws] == [1, 3, 4, 6, 7, 8, 9]
    assert [r.record for r in raws] == [RECORDS[0], RECORDS[1], None, RECORDS[2], None, None, RECORDS[3]]
    assert "line 4: invalid JSON" in raws[2].error
    assert "array, expected an object" in raws[4].error
    assert "line 8: invalid UTF-8" in raws[5].error

    out = inp.write_subset([1, 3, 6], tmp_path / "out")
    assert out.name == "selected.jsonl"
    assert out.read_bytes() == b"\n".join([lines[2], lines[5], lines[8]]) + b"\n"
    assert records_of(open_input(out)) == [RECORDS[1], RECORDS[2], RECORDS[3]]
    with pytest.raises(ValueError, match="malformed"):
        inp.write_subset([2], tmp_path / "bad")


def test_jsonl_huge_line_is_skipped_not_loaded(tmp_path: Path) -> None:
    path = tmp_path / "huge.jsonl"
    path.write_text(
        json.dumps(RECORDS[0]) + "\n" + json.dumps({"blob": "x" * 10_000}) + "\n" + json.dumps(RECORDS[4])
    )
    raws = list(JsonlInput(path, max_record_bytes=2000).iter_raw())
    assert [r.record for r in raws] == [RECORDS[0], None, RECORDS[4]]
    assert "line 2: longer than 2000 bytes" in raws[1].error and raws[2].line == 3


# -- Parquet ---------------------------------------------------------------------------------------

CONV = [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]


@pytest.mark.parametrize(
    "images, expected",
    [
        ([PNG, None], [[(None, PNG)], []]),
        (
            [{"bytes": PNG, "path": "x.png"}, {"bytes": None, "path": "y.png"}],
            [[("x.png", PNG)], [("y.png", None)]],
        ),
        (["p/1.jpg", "p/2.jpg"], [[("p/1.jpg", None)], [("p/2.jpg", None)]]),
        (
            [[{"bytes": PNG, "path": None}, {"bytes": None, "path": "b.jpg"}], []],
            [[(None, PNG), ("b.jpg", None)], []],
        ),
    ],
    ids=["bytes", "struct", "path", "list-of-structs"],
)
def test_parquet_image_column_variants(tmp_path: Path, images: list, expected: list) -> None:
    table = pa.table({"id": [10, 11], "image": images, "conversations": [CONV, CONV], "source": ["a", "b"]})
    pq.write_table(table, tmp_path / "in.parquet")
    inp = open_input(tmp_path / "in.parquet")
    raws = list(inp.iter_raw())
    assert [(r.index, r.line) for r in raws] == [(0, 1), (1, 2)]
    samples = [normalize(r) for r in raws]
    assert [[(i.path, i.data) for i in s.images] for s in samples] == expected
    assert [s.meta for s in samples] == [{"source": "a"}, {"source": "b"}]
    assert inp.num_records() == 2


def test_parquet_folder_streams_in_order_and_writes_rows_taken(tmp_path: Path) -> None:
    folder = tmp_path / "pq"
    (folder / "part").mkdir(parents=True)
    (folder / "_tmp").mkdir()
    schema = pa.schema(
        [
            ("id", pa.int64()),
            ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            ("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))),
        ],
        metadata={b"origin": b"test"},
    )

    def rows(lo: int, hi: int) -> pa.Table:
        return pa.Table.from_pylist(
            [
                {"id": i, "image": {"bytes": PNG + bytes([i]), "path": f"{i}.png"}, "conversations": CONV}
                for i in range(lo, hi)
            ],
            schema=schema,
        )

    pq.write_table(rows(0, 7), folder / "a-0.parquet", row_group_size=3)
    pq.write_table(rows(7, 12), folder / "part" / "b-1.parquet", row_group_size=2)
    pq.write_table(rows(100, 101), folder / "_tmp" / "ignored.parquet")
    inp = open_input(folder)
    assert inp.format == "parquet" and [p.name for p in inp.files()] == ["a-0.parquet", "b-1.parquet"]
    raws = list(inp.iter_raw())
    assert [r.record["id"] for r in raws] == list(range(12)) and raws[-1].line == 12
    assert list(inp.iter_ids()) == list(range(12))

    chosen = [1, 2, 5, 7, 11]
    out = inp.write_subset(chosen, tmp_path / "out")
    assert out.name == "selected.parquet"
    written = pq.read_table(out)
    assert written.schema.equals(pq.read_schema(folder / "a-0.parquet"), check_metadata=True)
    assert written.to_pylist() == [raws[i].record for i in chosen]
    with pytest.raises(ValueError, match="out of range"):
        inp.write_subset([3, 12], tmp_path / "out2")
    with pytest.raises(ValueError, match="ascending"):
        inp.write_subset([3, 3], tmp_path / "out2")
    assert not list((tmp_path / "out2").iterdir())


# -- Hugging Face datasets folder ------------------------------------------------------------------


def test_hf_datasets_folder_round_trip(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 3), (200, 10, 10)).save(buf, format="PNG")
    png = buf.getvalue()
    local = tmp_path / "c.png"
    local.write_bytes(png)
    ds = datasets.Dataset.from_dict(
        {
            "id": ["a", "b", "c", "d"],
            "image": [
                {"bytes": png, "path": None},
                None,
                {"bytes": None, "path": str(local)},
                {"bytes": png, "path": "d.png"},
            ],
            "conversations": [CONV] * 4,
            "category": ["x", "y", "x", "z"],
        },
        features=datasets.Features(
            {
                "id": datasets.Value("string"),
                "image": datasets.Image(),
                "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}],
                "category": datasets.Value("string"),
            }
        ),
    )
    ds.save_to_disk(str(tmp_path / "ds"), num_shards=2)
    inp = open_input(tmp_path / "ds")
    assert inp.format == "hf_datasets" and inp.num_records() == 4 and len(inp.files()) == 2
    samples = [normalize(r) for r in inp.iter_raw()]
    assert [s.index for s in samples] == [0, 1, 2, 3] and [s.line for s in samples] == [1, 2, 3, 4]
    assert samples[0].images[0].data == png and samples[1].text_only
    assert samples[2].images[0] == ImageRef(path="c.png", data=png)  # save_to_disk embeds local files
    assert samples[3].meta == {"category": "z"}

    out = inp.write_subset([0, 3], tmp_path / "out")
    assert out == tmp_path / "out" / "selected"
    back = datasets.Dataset.load_from_disk(str(out))
    assert back.features == ds.features and back["id"] == ["a", "d"]
    assert [r.record for r in open_input(out).iter_raw()] == [
        r.record for r in inp.iter_raw() if r.index in (0, 3)
    ]

    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(InputError, match="split"):
        open_input(tmp_path / "dd")


# -- identity --------------------------------------------------------------------------------------


def test_fingerprint_is_stable_and_sees_changes(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n")
    first = open_input(path).fingerprint()
    assert open_input(path).fingerprint() == first and first.startswith("jsonl:")
    with path.open("a") as f:
        f.write(json.dumps(RECORDS[1]) + "\n")
    assert open_input(path).fingerprint() != first


def test_duplicate_ids_and_sample_id(tmp_path: Path) -> None:
    recs = [dict(RECORDS[k], id=i) for k, i in [(0, 1), (1, "1"), (0, 2), (0, 3), (4, 3), (0, "")]] + [
        {k: v for k, v in RECORDS[0].items() if k != "id"}
    ]
    write_json(tmp_path / "in.json", recs)
    inp = open_input(tmp_path / "in.json")
    dups = duplicate_ids(inp)
    assert dups == frozenset({"1", "3"})
    ids = [sample_id(normalize(r), dups) for r in inp.iter_raw()]
    assert ids[2] == "2"
    assert all(i.startswith("h:") for k, i in enumerate(ids) if k != 2)
    assert ids[0] != ids[1] and ids[3] != ids[4]  # same id, different content

    pq.write_table(pa.table({"id": [5, 6, 7]}), tmp_path / "u.parquet")
    assert duplicate_ids(open_input(tmp_path / "u.parquet")) == frozenset()
