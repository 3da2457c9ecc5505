"""The transformer visual agents (Grounding DINO, OWLv2, SAM 2.1) on tiny randomly initialised models.

No weights exist offline: every model here is built from a tiny config with a fixed seed, and the
agents receive it through their ``from_model`` hooks. The post-processing is tested on hand-built
logits and masks, where the right answer is known.
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import itertools

from visa.agents.base import ImageItem
from visa.agents.grounding_dino import (
    Detection,
    GroundingDinoAgent,
    GroundingDinoParams,
    box_iou,
    dedup_same_label,
    detect,
    encode_image,
    encode_text,
    grounded_detections,
    nms,
)
from visa.agents.sam2 import (
    MaskRecord,
    Sam2Agent,
    Sam2Params,
    clean_small_regions,
    crop_boxes,
    mask_to_box,
    near_crop_edge,
    point_grid,
    remove_small_regions,
    stability_score,
)
from visa.agents.tfidf import finalize_tfidf, tfidf_scores
from visa.agents.vocabulary import TagSpan, load_tags, pack_prompts

IMAGES = Path(__file__).resolve().parents[1] / "examples" / "images"
TAGS = [
    "cat",
    "dog",
    "coffee cup",
    "tree",
    "car",
    "chair",
    "table",
    "bird",
    "flower",
    "house",
    "boat",
    "teapot",
]


def photo(name: str = "coffee.jpg", size: tuple[int, int] | None = (168, 112)) -> Image.Image:
    image = Image.open(IMAGES / name).convert("RGB")
    return image.resize(size) if size else image


# --------------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------------
def char_tokenizer():
    """A BERT tokenizer over single letters, with [CLS]/[SEP]/'.' at bert-base-uncased's ids
    (101/102/1012), which Grounding DINO's phrase masks rely on."""
    from transformers import BertTokenizerFast

    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = list(string.ascii_lowercase) + [f"##{c}" for c in string.ascii_lowercase]
    while len(vocab) < 1012:
        vocab.append(pieces.pop(0) if pieces else f"[unused{len(vocab)}]")
    vocab.append(".")
    vocab += pieces
    return BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True), len(
        vocab
    )


@pytest.fixture(scope="module")
def gdino():
    from transformers import (
        BertConfig,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        SwinConfig,
    )

    tokenizer, vocab_size = char_tokenizer()
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(
            embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4, out_indices=[2, 3, 4]
        ),
        text_config=BertConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=256,
        ),
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=30,
        encoder_n_points=2,
        decoder_n_points=2,
    )
    torch.manual_seed(0)
    model = GroundingDinoForObjectDetection(config).eval()
    # Random weights saturate every token probability; shrink the text features so that the
    # thresholds separate detections from non-detections.
    with torch.no_grad():
        model.model.text_projection.weight.mul_(0.02)
        model.model.text_projection.bias.zero_()
    return model, tokenizer, GroundingDinoImageProcessor()


@pytest.fixture
def tag_file(tmp_path: Path) -> Path:
    path = tmp_path / "tags.txt"
    path.write_text("# test vocabulary\n" + "\n".join(TAGS) + "\n", encoding="utf-8")
    return path


def gd_agent(gdino, tag_file: Path, **overrides) -> GroundingDinoAgent:
    model, tokenizer, processor = gdino
    params = {
        "tags": str(tag_file),
        "max_prompt_tokens": 40,
        "image_size": 64,
        "max_image_size": 96,
        "fast_image_size": 48,
        "device": "cpu",
        "box_threshold": 0.3,
        "text_threshold": 0.3,
    }
    params.update(overrides)
    return GroundingDinoAgent.from_model(model, tokenizer, processor, GroundingDinoParams(**params))


@pytest.fixture(scope="module")
def sam():
    from transformers import Sam2Model

    from visa.agents.sam2 import sam2_config

    config = sam2_config(tiny=True)
    torch.manual_seed(0)
    return Sam2Model(config).eval()


# --------------------------------------------------------------------------------------------------
# Vocabulary and prompt packing
# --------------------------------------------------------------------------------------------------
def test_bundled_vocabulary_is_the_documented_selection():
    tags = load_tags()
    assert len(tags) == 1886
    assert len({t.lower() for t in tags}) == len(tags)
    assert {"cat", "coffee cup", "bicycle", "umbrella"} <= set(tags)
    # Places, people and scene compositions were filtered out.
    assert not {"airport", "bedroom", "woman", "autumn park", "sunset"} & set(tags)


