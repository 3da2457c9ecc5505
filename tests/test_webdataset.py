"""WebDataset shards: streamed sample by sample from the tars, broken members as error rows, subsets
written back as shards, scoring and selection end to end."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from visa.readers import InputError, open_input
from visa.readers.webdataset import WebDatasetInput, split_name
from visa.samples import normalize

TESTS = Path(__file__).resolve().parent
EXAMPLE_IMAGES = TESTS.parent / "examples" / "images"


def png(color: tuple[int, int, int], size: tuple[int, int] = (24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.linear_gradient("L").resize((40 + seed, 30)).point(lambda v: (v + 17 * seed) % 256).convert("RGB").save(
        buf, format="JPEG"
    )
    return buf.getvalue()


def llava(question: str, answer: str, **extra: object) -> dict:
    conv = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]
    return {"conversations": conv, **extra}


def write_tar(path: Path, members: list[tuple[str, bytes]], *, kinds: dict[str, bytes] | None = None) -> Path:
    """A tar with regular members in the given order; ``kinds`` maps names to tar type flags."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            kind = (kinds or {}).get(name)
            if kind is not None:
                info.type, info.size = kind, 0
                info.linkname = "/etc/passwd"
                tar.addfile(info)
                continue
            tar.addfile(info, io.BytesIO(data))
    return path


def as_json(obj: object) -> bytes:
    return json.dumps(obj).encode()


