"""Where each message of a chat-templated conversation sits, in characters and in tokens.

Teacher-forced scoring (PT and IM) needs the log-probabilities of the assistant answer tokens only:
not the prompt, not the role headers, not the template's end-of-turn tokens. Hard-coding token ids
of one template breaks on the next model, so this module works from characters:

1. :func:`render_with_spans` renders the conversation with the model's chat template (any callable
   ``messages -> str``, typically ``tokenizer.apply_chat_template(..., tokenize=False)``) and returns
   the character span of every message's content in the rendered text. It renders a second time
   with a unique sentinel in place of each content; the text between sentinels is the template's own
   text (the *skeleton*), so the real rendering must read ``skeleton0 content0 skeleton1 content1 ...``.
   That walk is exact: an answer such as ``"assistant"`` cannot be confused with the role header.
   Templates that ``trim`` contents are handled (a stripped content is accepted); a template that
   drops a message (e.g. ignores the system prompt) yields ``None`` for that message.
2. :func:`token_indices` maps character spans to token indices using a tokenizer's offset mapping
   (``return_offsets_mapping=True``): a token belongs to a span when its non-empty character range
   overlaps it. Special tokens that the template writes as text (``<|im_end|>``) lie outside every
   content span, so they are excluded; a token that straddles a span boundary (a leading space
   merged into the first word) is included.
3. :func:`expand_placeholders` is for multimodal processors that replace an image placeholder in the
   rendered text by many image tokens before tokenising: it does that replacement and shifts the
   spans accordingly, so steps 1-2 still apply to the expanded text.

Nothing here imports a model library; it works with any tokenizer that gives offsets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

Span = tuple[int, int]


class SpanError(ValueError):
    """The rendered conversation does not contain the messages where the template says they are."""


@dataclass(frozen=True, slots=True)
class RenderedConversation:
    """The rendered text and, per input message, the character span of its content (None: not rendered)."""

    text: str
    spans: tuple[Span | None, ...]

    def spans_of(self, roles: Sequence[str], role: str = "assistant") -> list[Span]:
        """The spans of the messages with ``role`` (``roles`` are the messages' roles, in order)."""
        found = []
        for message_role, span in zip(roles, self.spans, strict=True):
            if message_role != role:
                continue
            if span is None:
                raise SpanError(f"the chat template did not render a '{role}' message")
            found.append(span)
        return found


def _sentinel(i: int) -> str:
    return f"\u27e6visa-message-{i}\u27e7"


def _text_of(content: Any) -> str:
    """Text of a message content: a string, or a list of parts where text parts carry ``text``."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"]
        if len(texts) > 1:
            raise SpanError("a message with more than one text part is not supported")
        return texts[0] if texts else ""
    raise SpanError(f"message content must be a string or a list of parts, not {type(content).__name__}")


def _with_text(content: Any, text: str) -> Any:
    if isinstance(content, str):
        return text
    return [dict(part, text=text) if part.get("type") == "text" else part for part in content]


def render_with_spans(render: Callable[[list[dict[str, Any]]], str], messages: Sequence[dict[str, Any]]) -> RenderedConversation:
    """Render ``messages`` with ``render`` and locate each message's content in the result.

    ``messages`` are chat-template dicts (``{"role": ..., "content": str | list of parts}``); with a
    list of parts, the single ``{"type": "text"}`` part is the located content.
    """
    messages = list(messages)
    texts = [_text_of(message.get("content")) for message in messages]
    for i, text in enumerate(texts):
        if "\u27e6visa-message-" in text:
            raise SpanError(f"message {i} contains the reserved marker text")
    rendered = render(messages)
    skeleton_source = render(
        [dict(message, content=_with_text(message["content"], _sentinel(i))) for i, message in enumerate(messages)]
    )
    # The skeleton: template text between the sentinels, in the order the sentinels appear.
    order: list[int] = []
    pieces: list[str] = []
    cursor = 0
    positions = sorted(
        (skeleton_source.find(_sentinel(i)), i) for i in range(len(messages)) if _sentinel(i) in skeleton_source
    )
    for position, i in positions:
        if skeleton_source.count(_sentinel(i)) != 1:
            raise SpanError(f"the chat template renders message {i} more than once")
        pieces.append(skeleton_source[cursor:position])
        order.append(i)
        cursor = position + len(_sentinel(i))
    tail = skeleton_source[cursor:]

    spans: list[Span | None] = [None] * len(messages)
    pos = 0
    for n, i in enumerate(order):
        if not rendered.startswith(pieces[n], pos):
            raise SpanError(f"template text before message {i} differs between renderings")
        pos += len(pieces[n])
        following = pieces[n + 1] if n + 1 < len(order) else tail
        for candidate in dict.fromkeys((texts[i], texts[i].strip(), texts[i].lstrip(), texts[i].rstrip())):
            end = pos + len(candidate)
            if rendered.startswith(candidate, pos) and rendered.startswith(following, end):
                start = pos
                spans[i] = (start, end)
                pos = end
                break
        else:
            raise SpanError(f"content of message {i} not found where the chat template puts it")
    if rendered[pos:] != tail:
        raise SpanError("template text after the last message differs between renderings")
    return RenderedConversation(rendered, tuple(spans))


def token_indices(offsets: Sequence[tuple[int, int]], spans: Sequence[Span]) -> list[list[int]]:
    """Per span, the indices of the tokens whose non-empty character range overlaps it."""
    result: list[list[int]] = []
    for start, end in spans:
        result.append([t for t, (a, b) in enumerate(offsets) if b > a and a < end and b > start])
    return result


def expand_placeholders(
    text: str, spans: Sequence[Span | None], placeholder: str, replacements: Sequence[str]
) -> tuple[str, list[Span | None]]:
    """Replace the i-th ``placeholder`` in ``text`` by ``replacements[i]`` and shift ``spans`` to match.

    A placeholder inside a span is an error (images belong to the template or to user text, which is
    never scored).
    """
    pieces: list[str] = []
    shifts: list[tuple[int, int]] = []  # (position in the old text, length change)
    cursor = 0
    for replacement in replacements:
        at = text.find(placeholder, cursor)
        if at < 0:
            raise SpanError(f"fewer '{placeholder}' placeholders than replacements")
        for span in spans:
            if span is not None and span[0] < at + len(placeholder) and at < span[1]:
                raise SpanError(f"placeholder '{placeholder}' inside a scored span")
        pieces.append(text[cursor:at])
        pieces.append(replacement)
        shifts.append((at, len(replacement) - len(placeholder)))
        cursor = at + len(placeholder)
    pieces.append(text[cursor:])

    def shift(position: int) -> int:
        return position + sum(delta for at, delta in shifts if at < position)

    return "".join(pieces), [None if s is None else (shift(s[0]), shift(s[1])) for s in spans]


def answer_token_positions(
    tokenizer: Any, messages: Sequence[dict[str, Any]], *, add_special_tokens: bool = False, **template_kwargs: Any
) -> tuple[list[int], list[list[int]]]:
    """Token ids of the templated conversation and, per assistant message, its answer token indices.

    ``tokenizer`` is a Hugging Face (fast) tokenizer with a chat template; the template is expected to
    write any BOS itself, hence ``add_special_tokens=False``.
    """

    def render(msgs: list[dict[str, Any]]) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, **template_kwargs)

    rendered = render_with_spans(render, messages)
    encoding = tokenizer(rendered.text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    spans = rendered.spans_of([m["role"] for m in messages])
    positions = token_indices(encoding["offset_mapping"], spans)
    for k, indices in enumerate(positions):
        if not indices:
            raise SpanError(f"assistant answer {k} has no tokens")
    return list(encoding["input_ids"]), positions
