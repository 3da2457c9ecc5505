"""normalize: every supported record dialect becomes one typed Sample, or a RecordError that says why."""

from __future__ import annotations

import datetime as dt

import pytest

from visa.samples import ImageRef, RawRecord, RecordError, Turn, normalize, sample_id, stable_hash

PNG = b"\x89PNG\r\n\x1a\nrest"
LLAVA_TURNS = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A dog."}]


def norm(record: dict, index: int = 0):
    return normalize(RawRecord(index=index, line=index + 1, record=record))


def test_llava_single_image() -> None:
    rec = {
        "id": 7,
        "image": "coco/1.jpg",
        "conversations": LLAVA_TURNS,
        "source": "coco",
        "meta": {"k": [1, None]},
    }
    s = norm(rec, index=4)
    assert (s.index, s.line, s.record_id) == (4, 5, "7")
    assert s.images == (ImageRef(path="coco/1.jpg"),)
    assert s.turns == (Turn("user", "<image>\nWhat is this?"), Turn("assistant", "A dog."))
    assert s.record_hash == stable_hash(rec)
    assert s.meta == {"source": "coco", "meta": {"k": [1, None]}}


def test_llava_multi_image_and_text_only() -> None:
    multi = norm({"id": "m", "image": ["a.jpg", "b.jpg"], "conversations": LLAVA_TURNS})
    assert [i.path for i in multi.images] == ["a.jpg", "b.jpg"]
    for no_image in ({}, {"image": None}, {"image": ""}, {"image": []}):
        s = norm(
            {
                "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
                **no_image,
            }
        )
        assert s.text_only and s.record_id is None


def test_roles_map_case_insensitively() -> None:
    turns = [
        {"from": "System", "value": "s"},
        {"from": "Human", "value": "u"},
        {"from": "bot", "value": "b"},
        {"from": "user", "value": "u2"},
        {"from": "assistant", "value": "a"},
        {"from": "gpt", "value": "g"},
    ]
    assert [t.role for t in norm({"conversations": turns}).turns] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "assistant",
    ]


def test_sharegpt_messages_with_parts() -> None:
    rec = {
        "id": 3,
        "images": ["top.png"],
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "text", "text": "First"},
                    {"type": "image", "url": "http://x/y.jpg"},
                    "Second",
                ],
            },
            {"role": "assistant", "content": "Answer"},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "https://z/w.png"}},
                    {"type": "text", "text": "Third", "image": None},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "More"}]},
        ],
    }
    s = norm(rec)
    assert [i.path for i in s.images] == ["top.png", "http://x/y.jpg", "https://z/w.png"]
    assert [t.text for t in s.turns] == ["Be brief.", "First\nSecond", "Answer", "Third", "More"]
    assert s.record_id == "3" and s.meta == {}


def test_columnar_image_variants() -> None:
    def images(value):
        return norm({"image": value, "conversations": LLAVA_TURNS}).images

    assert images(PNG) == (ImageRef(data=PNG),)
    assert images(bytearray(PNG)) == (ImageRef(data=PNG),)
    assert images({"bytes": PNG, "path": "x.png"}) == (ImageRef(path="x.png", data=PNG),)
    assert images({"bytes": None, "path": "x.png"}) == (ImageRef(path="x.png"),)
    assert images([{"bytes": PNG, "path": None}, "b.jpg", memoryview(PNG)]) == (
        ImageRef(data=PNG),
        ImageRef(path="b.jpg"),
        ImageRef(data=PNG),
    )
    inline = norm(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": {"bytes": PNG, "path": None}},
                        {"type": "text", "text": "q"},
                    ],
                },
                {"role": "assistant", "content": "a"},
            ]
        }
    )
    assert inline.images == (ImageRef(data=PNG),)


def test_meta_keeps_json_like_fields_only() -> None:
    rec = {
        "id": 1,
        "image": PNG,
        "conversations": LLAVA_TURNS,
        "category": "ocr",
        "score": 0.5,
        "tags": ["a"],
        "thumbnail": PNG,
        "nested": {"raw": PNG},
        "when": dt.datetime(2024, 1, 2),
        "flag": True,
        "none": None,
    }
    s = norm(rec)
    assert s.meta == {"category": "ocr", "score": 0.5, "tags": ["a"], "flag": True, "none": None}
    assert len(s.record_hash) == 32 and s.record_hash == norm(dict(rec)).record_hash
    assert s.record_hash != norm({**rec, "when": dt.datetime(2024, 1, 3)}).record_hash


@pytest.mark.parametrize(
    "record, message",
    [
        ({"image": "a.jpg"}, "no 'conversations' or 'messages'"),
        ({"conversations": {"from": "human"}}, "'conversations' is a dict, expected a list"),
        ({"conversations": LLAVA_TURNS, "messages": LLAVA_TURNS}, "both 'conversations' and 'messages'"),
        ({"conversations": [{"from": "human", "value": "q"}]}, "no assistant turn"),
        (
            {"conversations": [{"from": "gpt", "value": "a"}, {"from": "system", "value": "s"}]},
            "no user turn",
        ),
        ({"conversations": []}, "no user turn"),
        ({"conversations": ["hi", "there"]}, r"conversations\[0\] is a str, expected an object"),
        (
            {"conversations": [{"from": "human", "value": 5}, {"from": "gpt", "value": "a"}]},
            r"conversations\[0\] \(human\) text is an int, expected a string",
        ),
        (
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]},
            r"\[1\] \(gpt\) text is missing",
        ),
        ({"conversations": [{"from": "tool", "value": "q"}]}, "unknown role 'tool'"),
        ({"conversations": [{"value": "q"}]}, "no 'from' or 'role'"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": 3}]},
                    {"role": "assistant", "content": "a"},
                ]
            },
            r"messages\[0\].content\[0\] text is an int",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "audio"}]},
                    {"role": "assistant", "content": "a"},
                ]
            },
            "unsupported type 'audio'",
        ),
        ({"image": 12, "conversations": LLAVA_TURNS}, "'image' is an int; expected an image path"),
        ({"image": ["a.jpg", None], "conversations": LLAVA_TURNS}, r"'image\[1\]' is null"),
        ({"image": ["a.jpg", ""], "conversations": LLAVA_TURNS}, "empty image path"),
        (
            {"image": {"bytes": None, "path": None}, "conversations": LLAVA_TURNS},
            "neither image bytes nor a path",
        ),
        ({"images": {"url": "x"}, "conversations": LLAVA_TURNS}, "'images' is a dict"),
        ({"image": "a.jpg", "images": ["b.jpg"], "conversations": LLAVA_TURNS}, "both 'image' and 'images'"),
    ],
)
def test_invalid_records_raise_record_error(record: dict, message: str) -> None:
    with pytest.raises(RecordError, match=message):
        norm(record)


def test_unparsed_record_raises_its_read_error() -> None:
    with pytest.raises(RecordError, match="line 3: invalid JSON"):
        normalize(RawRecord(index=2, line=3, record=None, error="line 3: invalid JSON: Expecting value"))


def test_sample_id_prefers_unique_record_ids() -> None:
    with_id = norm({"id": 12, "conversations": LLAVA_TURNS})
    without = norm({"conversations": LLAVA_TURNS})
    assert sample_id(with_id, frozenset()) == "12"
    assert sample_id(with_id, frozenset({"12"})) == "h:" + with_id.record_hash
    assert sample_id(without, frozenset()) == "h:" + without.record_hash
    assert norm({"id": "", "conversations": LLAVA_TURNS}).record_id is None