def test_load_tags_skips_comments_and_duplicates(tmp_path: Path):
    path = tmp_path / "t.txt"
    path.write_text("# header\n\ncat\n Cat \ncoffee   cup\n", encoding="utf-8")
    assert load_tags(path) == ["cat", "coffee cup"]
    with pytest.raises(ValueError, match="not found"):
        load_tags(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no tags"):
        load_tags(tmp_path / "empty.txt")


def test_packing_respects_the_token_budget_and_covers_every_tag_per_repeat():
    tokenizer, _ = char_tokenizer()
    tags = load_tags()[:200]

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prompts = pack_prompts(
        tags, encode, tokenizer.cls_token_id, tokenizer.sep_token_id, max_tokens=250, repeats=3
    )
    for repeat in range(3):
        in_repeat = [tag for p in prompts if p.repeat == repeat for tag in p.tags]
        assert sorted(in_repeat) == sorted(tags)
    orders = [[tag for p in prompts if p.repeat == r for tag in p.tags] for r in range(3)]
    assert orders[0] != orders[1] != orders[2]  # different seeds, different contexts
    for prompt in prompts:
        assert len(prompt.input_ids) - 2 <= 250
        # The packed ids are exactly what the tokenizer gives for the prompt text.
        assert list(prompt.input_ids) == tokenizer(prompt.text.strip())["input_ids"]
        for span in prompt.spans:
            assert tokenizer.decode(prompt.input_ids[span.start : span.end]).replace(
                " ", ""
            ) == span.tag.replace(" ", "")
            assert prompt.input_ids[span.end] == tokenizer.convert_tokens_to_ids(".")
    # Greedy: no prompt could have taken the next prompt's first tag.
    for a, b in itertools.pairwise(prompts):
        if a.repeat == b.repeat:
            first = b.spans[0]
            assert len(a.input_ids) - 2 + (first.end - first.start + 1) > 250
    assert pack_prompts(tags, encode, 101, 102, seed=5) == pack_prompts(tags, encode, 101, 102, seed=5)


def test_packing_rejects_a_tag_longer_than_the_budget():
    tokenizer, _ = char_tokenizer()
    with pytest.raises(ValueError, match="more than max_tokens"):
        pack_prompts(
            ["hippopotamus"],
            lambda t: tokenizer(t, add_special_tokens=False)["input_ids"],
            101,
            102,
            max_tokens=5,
        )


# --------------------------------------------------------------------------------------------------
# Grounding DINO post-processing on hand-built logits
# --------------------------------------------------------------------------------------------------
def test_thresholds_are_applied_as_specified():
    spans = [TagSpan("cat", 1, 2), TagSpan("coffee cup", 3, 5)]
    probs = torch.zeros(4, 8)
    probs[0, 1] = 0.9  # box 0: cat
    probs[0, 3], probs[0, 4] = 0.9, 0.2  # coffee cup mean 0.55 -> also detected
    probs[1, 1] = 0.41  # box 1: max 0.41 > 0.4, cat mean 0.41 > 0.4 -> cat
    probs[1, 3], probs[1, 4] = 0.41, 0.38  # coffee cup mean 0.395 -> not > 0.4
    probs[2, 1] = 0.4  # box 2: max exactly 0.4 -> box dropped
    probs[3, 1] = 0.95  # box 3: too large
    boxes = torch.tensor(
        [[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 1.0, 0.96]]
    )
    found = grounded_detections(probs, boxes, spans, 0.4, 0.4, 0.95)
    got = sorted((d.tag, round(d.score, 3)) for d in found)
    assert got == [("cat", 0.41), ("cat", 0.9), ("coffee cup", 0.55)]
    cat = next(d for d in found if d.score == pytest.approx(0.9))
    assert cat.box == pytest.approx((0.4, 0.4, 0.6, 0.6))
    # A box kept only through a token outside every tag (e.g. the period) detects nothing.
    only_period = torch.zeros(1, 8)
    only_period[0, 2] = 0.99
    assert grounded_detections(only_period, boxes[:1], spans, 0.4, 0.4, 0.95) == []


def test_same_label_duplicates_are_merged_by_iou():
    dets = [
        Detection("cat", 0.5, (0.0, 0.0, 0.5, 0.5)),
        Detection("cat", 0.9, (0.0, 0.0, 0.5, 0.51)),  # IoU 0.98 with the first: duplicate
        Detection("cat", 0.6, (0.5, 0.5, 1.0, 1.0)),  # another cat
        Detection("dog", 0.4, (0.0, 0.0, 0.5, 0.5)),  # same box, other label: kept
    ]
    kept = dedup_same_label(dets, 0.9)
    assert [(d.tag, d.score) for d in kept] == [("cat", 0.9), ("cat", 0.6), ("dog", 0.4)]
    assert len(dedup_same_label(dets, 0.99)) == 4


def test_nms_and_iou():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], dtype=torch.float32)
    assert box_iou(boxes[:1], boxes[1:2]).item() == pytest.approx(81 / 100)
    assert nms(boxes, torch.tensor([0.5, 0.9, 0.1]), 0.7).tolist() == [1, 2]
    assert nms(boxes, torch.tensor([0.5, 0.9, 0.1]), 0.85).tolist() == [1, 0, 2]
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0


