"""The verbalised image: what the embedded visual agents saw, written as text for text-only models.

The embedded recipe has no vision-language model. Its language agents (PT, IM, DP over
:class:`~visa.backends.embedded_lm.EmbeddedLMBackend`, and the MiniLM similarity agent) read the
image through the outputs of the visual agents instead, which reach them through ``needs`` +
``SampleItem.context`` (``ImageItem.context`` for the judge, itself an image agent):

=================  ======================================  ========================================
evidence           default column                          meaning
=================  ======================================  ========================================
``labels``         ``oa.tagger.labels``                    detected tags, repeats = counts
``top_labels``     ``oa.tagger.top_labels``                the classifier's top-10 ImageNet labels
``top_probs``      ``oa.tagger.top_probs``                 their probabilities
``ocr_text``       ``sc.ocr_text.text``                    recognised text
``ocr_boxes``      ``sc.ocr_text``                         number of text boxes
``regions``        ``sc.felzenszwalb``                     number of image regions
``width/height``   ``image.stats.width`` / ``.height``     pixels
``entropy``        ``image.stats``                         grey-level entropy in bits
=================  ======================================  ========================================

Every column is configurable (``evidence:`` in an agent's params; ``null`` drops one). Missing
values (an upstream agent failed, or is not in the recipe) are simply left out of the text.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Language = Literal["en", "zh"]
IMAGE_PLACEHOLDER = re.compile(r"[ \t]*<image>[ \t]*\n?")


def strip_image_placeholders(text: str) -> str:
    """Remove LLaVA ``<image>`` placeholders (and the line break that usually follows one)."""
    return IMAGE_PLACEHOLDER.sub("", text).strip()


class EvidenceColumns(BaseModel):
    """Which context column holds each piece of visual evidence (``None``: not used)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    labels: str | None = "oa.tagger.labels"
    top_labels: str | None = "oa.tagger.top_labels"
    top_probs: str | None = "oa.tagger.top_probs"
    ocr_text: str | None = "sc.ocr_text.text"
    ocr_boxes: str | None = "sc.ocr_text"
    regions: str | None = "sc.felzenszwalb"
    width: str | None = "image.stats.width"
    height: str | None = "image.stats.height"
    entropy: str | None = "image.stats"

    def columns(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(v for v in self.model_dump().values() if v))


class VerbalizeOptions(BaseModel):
    """How the evidence is written."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    language: Language = "en"
    top_k: int = Field(5, ge=0, le=50, description="classifier labels listed")
    min_prob: float = Field(0.02, ge=0.0, le=1.0, description="labels below this probability are left out")
    max_text_chars: int = Field(300, ge=0, description="recognised text is cut to this length")
    statistics: bool = Field(True, description="mention size, regions and tonal range")


@dataclass(frozen=True)
class Evidence:
    """Visual evidence for one image, gathered from the context of a sample (or an image's results)."""

    labels: tuple[str, ...] = ()
    top: tuple[tuple[str, float | None], ...] = ()
    ocr_text: str = ""
    ocr_boxes: int | None = None
    regions: int | None = None
    width: int | None = None
    height: int | None = None
    entropy: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.labels or self.top or self.ocr_text)

    def label_counts(self) -> Counter[str]:
        return Counter(self.labels)


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _strings(value: Any) -> tuple[str, ...]:
    if value is None or isinstance(value, str):
        return ()
    try:
        return tuple(str(v).strip() for v in value if v is not None and str(v).strip())
    except TypeError:
        return ()


def gather(context: Mapping[str, Any], columns: EvidenceColumns) -> Evidence:
    """Read the evidence out of a sample's ``context`` (malformed values are ignored, not fatal)."""

    def get(name: str) -> Any:
        column = getattr(columns, name)
        return context.get(column) if column else None

    top_labels = _strings(get("top_labels"))
    probs_raw = get("top_probs")
    probs: list[float | None] = []
    if probs_raw is not None and not isinstance(probs_raw, str):
        try:
            probs = [_number(p) for p in probs_raw]
        except TypeError:
            probs = []
    if len(probs) != len(top_labels):
        probs = [None] * len(top_labels)
    text = get("ocr_text")
    boxes, regions = _number(get("ocr_boxes")), _number(get("regions"))
    width, height = _number(get("width")), _number(get("height"))
    return Evidence(
        labels=_strings(get("labels")),
        top=tuple(zip(top_labels, probs, strict=True)),
        ocr_text=" ".join(text.split()) if isinstance(text, str) else "",
        ocr_boxes=None if boxes is None else int(boxes),
        regions=None if regions is None else int(regions),
        width=None if width is None else int(width),
        height=None if height is None else int(height),
        entropy=_number(get("entropy")),
    )


