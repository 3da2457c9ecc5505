"""Exports load in the trainers: every input format is scored, selected and its subset loaded the way
LLaMA-Factory (``datasets.load_dataset`` + its sharegpt mapping) and LLaVA's data loader read them."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from trainer_loaders import BrokenExample, load_llamafactory, load_llava

from visa.llamafactory import DATASET_NAME, list_fields
from visa.readers import open_input
from visa.recipe import load_recipe
from visa.scoring import score
from visa.selection import SelectionOptions, select

datasets = pytest.importorskip("datasets")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
KEEP_ALL = SelectionOptions(image_keep=1.0, pt_tail=0.0, dedupe=False)
RECIPE = "name: stats\nexecution: {shard_size: 8}\nscores:\n  image:\n    agents: [{name: stats, type: image_stats}]\n"


def png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (20, 14)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def turn(who: str, text: str) -> dict:
    return {"from": who, "value": text}


def llava_records() -> list[dict]:
    """Text-only first, single image as a string, two images as a list, nested meta mixing forms."""
    return [
        {"id": "t0", "conversations": [turn("human", "Say hi."), turn("gpt", "Hi.")], "source": "chat"},
        {"id": "s1", "image": "img/red.png", "meta": {"kind": "photo", "tags": "red"},
         "conversations": [turn("human", "<image>\nColour?"), turn("gpt", "Red.")]},
        {"id": "m2", "image": ["img/red.png", "img/blue.png"], "meta": {"kind": "pair", "tags": ["red", "blue"]},
         "conversations": [turn("human", "<image>\n<image>\nSame?"), turn("gpt", "No.")], "source": "vqa"},
        {"id": "s3", "image": "img/blue.png", "meta": {"kind": "photo", "tags": None},
         "conversations": [turn("human", "<image>\nColour?"), turn("gpt", "Blue."),
                           turn("human", "Sure?"), turn("gpt", "Yes.")]},
    ]


def write_images(folder: Path) -> None:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    (folder / "img" / "red.png").write_bytes(png_bytes((220, 0, 0)))
    (folder / "img" / "blue.png").write_bytes(png_bytes((0, 0, 220)))


def score_and_select(tmp_path: Path, data: Path) -> Path:
    recipe = tmp_path / "stats.yaml"
    recipe.write_text(RECIPE)
    run_dir = tmp_path / "run"
    score(load_recipe(recipe), data, run_dir)
    result = select(run_dir, KEEP_ALL)
    assert result.selected_rows.tolist() == list(range(len(result.selected_rows)))
    return run_dir


def llamafactory(run_dir: Path, tmp_path: Path, media_dir: Path) -> list[dict]:
    return load_llamafactory(run_dir, DATASET_NAME, media_dir, tmp_path / "hf-cache")


def texts(example: dict) -> list[str]:
    return [t["content"] for t in example["prompt"] + example["response"]]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_llava_json_subset_loads_in_both_trainers(tmp_path: Path, suffix: str) -> None:
    write_images(tmp_path)
    records = llava_records()
    data = tmp_path / f"train{suffix}"
    if suffix == ".json":
        data.write_text(json.dumps(records, indent=1))
    else:
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert list_fields(records) == {("image",), ("meta", "tags")}

    run_dir = score_and_select(tmp_path, data)
    info = json.loads((run_dir / "dataset_info.json").read_text())[DATASET_NAME]
    assert info["file_name"] == f"selected{suffix}"
    assert info["columns"] == {"messages": "conversations", "images": "image"}  # the first record has none

    examples = llamafactory(run_dir, tmp_path, tmp_path)
    assert [len(e["images"]) for e in examples] == [0, 1, 2, 1]
    assert [texts(e) for e in examples] == [[t["value"] for t in r["conversations"]] for r in records]
    assert examples[2]["images"][1].getpixel((0, 0)) == (0, 0, 220)

    llava = load_llava(run_dir / f"selected{suffix}", tmp_path)
    assert [r["id"] for r in llava] == ["t0", "s1", "m2", "s3"]
    assert [len(r["images"]) for r in llava] == [0, 1, 2, 1]

    # only the records that mixed forms were rewritten; the others are byte-identical
    written = (run_dir / f"selected{suffix}").read_text()
    assert '"image": ["img/blue.png"]' in written and '"tags": ["red"]' in written
    source = [raw.text for raw in open_input(data).iter_raw()]
    assert [text in written for text in source] == [True, False, True, False]  # unchanged ones are copied


def test_the_input_file_itself_does_not_load_but_the_export_does(tmp_path: Path) -> None:
    """The mixed forms are a real trainer failure, not a formality: the unchanged input breaks."""
    write_images(tmp_path)
    data = tmp_path / "train.json"
    data.write_text(json.dumps(llava_records()))
    with pytest.raises(datasets.exceptions.DatasetGenerationError):
        datasets.load_dataset("json", data_files=[str(data)], split="train", cache_dir=str(tmp_path / "c"))
    run_dir = score_and_select(tmp_path, data)
    assert len(datasets.load_dataset("json", data_files=[str(run_dir / "selected.json")], split="train",
                                     cache_dir=str(tmp_path / "c"))) == 4


def test_openai_messages_with_system_turns_and_tools(tmp_path: Path) -> None:
    write_images(tmp_path)
    records = [
        {"id": "a", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"id": "b", "images": ["img/red.png"], "tools": "[]",
         "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>Colour?"},
                      {"role": "assistant", "content": "Red."}]},
    ]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    run_dir = score_and_select(tmp_path, data)
    info = json.loads((run_dir / "dataset_info.json").read_text())[DATASET_NAME]
    assert info["columns"] == {"messages": "messages", "images": "images", "tools": "tools"}
    assert info["tags"] == {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                            "assistant_tag": "assistant", "system_tag": "system"}
    examples = llamafactory(run_dir, tmp_path, tmp_path)
    assert [e["system"] for e in examples] == ["", "Be brief."]
    assert [len(e["images"]) for e in examples] == [0, 1]


def test_parquet_subset_with_embedded_images_loads(tmp_path: Path) -> None:
    red, blue = png_bytes((220, 0, 0)), png_bytes((0, 0, 220))
    conv = [turn("human", "<image>\nColour?"), turn("gpt", "Red.")]
    table = pa.Table.from_pylist([
        {"id": "t", "image": None, "conversations": [turn("human", "Hi"), turn("gpt", "Hello")], "source": "chat"},
        {"id": "r", "image": {"bytes": red, "path": "red.png"}, "conversations": conv, "source": "vqa"},
        {"id": "b", "image": {"bytes": blue, "path": None}, "conversations": conv, "source": "vqa"},
    ])
    pq.write_table(table, tmp_path / "train.parquet")
    run_dir = score_and_select(tmp_path, tmp_path / "train.parquet")
    info = json.loads((run_dir / "dataset_info.json").read_text())[DATASET_NAME]
    assert info["file_name"] == "selected.parquet" and info["columns"]["images"] == "image"
    examples = llamafactory(run_dir, tmp_path, tmp_path)
    assert [len(e["images"]) for e in examples] == [0, 1, 1]
    assert examples[2]["images"][0].getpixel((0, 0)) == (0, 0, 220)


def test_datasets_folder_subset_points_at_its_one_arrow_file(tmp_path: Path) -> None:
    red = png_bytes((220, 0, 0))
    conv = [turn("human", "<image>\nColour?"), turn("gpt", "Red.")]
    features = datasets.Features({
        "id": datasets.Value("string"),
        "image": datasets.Image(),
        "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}],
    })
    ds = datasets.Dataset.from_dict(
        {"id": ["t", "r", "s"], "image": [None, {"bytes": red, "path": None}, {"bytes": red, "path": "x.png"}],
         "conversations": [[turn("human", "Hi"), turn("gpt", "Hello")], conv, conv]},
        features=features,
    )
    ds.save_to_disk(str(tmp_path / "ds"), num_shards=2)
    run_dir = score_and_select(tmp_path, tmp_path / "ds")
    info = json.loads((run_dir / "dataset_info.json").read_text())[DATASET_NAME]
    assert info["file_name"].startswith("selected/") and info["file_name"].endswith(".arrow")
    # load_from_disk users get the same subset
    assert datasets.Dataset.load_from_disk(str(run_dir / "selected"))["id"] == ["t", "r", "s"]
    examples = llamafactory(run_dir, tmp_path, tmp_path)
    assert [len(e["images"]) for e in examples] == [0, 1, 1]
    assert examples[1]["images"][0].getpixel((0, 0)) == (220, 0, 0)
    # pointing LLaMA-Factory at the folder itself is what fails
    entry = json.loads((run_dir / "dataset_info.json").read_text())
    entry[DATASET_NAME]["file_name"] = "selected"
    (tmp_path / "lf").mkdir()
    (tmp_path / "lf" / "dataset_info.json").write_text(json.dumps(entry))
    (tmp_path / "lf" / "selected").symlink_to(run_dir / "selected")
    with pytest.raises(BrokenExample, match="identical"):
        load_llamafactory(tmp_path / "lf", DATASET_NAME, tmp_path, tmp_path / "hf-cache")


def test_webdataset_subset_has_no_llamafactory_entry_but_loads_as_shards(tmp_path: Path) -> None:
    conv = {"conversations": [turn("human", "<image>\nColour?"), turn("gpt", "Red.")]}
    with tarfile.open(tmp_path / "train-0.tar", "w") as tar:
        for key, color in (("a", (220, 0, 0)), ("b", (0, 0, 220))):
            for name, data in ((f"{key}.json", json.dumps(conv).encode()), (f"{key}.png", png_bytes(color))):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    run_dir = score_and_select(tmp_path, tmp_path / "train-0.tar")
    assert not (run_dir / "dataset_info.json").exists()
    run = json.loads((run_dir / "run.json").read_text())
    assert any("LLaMA-Factory cannot load" in note for note in run["selection"]["notes"])
    shards = sorted((run_dir / "selected").glob("*.tar"))
    ds = datasets.load_dataset("webdataset", data_files=[str(p) for p in shards], split="train",
                               cache_dir=str(tmp_path / "hf-cache"))
    assert ds["__key__"] == ["a", "b"] and ds[1]["png"].getpixel((0, 0)) == (0, 0, 220)


def test_demo_subset_loads_in_both_trainers(tmp_path: Path) -> None:
    run_dir = score_and_select(tmp_path, EXAMPLES / "llava.json")
    source = json.loads((EXAMPLES / "llava.json").read_text())
    examples = llamafactory(run_dir, tmp_path, EXAMPLES)
    assert len(examples) == len(source)
    expected_images = [len(r["image"]) if isinstance(r.get("image"), list) else int("image" in r) for r in source]
    assert [len(e["images"]) for e in examples] == expected_images
    llava = load_llava(run_dir / "selected.json", EXAMPLES)
    assert [r["id"] for r in llava] == [r["id"] for r in source]
