"""Model families the transformers and vLLM backends know: how to load them and how to talk to them.

A *family* is a multimodal architecture with its own processor (how an image becomes tokens) and
chat template (how a conversation becomes text). Everything family-specific that the backends need
lives here; the chat template itself always comes from the checkpoint's processor, so a backend
never hard-codes template text or token ids.

Families: Qwen2-VL and Qwen2.5-VL (``qwen2_vl``, ``qwen2_5_vl``), InternVL2.5/3 in the native
transformers format (the ``-hf`` checkpoints, ``internvl``), and LLaVA-OneVision (``llava_onevision``,
the ``-hf`` checkpoints).

The second half of this module builds **random-weight checkpoints** of each family from configs,
with a small byte-level tokenizer and a chat template that has the structure of the family's real
template. No model hub is reachable from the machines this project runs on, so tests exercise the
real code paths on tiny random models, and benchmarks measure speed on full-size architectures at
random initialisation (speed does not depend on the weights).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
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


# -- random-weight checkpoints (tests, benchmarks) ------------------------------------------------

# Chat templates with the structure of each family's published template (role headers, where the
# image placeholder goes, what follows a turn). Written for this project.
_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n{{ default_system }}<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ image_markup }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_LLAVA_OV_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} "
    "{% if message['content'] is string %}{{ '\\n' + message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}<image>{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + part['text'] }}{% endfor %}"
    "{% endif %}<|im_end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _chatml(default_system: str, image_markup: str) -> str:
    return _CHATML_TEMPLATE.replace("{{ default_system }}", default_system).replace(
        "{{ image_markup }}", image_markup
    )


_SPECIALS = {
    "qwen2_vl": [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ],
    "internvl": [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<img>",
        "</img>",
        "<IMG_CONTEXT>",
        "<video>",
    ],
    "llava_onevision": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"],
}
_SPECIALS["qwen2_5_vl"] = _SPECIALS["qwen2_vl"]


def byte_level_tokenizer(special_tokens: Sequence[str], **kwargs: Any) -> Any:
    """A fast tokenizer over the 256 byte symbols (one token per UTF-8 byte) plus special tokens.

    It has offsets like any real BPE tokenizer, which is what the answer-span code relies on.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={symbol: i for i, symbol in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(special_tokens))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **kwargs)


#: Architecture sizes: ``tiny`` for tests; ``qwen2-vl-2b`` is the published Qwen2-VL-2B shape.
SIZES = ("tiny", "qwen2-vl-2b")


def write_random_checkpoint(family: str, directory: str | Path, *, size: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight checkpoint of ``family`` (model, processor, chat template) to ``directory``.

    The result loads like a downloaded checkpoint: ``from_pretrained(directory)``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model, processor = random_checkpoint(family, size=size, seed=seed)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    _drop_processor_entry(directory / "processor_config.json", "video_processor")
    return directory


def random_checkpoint(
    family: str,
    *,
    size: str = "tiny",
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "float32",
    attn_implementation: str | None = None,
) -> tuple[Any, Any]:
    """A random-weight model of ``family`` (built directly on ``device``) and its processor."""
    import torch
    import transformers

    if family not in FAMILIES:
        raise UnsupportedModel(f"unknown model family '{family}'; known: {', '.join(FAMILIES)}")
    if size not in SIZES or (size != "tiny" and family != "qwen2_vl"):
        raise ValueError(f"size '{size}' is not available for family '{family}'")
    specials = _SPECIALS[family]
    tokenizer_kwargs: dict[str, Any] = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    if family == "internvl":
        tokenizer_kwargs["extra_special_tokens"] = {
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        }
    tokenizer = byte_level_tokenizer(specials, **tokenizer_kwargs)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in specials}
    vocab = len(tokenizer) if size == "tiny" else 151936
    text = {
        "vocab_size": vocab,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "bos_token_id": ids["<|im_start|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    torch.manual_seed(seed)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        if size == "qwen2-vl-2b":
            text.update(
                hidden_size=1536,
                intermediate_size=8960,
                num_hidden_layers=28,
                num_attention_heads=12,
                num_key_value_heads=2,
                max_position_embeddings=32768,
            )
            text["rope_parameters"] = {
                "rope_type": "default",
                "mrope_section": [16, 24, 24],
                "rope_theta": 1e6,
            }
            vision = {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "num_heads": 16, "mlp_ratio": 4}
        else:
            text["rope_parameters"] = {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e4}
            vision = {"depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 4, "mlp_ratio": 2}
        if family == "qwen2_5_vl":
            vision = {
                "depth": 2,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_heads": 4,
                "out_hidden_size": 32,
                "fullatt_block_indexes": [1],
                "window_size": 56,
            }
        config_class = getattr(transformers, "Qwen2VLConfig" if family == "qwen2_vl" else "Qwen2_5_VLConfig")
        config = config_class(
            text_config=text,
            vision_config={**vision, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
            tie_word_embeddings=size != "tiny",
        )
        max_pixels = 28 * 28 * 16 if size == "tiny" else 1280 * 28 * 28
        image_processor = transformers.Qwen2VLImageProcessor(
            size={"shortest_edge": 56 * 56, "longest_edge": max_pixels}
        )
        template = _chatml("You are a helpful assistant.", "<|vision_start|><|image_pad|><|vision_end|>")
        processor_kwargs: dict[str, Any] = {}
    elif family == "internvl":
        config = transformers.InternVLConfig(
            text_config={**text, "model_type": "qwen2"},
            vision_config={
                "hidden_size": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "intermediate_size": 64,
                "image_size": [28, 28],
                "patch_size": [14, 14],
            },
            image_token_id=ids["<IMG_CONTEXT>"],
            image_seq_length=1,
            downsample_ratio=0.5,
            tie_word_embeddings=False,
        )
        image_processor = transformers.GotOcr2ImageProcessor(
            size={"height": 28, "width": 28}, crop_to_patches=True, min_patches=1, max_patches=4
        )
        template = _chatml("You are a helpful multimodal assistant.", "<IMG_CONTEXT>\n")
        processor_kwargs = {"image_seq_length": 1}
    else:  # llava_onevision
        pinpoints = [[28, 28], [28, 56], [56, 28], [56, 56]]
        config = transformers.LlavaOnevisionConfig(
            text_config={**text, "model_type": "qwen2"},
            vision_config={
                "model_type": "siglip_vision_model",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "image_size": 28,
                "patch_size": 14,
            },
            image_token_index=ids["<image>"],
            video_token_index=ids["<video>"],
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
            image_grid_pinpoints=pinpoints,
            tie_word_embeddings=False,
        )
        image_processor = transformers.LlavaOnevisionImageProcessor(
            size={"height": 28, "width": 28}, image_grid_pinpoints=pinpoints
        )
        template = _LLAVA_OV_TEMPLATE
        processor_kwargs = {"num_image_tokens": 4, "vision_feature_select_strategy": "full"}
    model_class = getattr(transformers, FAMILIES[family].model_class)
    with torch.device(device):
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = model_class._from_config(config, dtype=getattr(torch, dtype), **extra).eval()
    processor = processor_class_for(FAMILIES[family])(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=template, **processor_kwargs
    )
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model, processor


def _drop_processor_entry(path: Path, key: str) -> None:
    if path.exists():
        config = json.loads(path.read_text())
        if config.pop(key, None) is not None:
            path.write_text(json.dumps(config, indent=2))
