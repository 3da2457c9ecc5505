"""Model architectures the transformers and vLLM backends know: how to load them and how to talk to them.

An *architecture* (``Family`` below, the backend parameter ``family``) is a multimodal model family with its own processor (how an image becomes tokens) and
chat template (how a conversation becomes text). Everything family-specific that the backends need
lives here; the chat template itself always comes from the checkpoint's processor, so a backend
never hard-codes template text or token ids.

Families: Qwen2-VL and Qwen2.5-VL (``qwen2_vl``, ``qwen2_5_vl``), InternVL2.5/3 in the native
transformers format (the ``-hf`` checkpoints, ``internvl``), and LLaVA-OneVision (``llava_onevision``,
the ``-hf`` checkpoints).

Random-weight checkpoints of these architectures, for tests and benchmarks, are built by
:mod:`visa.testing`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from visa.backends.chat_spans import SpanError, token_indices

#: Strings that mark an image inside LLaVA/ShareGPT text; the image is attached separately.
TEXT_IMAGE_MARKERS = ("<image>",)


@dataclass(frozen=True, slots=True)
class Family:
    """What differs between multimodal architectures, as far as the backends are concerned."""

    name: str
    #: ``config.model_type`` values of this family.
    model_types: tuple[str, ...]
    #: transformers class names.
    model_class: str
    processor_class: str
    #: What the family's vLLM prompt uses for one image (the processor's placeholder).
    image_placeholder: str


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            "qwen2_vl",
            ("qwen2_vl",),
            "Qwen2VLForConditionalGeneration",
            "Qwen2VLProcessor",
            "<|vision_start|><|image_pad|><|vision_end|>",
        ),
        Family(
            "qwen2_5_vl",
            ("qwen2_5_vl",),
            "Qwen2_5_VLForConditionalGeneration",
            "Qwen2_5_VLProcessor",
            "<|vision_start|><|image_pad|><|vision_end|>",
        ),
        Family(
            "internvl",
            ("internvl",),
            "InternVLForConditionalGeneration",
            "InternVLProcessor",
            "<IMG_CONTEXT>",
        ),
        Family(
            "llava_onevision",
            ("llava_onevision",),
            "LlavaOnevisionForConditionalGeneration",
            "LlavaOnevisionProcessor",
            "<image>",
        ),
    )
}


class UnsupportedModel(ValueError):
    """The checkpoint's architecture is not one of the supported families."""


def family_for_model_type(model_type: str) -> Family:
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    hint = ""
    if model_type in {"internvl_chat", "internlm2"}:
        hint = " (the original InternVL checkpoints need remote code; use the '-hf' conversions)"
    raise UnsupportedModel(
        f"model type '{model_type}' is not supported{hint}; supported: "
        + ", ".join(t for f in FAMILIES.values() for t in f.model_types)
    )


def resolve_family(name: str, model_type: str) -> Family:
    """The family named by a backend parameter (``auto``: from the checkpoint's ``model_type``)."""
    if name == "auto":
        return family_for_model_type(model_type)
    if name not in FAMILIES:
        raise UnsupportedModel(f"unknown model family '{name}'; known: auto, {', '.join(FAMILIES)}")
    return FAMILIES[name]


# -- conversations ------------------------------------------------------------------------------


def clean_text(text: str, placeholders: Sequence[str] = ()) -> str:
    """Remove image markers (``<image>`` and the processor's own placeholders) from message text.

    Images are attached as separate content parts; a literal placeholder left in the text would make
    the processor look for an image that is not there.
    """
    found = False
    for marker in (*TEXT_IMAGE_MARKERS, *placeholders):
        if marker and marker in text:
            found = True
            text = text.replace(marker + "\n", "").replace("\n" + marker, "").replace(marker, "")
    return text.strip() if found else text


def chat_messages(
    turns: Sequence[tuple[str, str, int]], placeholders: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """Chat-template messages from ``(role, text, number of images)`` triples.

    Images come first in a message's content, then its single text part (the layout every supported
    family's template accepts).
    """
    messages = []
    for role, text, n_images in turns:
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"unknown role '{role}'")
        if n_images and role != "user":
            raise ValueError(f"images can only be attached to user messages, not to '{role}'")
        content: list[dict[str, Any]] = [{"type": "image"} for _ in range(n_images)]
        content.append({"type": "text", "text": clean_text(text, placeholders)})
        messages.append({"role": role, "content": content})
    return messages


