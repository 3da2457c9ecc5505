"""Probe ladders and the vocabulary-free visual information agents, on the bundled real photos."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visa.agents.base import ImageItem
from visa.agents.jpeg_bits import JpegBitsAgent
from visa.probes.ladder import (
    IMAGE_LADDER,
    Rung,
    answer_vocabulary,
    degrade,
    other_indices,
    other_rung,
    replace_answers,
    shuffle_answers,
)
from visa.probes.value import concordance, ladder_pairs
from visa.samples import Turn

IMAGES = Path(__file__).resolve().parent.parent / "examples" / "images"
PHOTOS = sorted(p for p in IMAGES.iterdir() if p.suffix in {".jpg", ".png"})


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    assert len(PHOTOS) >= 15
    out = {}
    for p in PHOTOS:
        with Image.open(p) as im:
            image = im.convert("RGB")
        image.thumbnail((384, 384))  # keeps the tests fast; the ladder is relative to the image
        out[p.stem] = image
    return out


def _ladder_rows(photos: dict[str, Image.Image]) -> tuple[list[Image.Image], list[str], list[int], list[str]]:
    images, ladders, tiers, chains = [], [], [], []
    for name, image in photos.items():
        for rung in IMAGE_LADDER:
            images.append(degrade(image, rung.kind, name))
            ladders.append(name)
            tiers.append(rung.tier)
            chains.append(rung.chain)
    return images, ladders, tiers, chains


def test_degradations_do_what_they_say(photos: dict[str, Image.Image]) -> None:
    image = photos["astronaut"]
    w, h = image.size
    half = degrade(image, "crop_half")
    assert abs(half.width * half.height / (w * h) - 0.5) < 0.02
    quarter = degrade(image, "crop_quarter")
    assert abs(quarter.width * quarter.height / (w * h) - 0.25) < 0.02
    for kind in ("downscale", "downscale_tiny", "blur", "jpeg", "flat", "noise"):
        assert degrade(image, kind, "k").size == (w, h)
    flat = np.asarray(degrade(image, "flat"))
    assert flat.std(axis=(0, 1)).max() == 0
    noise_a, noise_b = np.asarray(degrade(image, "noise", "a")), np.asarray(degrade(image, "noise", "b"))
    assert not np.array_equal(noise_a, noise_b)
    assert np.array_equal(noise_a, np.asarray(degrade(image, "noise", "a")))  # seeded by the key
    tiny = np.asarray(degrade(image, "downscale_tiny"), dtype=float)
    assert np.abs(np.diff(tiny, axis=1)).mean() < np.abs(np.diff(np.asarray(image, dtype=float), axis=1)).mean()
    with pytest.raises(ValueError):
        degrade(image, "sepia")


def test_text_probes() -> None:
    turns = (Turn("user", "What is on the table?"), Turn("assistant", "A red cup of coffee on a saucer."))
    shuffled = shuffle_answers(turns, seed=1)
    assert shuffled[0] == turns[0]
    assert sorted(shuffled[1].text.split()) == sorted(turns[1].text.split())
    assert shuffled[1].text != turns[1].text
    vocabulary = answer_vocabulary([turns, (Turn("user", "q"), Turn("assistant", "zebra stripes"))])
    replaced = replace_answers(turns, vocabulary, seed=2)
    assert len(replaced[1].text.split()) == len(turns[1].text.split())
    assert set(replaced[1].text.split()) <= set(vocabulary)
    assert replaced[0] == turns[0]


def test_other_image_never_the_same_image() -> None:
    keys = ["a", "a", "b", "c"]
    for position in range(4):
        (other,) = other_indices(position, keys, seed=3, count=1)
        assert keys[other] != keys[position]
    assert other_indices(0, ["a", "a"], seed=0, count=1) == []


def test_other_indices_are_distinct_images_and_extend_the_first() -> None:
    keys = ["a", "a", "b", "c", "c", "d"]
    for position in range(len(keys)):
        three = other_indices(position, keys, seed=5, count=3)
        # more others keep the first, the draw every earlier probe set made
        first = random.Random(5 * 1_000_003 + position).choice([i for i, k in enumerate(keys) if k != keys[position]])
        assert three[0] == other_indices(position, keys, seed=5, count=1)[0] == first
        images = [keys[i] for i in three]
        assert keys[position] not in images and len(set(images)) == len(images)
    assert len(other_indices(2, keys, seed=5, count=9)) == 3  # a, c, d: every other image once
    assert other_rung(0).kind == "other" and other_rung(2) == Rung("other3", 1, "other")


def test_jpeg_bits_orders_the_ladder(photos: dict[str, Image.Image]) -> None:
    images, ladders, tiers, chains = _ladder_rows(photos)
    agent = JpegBitsAgent()
    results = agent.score_batch([ImageItem(str(i), im) for i, im in enumerate(images)])
    score = np.array([r["score"] for r in results])
    bpp = np.array([r["bits_per_pixel"] for r in results])
    kinds = [r.kind for _ in photos for r in IMAGE_LADDER]
    original = score[[k == "original" for k in kinds]]
    for kind in ("downscale_tiny", "blur", "flat", "noise"):
        degraded = score[[k == kind for k in kinds]]
        assert (original[:, None] > degraded[None, :]).mean() >= 0.95, kind
    # two-sided: pure noise costs the most bits but scores low
    assert bpp[[k == "noise" for k in kinds]].min() > bpp[[k == "original" for k in kinds]].max()
    pairs = ladder_pairs(ladders, tiers, chains)
    assert concordance(score, pairs) > 0.75  # each poorer rung once: crops (no fewer bits per pixel) included
    assert concordance(bpp, pairs) < concordance(score, pairs)  # one-sided is fooled by noise


def test_label_entropy_separates_information_poor_images(photos: dict[str, Image.Image]) -> None:
    pytest.importorskip("torch")
    from visa.agents.label_entropy import LabelEntropyAgent
    from visa.agents.tagger import TaggerAgent, TaggerParams

    tagger = TaggerAgent(TaggerParams(faces=False))
    tagger.setup()
    agent = LabelEntropyAgent()
    (need,) = agent.needs
    assert need == "oa.tagger.entropy"
    names = list(photos)
    rows = {kind: [degrade(photos[n], kind, n) for n in names] for kind in ("original", "flat", "noise", "blur")}

    def scored(images: list[Image.Image]) -> np.ndarray:
        tags = tagger.score_batch([ImageItem(str(i), im) for i, im in enumerate(images)])
        items = [ImageItem(str(i), im, {need: t["entropy"]}) for i, (im, t) in enumerate(zip(images, tags, strict=True))]
        return np.array([r["score"] for r in agent.score_batch(items)])

    scores = {kind: scored(ims) for kind, ims in rows.items()}

    def auroc(kind: str) -> float:
        return float((scores["original"][:, None] > scores[kind][None, :]).mean())

    # flat images are the most diffuse; textures and micrographs (grass, retina, hubble) confuse an
    # ImageNet classifier about as much as noise does, so noise is separated less well
    assert auroc("flat") >= 0.95
    assert auroc("noise") >= 0.75
    assert auroc("blur") >= 0.75
    assert np.all(scores["original"] <= 0) and np.all(scores["original"] >= -np.log(1000) - 1e-6)
    # an image the tagger failed on is an error row of this agent too, not a score
    (missing,) = agent.score_batch([ImageItem("x", rows["original"][0], {need: None})])
    assert isinstance(missing, ValueError) and need in str(missing)


def test_label_entropy_without_its_tagger_is_a_recipe_error(tmp_path: Path) -> None:
    from visa.recipe import RecipeError, load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("scores:\n  oa:\n    agents:\n      - {name: label_entropy, type: label_entropy}\n")
    with pytest.raises(RecipeError, match="oa.tagger.entropy"):
        load_recipe(path)