def good_shards(folder: Path) -> dict[str, list[tuple[str, bytes]]]:
    """Two shards: LLaVA records, a ShareGPT record with two images, a text-only record, extras."""
    shards = {
        "train-000.tar": [
            ("s/000.jpg", jpeg(0)),
            ("s/000.json", as_json(llava("What is it?", "A gradient.", source="a"))),
            ("s/000.txt", b"caption travels along"),
            ("s/001.json", as_json(llava("Shade?", "Grey.", id="custom-id", image="ignored.jpg"))),
            ("s/001.png", png((10, 200, 30))),
        ],
        "train-001.tar": [
            ("002.json", as_json({
                "images": ["x"],
                "messages": [
                    {"role": "user", "content": "<image><image>Compare."},
                    {"role": "assistant", "content": "Left is red."},
                ],
                "meta": {"kind": "pair"},
            })),
            ("002.1.png", png((0, 0, 255))),
            ("002.0.png", png((255, 0, 0))),
            ("003.json", as_json({"conversations": [
                {"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]})),
        ],
    }
    for name, members in shards.items():
        write_tar(folder / name, members)
    return shards


def test_split_name_follows_webdataset_keys() -> None:
    assert split_name("a/b/000123.0.JPG") == ("a/b/000123", "0.jpg")
    assert split_name("k.json") == ("k", "json")
    assert split_name("dir.v2/k.seg.png") == ("dir.v2/k", "seg.png")


def test_reads_samples_in_order_with_images_from_the_tar(tmp_path: Path) -> None:
    good_shards(tmp_path / "wds")
    inp = open_input(tmp_path / "wds")
    assert isinstance(inp, WebDatasetInput) and inp.format == "webdataset"
    assert [p.name for p in inp.files()] == ["train-000.tar", "train-001.tar"]
    raws = list(inp.iter_raw())
    assert [(r.index, r.line, r.error) for r in raws] == [(i, i + 1, None) for i in range(4)]
    assert [r.record["id"] for r in raws] == ["s/000", "custom-id", "002", "003"]
    assert list(inp.iter_ids()) == ["s/000", "custom-id", "002", "003"]

    samples = [normalize(r) for r in raws]
    assert [len(s.images) for s in samples] == [1, 1, 2, 0]
    assert samples[0].images[0].data == jpeg(0) and samples[0].images[0].path == "train-000.tar/s/000.jpg"
    assert samples[1].images[0].data == png((10, 200, 30))  # the tar's image replaces the record's own
    # several images follow their extension's number, not the member order
    assert [i.data for i in samples[2].images] == [png((255, 0, 0)), png((0, 0, 255))]
    assert samples[0].meta == {"source": "a"} and samples[2].meta == {"meta": {"kind": "pair"}}
    assert samples[3].text_only and samples[3].turns[1].text == "hi"


def test_glob_and_single_file_inputs(tmp_path: Path) -> None:
    good_shards(tmp_path / "wds")
    (tmp_path / "wds" / "notes.txt").write_text("not a shard")
    by_glob = open_input(str(tmp_path / "wds" / "train-*.tar"))
    assert [p.name for p in by_glob.files()] == ["train-000.tar", "train-001.tar"]
    assert by_glob.fingerprint() == open_input(str(tmp_path / "wds" / "train-*.tar")).fingerprint()
    single = open_input(tmp_path / "wds" / "train-001.tar")
    assert [r.record["id"] for r in single.iter_raw()] == ["002", "003"]
    with pytest.raises(InputError, match="no .tar shards"):
        open_input(str(tmp_path / "wds" / "valid-*.tar"))


def test_broken_members_become_one_error_record_each(tmp_path: Path) -> None:
    ok = as_json(llava("Q", "A"))
    write_tar(
        tmp_path / "wds" / "a.tar",
        [
            ("0.json", ok), ("0.jpg", jpeg(1)),
            ("1.json", b'{"conversations": [1, '),  # invalid JSON
            ("1.jpg", jpeg(2)),
            ("2.jpg", jpeg(3)),  # no record
            ("3.json", as_json(["not", "an", "object"])),
            ("4.json", ok), ("4.jpg", b""),  # a symlink member
            ("5.json", ok), ("../5.jpg", jpeg(4)),  # a name that climbs out
            ("6.json", b"\xff\xfe bad utf-8"),
            ("7.json", ok), ("7.png", b"x" * 5000),  # over the member size limit below
            ("8.json", ok), ("8.jpg", jpeg(5)),
        ],
        kinds={"4.jpg": tarfile.SYMTYPE},
    )
    whole = write_tar(tmp_path / "b.tar", [("9.json", ok), ("9.jpg", jpeg(6)), ("10.json", ok), ("10.jpg", jpeg(7))])
    with tarfile.open(whole) as tar:
        cut = tar.getmember("10.jpg").offset_data + 100
    (tmp_path / "wds" / "b.tar").write_bytes(whole.read_bytes()[:cut])  # ends inside the last image
    write_tar(tmp_path / "wds" / "c.tar", [("11.json", ok)])

    inp = WebDatasetInput(tmp_path / "wds", max_member_bytes=4096)
    raws = list(inp.iter_raw())
    errors = {r.index: r.error for r in raws if r.error}
    assert [r.record["id"] for r in raws if r.record] == ["0", "5", "8", "9", "11"]
    assert len(raws) == 13 and [r.index for r in raws] == list(range(13))
    expected = {
        1: "a.tar: 1.json: invalid JSON",
        2: "a.tar: 2: the sample has no 2.json member",
        3: "a.tar: 3.json: the record is a JSON array",
        4: "a.tar: 4.jpg: the member is a symlink",
        6: "a.tar: ../5.jpg: the member's name is absolute or climbs out",
        7: "a.tar: 6.json: invalid UTF-8",
        8: "a.tar: 7.png: 5000 bytes, over the limit of 4096",
        11: "b.tar: 10: the shard is truncated or corrupt",
    }
    assert set(errors) == set(expected)
    for index, fragment in expected.items():
        assert fragment in errors[index], (index, errors[index])
    # the error records still count as records: ids line up with iter_raw
    assert len(list(inp.iter_ids())) == 13


def test_hostile_json_members_are_error_records(tmp_path: Path) -> None:
    write_tar(tmp_path / "s.tar", [
        ("a.json", b"[" * 200_000 + b"]" * 200_000),
        ("b.json", b'{"id": ' + b"9" * 10_000 + b"}"),
        ("c.json", as_json(llava("Q", "A"))), ("c.jpg", jpeg(2)),
    ])
    raws = list(open_input(tmp_path / "s.tar").iter_raw())
    assert [r.record is not None for r in raws] == [False, False, True]
    assert "nested too deeply" in raws[0].error and "b.json: unusable JSON" in raws[1].error


def test_a_key_with_too_many_members_is_one_error_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import visa.readers.webdataset as wds

    monkeypatch.setattr(wds, "MAX_SAMPLE_MEMBERS", 5)
    members = [("a.json", as_json(llava("Q", "A")))] + [(f"a.{k}.txt", b"x") for k in range(20)]
    write_tar(tmp_path / "s.tar", [*members, ("b.json", as_json(llava("Q", "A"))), ("b.jpg", jpeg(1))])
    raws = list(open_input(tmp_path / "s.tar").iter_raw())
    assert [r.error is None for r in raws] == [False, True]
    assert "more than 5 members" in raws[0].error


def test_write_subset_copies_selected_samples_as_shards(tmp_path: Path) -> None:
    shards = good_shards(tmp_path / "wds")
    inp = open_input(tmp_path / "wds")
    out = inp.write_subset([1, 2], tmp_path / "out")
    assert out == tmp_path / "out" / "selected" and [p.name for p in sorted(out.iterdir())] == ["part-000000.tar"]
    with tarfile.open(out / "part-000000.tar") as tar:
        copied = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    assert copied == shards["train-000.tar"][3:] + shards["train-001.tar"][:3]
    again = [normalize(r) for r in open_input(out).iter_raw()]
    before = [normalize(r) for r in inp.iter_raw() if r.index in (1, 2)]
    assert [s.record_id for s in again] == ["custom-id", "002"]
    assert [(s.turns, [i.data for i in s.images], s.meta) for s in again] == [
        (s.turns, [i.data for i in s.images], s.meta) for s in before
    ]
    with pytest.raises(ValueError, match="out of range"):
        inp.write_subset([3, 4], tmp_path / "out2")
    assert not (tmp_path / "out2" / "selected").exists()


def test_selected_shards_load_with_datasets_webdataset_builder(tmp_path: Path) -> None:
    """datasets' own WebDataset builder (it wants the same member types in every sample) reads them."""
    datasets = pytest.importorskip("datasets")
    members = []
    for i in range(4):
        members += [(f"k{i}.json", as_json(llava(f"Q{i}", f"A{i}"))), (f"k{i}.jpg", jpeg(i))]
    write_tar(tmp_path / "wds" / "0.tar", members)
    out = open_input(tmp_path / "wds").write_subset([1, 3], tmp_path / "out")
    ds = datasets.load_dataset(
        "webdataset", data_files=[str(p) for p in sorted(out.glob("*.tar"))], split="train",
        cache_dir=str(tmp_path / "cache"),
    )
    assert ds["__key__"] == ["k1", "k3"]
    assert ds[1]["json"]["conversations"][1]["value"] == "A3" and ds[1]["jpg"].size == (43, 30)


def test_score_and_select_round_trip_on_shards(tmp_path: Path) -> None:
    from visa.recipe import load_recipe
    from visa.scoring import score
    from visa.selection import select

    members = []
    for i in range(10):
        members += [(f"{i:03d}.json", as_json(llava(f"Q{i}", "A" * (i + 1)))), (f"{i:03d}.jpg", jpeg(i))]
    members += [("010.json", as_json(llava("Q", "A"))), ("010.jpg", jpeg(3)[:200])]  # truncated image bytes
    write_tar(tmp_path / "wds" / "0.tar", members[:12])
    write_tar(tmp_path / "wds" / "1.tar", members[12:])
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(
        "name: cheap\nexecution: {shard_size: 4}\nscores:\n  sc:\n    agents: [{name: felzenszwalb, type: felzenszwalb}]\n"
    )
    record = score(load_recipe(recipe_path), tmp_path / "wds", tmp_path / "run")
    table = pq.read_table(tmp_path / "run" / "scores.parquet")
    assert record["input"]["format"] == "webdataset" and table.num_rows == 11
    assert table.column("error_kind").to_pylist() == [None] * 10 + ["truncated"]
    assert table.column("sample_id").to_pylist()[:3] == ["000", "001", "002"]
    assert record["counts"]["unique_images"] == 10  # the truncated copy of an image is an error row

    # resume: a second run reuses every shard
    again = score(load_recipe(recipe_path), tmp_path / "wds", tmp_path / "run")
    assert again["shards"]["resumed"] == again["shards"]["total"]

    result = select(tmp_path / "run")
    chosen = result.selected_rows.tolist()
    assert chosen and result.subset_path == tmp_path / "run" / "selected"
    back = open_input(result.subset_path)
    assert [r.record["id"] for r in back.iter_raw()] == [f"{i:03d}" for i in chosen]