def first_user_index(roles: Sequence[str]) -> int:
    for i, role in enumerate(roles):
        if role == "user":
            return i
    raise ValueError("the conversation has no user turn to attach the image to")


def check_teacher_forced(roles: Sequence[str]) -> None:
    if "assistant" not in roles:
        raise ValueError("the conversation has no assistant turn to score")


class AlignmentError(RuntimeError):
    """The model's input tokens do not match the local tokenisation where the answers are."""


def answer_tokens(
    text: str, spans: Sequence[tuple[int, int]], tokenizer: Any
) -> tuple[list[int], list[list[int]]]:
    """Token ids of the rendered ``text`` and, per answer span, the indices of its tokens.

    Image placeholders are not expanded here: :func:`align_tail` later maps the indices onto the
    sequence the model actually reads.
    """
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    answers = token_indices(encoding["offset_mapping"], spans)
    for k, tokens in enumerate(answers):
        if not tokens and spans[k][1] > spans[k][0]:
            raise SpanError(f"assistant answer {k} has no tokens")
    return list(encoding["input_ids"]), answers


def align_tail(
    ours: Sequence[int], theirs: Sequence[int], answers: Sequence[Sequence[int]]
) -> list[list[int]]:
    """Map answer token indices from the local tokenisation (``ours``) onto the model's input (``theirs``).

    The model's input differs from ours only where image placeholders were expanded into image
    tokens (and perhaps a BOS in front). All images precede the first answer, so from the first
    answer token on the two sequences must be identical; that is checked, token by token.
    """
    scored = [i for turn in answers for i in turn]
    if not scored:
        return [[] for _ in answers]
    shift = len(theirs) - len(ours)
    first = min(scored)
    if shift < 0 or first + shift < 1 or list(ours[first:]) != list(theirs[first + shift :]):
        raise AlignmentError(
            "the model's input tokens differ from the local tokenisation after the images; "
            "the engine and the backend must use the same tokenizer and chat template"
        )
    return [[i + shift for i in turn] for turn in answers]


def fit_pixels(image: Image.Image, max_pixels: int | None) -> Image.Image:
    """RGB, downscaled (aspect ratio kept) so that width * height <= ``max_pixels``."""
    image = image.convert("RGB") if image.mode != "RGB" else image
    if max_pixels is None or image.width * image.height <= max_pixels:
        return image
    scale = (max_pixels / (image.width * image.height)) ** 0.5
    size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
    while size[0] * size[1] > max_pixels:
        size = (max(1, size[0] - 1), max(1, size[1] - 1))
    return image.resize(size, Image.Resampling.BICUBIC)


# -- loading ------------------------------------------------------------------------------------


def _image_only(processor_class: type) -> type:
    """The processor class without its video processor.

    transformers 5.x builds every video processor on torchvision; without torchvision a multimodal
    processor cannot even be constructed. Images need no video processor, so where torchvision is
    missing the backends load this variant.
    """

    class ImageOnlyProcessor(processor_class):  # type: ignore[misc, valid-type]
        @classmethod
        def get_attributes(cls) -> list[str]:
            return [a for a in super().get_attributes() if "video" not in a]

    ImageOnlyProcessor.__name__ = processor_class.__name__
    ImageOnlyProcessor.__qualname__ = processor_class.__qualname__
    return ImageOnlyProcessor


def processor_class_for(family: Family, image_only: bool | None = None) -> type:
    import transformers

    cls = getattr(transformers, family.processor_class)
    if image_only is None:
        image_only = importlib.util.find_spec("torchvision") is None
    return _image_only(cls) if image_only else cls


def load_processor(
    model: str, family: Family, *, revision: str | None = None, trust_remote_code: bool = False
) -> Any:
    """The checkpoint's processor (tokenizer + image processor + chat template)."""
    if trust_remote_code:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(model, revision=revision, trust_remote_code=True)
    return processor_class_for(family).from_pretrained(model, revision=revision)


def model_type_of(model: str, *, revision: str | None = None, trust_remote_code: bool = False) -> str:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(
        model, revision=revision, trust_remote_code=trust_remote_code
    ).model_type