# --------------------------------------------------------------------------------------------------
# Grounding DINO end to end on a tiny model
# --------------------------------------------------------------------------------------------------
def test_cached_features_give_the_full_forward_results(gdino, tag_file):
    model, _tokenizer, processor = gdino
    agent = gd_agent(gdino, tag_file)
    inputs = processor(images=photo(), size={"shortest_edge": 64, "longest_edge": 96}, return_tensors="pt")
    with torch.inference_mode():
        image = encode_image(model, inputs["pixel_values"], inputs["pixel_mask"])
        for prompt in agent.prompts[:3]:
            ids = torch.tensor([prompt.input_ids])
            full = model(pixel_values=inputs["pixel_values"], pixel_mask=inputs["pixel_mask"], input_ids=ids)
            logits, boxes = detect(model, image, encode_text(model, ids))
            n = ids.shape[1]
            torch.testing.assert_close(logits[0, :, :n], full.logits[0, :, :n], atol=1e-4, rtol=1e-4)
            assert torch.isinf(logits[0, :, n:]).all()
            torch.testing.assert_close(boxes, full.pred_boxes, atol=1e-5, rtol=1e-5)


def test_agent_detections_match_the_reference_procedure(gdino, tag_file):
    naive = gd_agent(gdino, tag_file, reuse_features=False).detect_image(photo())
    cached = gd_agent(gdino, tag_file).detect_image(photo())
    batched = gd_agent(gdino, tag_file, prompt_batch_size=4).detect_image(photo())
    assert naive, "the tiny model should detect something at these thresholds"
    for other in (cached, batched):
        assert [d.tag for d in other] == [d.tag for d in naive]
        for a, b in zip(other, naive):
            assert a.box == pytest.approx(b.box, abs=1e-4)
            assert a.score == pytest.approx(b.score, abs=1e-4)


def test_agent_outputs_and_tfidf_finalize(gdino, tag_file):
    agent = gd_agent(gdino, tag_file)
    items = [
        ImageItem("a", photo("coffee.jpg")),
        ImageItem("b", photo("chelsea.jpg")),
        ImageItem("c", Image.new("RGB", (0, 0))),
    ]
    results = agent.score_batch(items)
    assert isinstance(results[2], Exception) and "empty image" in str(results[2])
    for result in results[:2]:
        assert set(result) == set(agent.outputs)
        assert len(result["labels"]) == len(result["boxes"]) == len(result["confidences"])
        assert set(result["labels"]) <= set(TAGS)
        for box, confidence in zip(result["boxes"], result["confidences"]):
            assert 0 <= box[0] <= box[2] <= 1 and 0 <= box[1] <= box[3] <= 1
            assert confidence > 0.3
    rows = [{"key": k, **r} for k, r in zip("ab", results[:2])]
    table = pa.Table.from_pylist(rows, schema=pa.schema([("key", pa.string()), *agent.outputs.items()]))
    finalized = agent.finalize(table)
    expected = tfidf_scores([r["labels"] for r in results[:2]])
    assert finalized.column("score").to_pylist() == pytest.approx(expected)
    assert agent.models() == {"IDEA-Research/grounding-dino-base": "main"}


