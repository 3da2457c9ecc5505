"""Prompts of the two local vision-language backends (transformers and vLLM), built once.

Both backends turn a request into the same thing: the checkpoint's chat template rendered to text
(image parts where the images go), the images downscaled to the backend's pixel limit and, for
teacher forcing, the local tokenisation of that text with the indices of every assistant answer's
tokens (:mod:`visa.backends.chat_spans` finds the answer spans; never hard-coded token ids). The
engine then expands each image placeholder into image tokens; since all images precede the first
answer, :func:`visa.backends.architectures.align_tail` maps the answer indices onto what the engine
read and checks the tail token by token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from visa.backends.architectures import (
    answer_tokens,
    chat_messages,
    check_teacher_forced,
    first_user_index,
    fit_pixels,
)
from visa.backends.base import AnswerLogprobsRequest, GenerateRequest
from visa.backends.chat_spans import render_with_spans

#: ``render(messages, **kwargs) -> text``: the processor's ``apply_chat_template(..., tokenize=False)``.
Render = Callable[..., str]


@dataclass(frozen=True, slots=True)
class ChatPrompt:
    """One rendered request and, for teacher forcing, where its answers are.

    ``token_ids`` is the local tokenisation of ``prompt`` (image placeholders not expanded);
    ``answers`` holds, per assistant turn, the indices of its tokens in ``token_ids``.
    """

    prompt: str
    images: tuple[Image.Image, ...] = ()
    token_ids: tuple[int, ...] = ()
    answers: tuple[tuple[int, ...], ...] = field(default_factory=tuple)

    def engine_input(self) -> dict[str, Any]:
        """The prompt dict vLLM's ``LLM.generate`` takes (text plus ``multi_modal_data``)."""
        if self.images:
            return {"prompt": self.prompt, "multi_modal_data": {"image": list(self.images)}}
        return {"prompt": self.prompt}


def image_placeholders(processor: Any) -> tuple[str, ...]:
    """The processor's own image / video placeholder strings, to be removed from message text."""
    return tuple(
        t for t in (getattr(processor, "image_token", None), getattr(processor, "video_token", None)) if t
    )


def build_logprobs_prompt(
    request: AnswerLogprobsRequest,
    render: Render,
    tokenizer: Any,
    *,
    placeholders: Sequence[str] = (),
    max_image_pixels: int | None = None,
) -> ChatPrompt:
    """The prompt of a teacher-forced request and its answer token indices.

    The request's images attach to the first user turn; ``tokenizer`` is a fast tokenizer (offsets).
    """
    roles = [turn.role for turn in request.turns]
    check_teacher_forced(roles)
    image_turn = first_user_index(roles) if request.images else -1
    messages = chat_messages(
        [
            (t.role, t.text, len(request.images) if i == image_turn else 0)
            for i, t in enumerate(request.turns)
        ],
        placeholders,
    )
    rendered = render_with_spans(render, messages)
    token_ids, answers = answer_tokens(rendered.text, rendered.spans_of(roles), tokenizer)
    return ChatPrompt(
        prompt=rendered.text,
        images=tuple(fit_pixels(image, max_image_pixels) for image in request.images),
        token_ids=tuple(token_ids),
        answers=tuple(tuple(t) for t in answers),
    )


def build_generate_prompt(
    request: GenerateRequest,
    render: Render,
    *,
    placeholders: Sequence[str] = (),
    max_image_pixels: int | None = None,
) -> ChatPrompt:
    """The prompt of a generation request: the rendered chat followed by the generation prompt."""
    if not request.messages:
        raise ValueError("a generate request needs at least one message")
    if request.max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    messages = chat_messages([(m.role, m.text, len(m.images)) for m in request.messages], placeholders)
    return ChatPrompt(
        prompt=render(messages, add_generation_prompt=True),
        images=tuple(fit_pixels(image, max_image_pixels) for m in request.messages for image in m.images),
    )
