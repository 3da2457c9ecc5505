"""Random-weight model checkpoints for tests and benchmarks.

No model hub is reachable from the machines this project is developed and tested on, so tests
exercise the real backend code paths on tiny random models, and benchmarks measure speed on
full-size architectures at random initialisation (speed does not depend on the weights). This
module builds such checkpoints for every architecture of :mod:`visa.backends.architectures`, with a
small byte-level tokenizer and a chat template that has the structure of the architecture's real
template. Nothing in a scoring run imports it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from visa.backends.architectures import FAMILIES, UnsupportedModel, processor_class_for

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