def test_fast_mode_grounds_only_candidates(gdino, tag_file):
    fast = gd_agent(gdino, tag_file, mode="fast", fast_box_threshold=0.3, fast_text_threshold=0.3)
    found = fast.detect_image(photo())
    assert {d.tag for d in found} <= set(TAGS)
    # With a candidate pass that finds nothing, nothing is grounded.
    none = gd_agent(gdino, tag_file, mode="fast", fast_box_threshold=1.0)
    assert none.detect_image(photo()) == []


# --------------------------------------------------------------------------------------------------
# TF-IDF
# --------------------------------------------------------------------------------------------------
def test_tfidf_over_the_pool():
    import math

    scores = tfidf_scores([["cat", "cat", "dog"], ["dog"], [], None])
    n = 3  # the failed image is not part of the pool
    assert scores[0] == pytest.approx(2 * math.log(n / 1) + math.log(n / 2))
    assert scores[1] == pytest.approx(math.log(n / 2))
    assert scores[2] == 0.0 and scores[3] is None
    table = pa.table({"key": ["x", "y"], "labels": [["a"], ["a", "b"]]})
    assert finalize_tfidf(table).column("score").to_pylist() == pytest.approx([0.0, math.log(2)])
    with pytest.raises(KeyError):
        finalize_tfidf(pa.table({"key": ["x"]}))