_WORDS = {
    "en": {
        "intro": "Automatic analysis of the image (it can be wrong):",
        "classes": "it most likely shows {items}.",
        "objects": "Detected objects: {items}.",
        "faces": "Faces: {n}.",
        "text": 'Text written in the image: "{text}".',
        "no_text": "No text was found in the image.",
        "size": "The picture is {w} x {h} pixels",
        "regions": "with {level} detail ({n} regions)",
        "tones": "and a {level} tonal range",
        "detail": ("very little", "some", "a lot of", "very much"),
        "tone": ("narrow", "moderate", "wide"),
        "or": " or ",
        "sep": ", ",
    },
    "zh": {
        "intro": "图像的自动分析结果（可能有误）：",
        "classes": "图中最可能是{items}。",
        "objects": "检测到的物体：{items}。",
        "faces": "人脸：{n}个。",
        "text": "图中的文字：“{text}”。",
        "no_text": "图中没有发现文字。",
        "size": "图片大小为{w}×{h}像素",
        "regions": "，细节{level}（{n}个区域）",
        "tones": "，色调范围{level}",
        "detail": ("很少", "一般", "较多", "非常多"),
        "tone": ("窄", "适中", "宽"),
        "or": "或",
        "sep": "、",
    },
}


def _level(value: float, cuts: tuple[float, ...]) -> int:
    return sum(value >= cut for cut in cuts)


def classifier_items(evidence: Evidence, options: VerbalizeOptions) -> list[tuple[str, float | None]]:
    """The classifier labels worth mentioning: top-k above ``min_prob`` (first label always kept)."""
    items: list[tuple[str, float | None]] = []
    for n, (label, prob) in enumerate(evidence.top[: options.top_k]):
        if n and prob is not None and prob < options.min_prob:
            break
        if label not in (seen[0] for seen in items):
            items.append((label, prob))
    return items


def verbalize(evidence: Evidence, options: VerbalizeOptions | None = None) -> str:
    """A short paragraph describing the evidence; "" when there is no content evidence at all."""
    options = options or VerbalizeOptions()
    if evidence.empty:
        return ""
    words = _WORDS[options.language]
    parts = [words["intro"]]
    items = classifier_items(evidence, options)
    if items:
        shown = [f"{label} ({prob:.0%})" if prob is not None else label for label, prob in items]
        parts.append(words["classes"].format(items=words["or"].join(shown) if len(shown) < 3 else
                                             words["sep"].join(shown)))
    counts = evidence.label_counts()
    faces = counts.pop("face", 0)
    if counts:
        objects = [f"{n} x {label}" if n > 1 else label for label, n in counts.most_common(12)]
        parts.append(words["objects"].format(items=words["sep"].join(objects)))
    if faces:
        parts.append(words["faces"].format(n=faces))
    if evidence.ocr_text and options.max_text_chars:
        text = evidence.ocr_text[: options.max_text_chars]
        parts.append(words["text"].format(text=text))
    elif evidence.ocr_boxes == 0:
        parts.append(words["no_text"])
    if options.statistics and evidence.width and evidence.height:
        sentence = words["size"].format(w=evidence.width, h=evidence.height)
        if evidence.regions is not None:
            level = words["detail"][_level(evidence.regions, (50, 200, 800))]
            sentence += (" " if options.language == "en" else "") + words["regions"].format(level=level, n=evidence.regions)
        if evidence.entropy is not None:
            level = words["tone"][_level(evidence.entropy, (5.0, 7.0))]
            sentence += (" " if options.language == "en" else "") + words["tones"].format(level=level)
        parts.append(sentence + ("." if options.language == "en" else "。"))
    return (" " if options.language == "en" else "").join(parts)


def evidence_phrases(evidence: Evidence, options: VerbalizeOptions | None = None) -> list[str]:
    """The content words of the evidence (labels, detected objects, recognised text), for embeddings."""
    options = options or VerbalizeOptions()
    phrases = [label for label, _ in classifier_items(evidence, options)]
    phrases += [label for label in evidence.label_counts() if label not in phrases]
    if evidence.ocr_text and options.max_text_chars:
        phrases.append(evidence.ocr_text[: options.max_text_chars])
    return phrases