# --------------------------------------------------------------------------------------------------
# SAM 2 mask generation: post-processing on hand-built masks
# --------------------------------------------------------------------------------------------------
def test_crop_boxes_and_point_grid():
    boxes = crop_boxes(1500, 1000, 1, 512 / 1500)
    assert boxes[0] == ((0, 0, 1500, 1000), 0)
    layer1 = [b for b, layer in boxes if layer == 1]
    assert len(layer1) == 4
    overlap = int(512 / 1500 * 1000)
    assert layer1[0] == (0, 0, -(-(overlap + 1500) // 2), -(-(overlap + 1000) // 2))  # ceil
    assert max(b[2] for b in layer1) == 1500 and max(b[3] for b in layer1) == 1000
    assert layer1[1][0] < layer1[0][2]  # neighbouring crops overlap
    grid = point_grid(4)
    assert grid.shape == (16, 2) and grid.min() == pytest.approx(0.125) and grid.max() == pytest.approx(0.875)


def test_stability_score_and_mask_boxes():
    logits = torch.full((2, 10, 10), -5.0)
    logits[0, 2:6, 2:6] = 5.0  # sharp edges: stable
    logits[1, 2:6, 2:6] = 5.0
    logits[1, 0:10, 0:10] += 5.0  # the background sits inside +/- offset of the threshold: unstable
    score = stability_score(logits, 0.5, 0.7)
    assert score[0].item() == 1.0
    assert score[1].item() == pytest.approx(16 / 100)
    masks = logits > 0.5
    masks[1] = False
    assert mask_to_box(masks).tolist() == [[2, 2, 5, 5], [0, 0, 0, 0]]


def test_crop_edge_filter():
    boxes = torch.tensor([[0, 0, 100, 100], [480, 10, 510, 50], [600, 600, 990, 990]], dtype=torch.float32)
    near = near_crop_edge(boxes, (0, 0, 512, 512), (0, 0, 1000, 1000))
    assert near.tolist() == [False, True, False]


def test_small_regions():
    mask = np.zeros((20, 20), dtype=bool)
    mask[2:12, 2:12] = True
    mask[5, 5] = False  # a one-pixel hole
    mask[15:17, 15:17] = True  # a 4-pixel island
    filled, changed = remove_small_regions(mask, 25, "holes")
    assert changed and filled[5, 5]
    cleaned, changed = remove_small_regions(filled, 25, "islands")
    assert changed and not cleaned[15:17, 15:17].any() and cleaned[2:12, 2:12].all()
    only_small = np.zeros((6, 6), dtype=bool)
    only_small[0, 0] = True
    only_small[3:5, 3:5] = True
    kept, _ = remove_small_regions(only_small, 25, "islands")
    assert kept[3:5, 3:5].all() and not kept[0, 0]  # every island small: the largest stays
    # Through clean_small_regions a notch open to the outside of the box is not a hole.
    pixels = np.ones((5, 5), dtype=bool)
    pixels[0, 2] = False  # open notch on the top edge
    pixels[2, 2] = False  # closed hole
    record = MaskRecord((10, 10, 14, 14), pixels, 0.9, 0.95, 0)
    cleaned_record, unchanged = clean_small_regions(record, 100, 100, 25)
    assert not unchanged
    assert cleaned_record.pixels[2, 2] and not cleaned_record.pixels[0, 2]


def test_sam2_agent_end_to_end(sam):
    with torch.no_grad():  # make the random mask logits spatially varied
        for mlp in sam.mask_decoder.output_hypernetworks_mlps:
            mlp.proj_out.weight.mul_(3000)
    params = Sam2Params(
        device="cpu",
        points_per_side=4,
        pred_iou_thresh=0.0,
        mask_threshold=0.0,
        stability_score_offset=0.01,
        stability_score_thresh=0.5,
    )
    agent = Sam2Agent.from_model(sam, params)
    results = agent.score_batch([ImageItem("a", photo()), ImageItem("b", Image.new("RGB", (0, 0)))])
    result = results[0]
    assert set(result) == set(agent.outputs)
    assert result["n_masks"] >= 1
    assert result["score"] == sum(a >= 0.005 for a in result["mask_areas"])
    assert result["mask_areas"] == sorted(result["mask_areas"], reverse=True)
    assert all(0 < a <= 1 for a in result["mask_areas"])
    assert isinstance(results[1], Exception)
    # Points per batch shrink as the image grows.
    auto = Sam2Agent.from_model(sam, Sam2Params(device="cpu", memory_budget_mb=256))
    assert (
        auto.points_per_batch(1792, 1792) < auto.points_per_batch(800, 600) < auto.points_per_batch(100, 100)
    )
    assert (
        Sam2Agent.from_model(sam, Sam2Params(device="cpu", points_per_batch=7)).points_per_batch(1792, 1792)
        == 7
    )


# --------------------------------------------------------------------------------------------------
# OWLv2
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def owl():
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor

    tokenizer, vocab_size = char_tokenizer()
    config = Owlv2Config(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 24,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 64,
            "patch_size": 16,
        },
        projection_dim=32,
    )
    torch.manual_seed(0)
    model = Owlv2ForObjectDetection(config).eval()
    return model, tokenizer, Owlv2ImageProcessor(size={"height": 64, "width": 64})


def test_owlv2_scores_all_tags_from_cached_text_embeddings(owl, tag_file):
    from visa.agents.owlv2 import Owlv2Agent, Owlv2Params

    model, tokenizer, processor = owl
    agent = Owlv2Agent.from_model(
        model, tokenizer, processor, Owlv2Params(tags=str(tag_file), device="cpu", score_threshold=0.0)
    )
    assert agent.tags == TAGS and agent._queries.shape[0] == len(TAGS)
    image = photo("chelsea.jpg", (150, 100))
    found = agent.detect_image(image)
    assert found and {d.tag for d in found} <= set(TAGS)
    # The reference: the model's own forward with all queries at once, best tag per patch box.
    texts = [f"a photo of a {t}" for t in TAGS]
    batch = tokenizer(texts, padding="max_length", truncation=True, max_length=24, return_tensors="pt")
    from visa.agents.resize import reference_resize

    pixels = processor(images=reference_resize(image), return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=pixels)
    best = out.logits[0].sigmoid().max(-1)
    top = int(best.values.argmax())
    assert any(
        d.tag == TAGS[int(best.indices[top])] and d.score == pytest.approx(float(best.values[top]), abs=1e-5)
        for d in found
    )
    # Boxes come back in the image's own frame (the processor pads to a square).
    for d in found:
        assert 0 <= d.box[0] <= d.box[2] <= 1 and 0 <= d.box[1] <= d.box[3] <= 1
    strict = Owlv2Agent.from_model(
        model, tokenizer, processor, Owlv2Params(tags=str(tag_file), device="cpu", score_threshold=1.0)
    )
    result = strict.score_batch([ImageItem("x", image)])[0]
    assert result == {"labels": [], "boxes": [], "confidences": []}
    with pytest.raises(ValueError, match="text_template"):
        Owlv2Agent(Owlv2Params(text_template="no placeholder"))
