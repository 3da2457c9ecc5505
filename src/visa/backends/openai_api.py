"""Any OpenAI-compatible chat endpoint, e.g. ``vllm serve Qwen/Qwen2-VL-72B-Instruct-GPTQ-Int4``.

Standard library only (``urllib`` in a thread pool): no extra package to install.

**Generation** (DP judge): ``POST {base_url}/chat/completions`` with ``temperature: 0`` (greedy) and
``max_tokens``; the text is ``choices[0].message.content``. Images travel as
``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`` parts, before the text
part of their message.

**Answer log-probs** (PT, IM) use vLLM's prompt log-probs extension of chat completions (vLLM >= 0.6;
other servers that implement the same fields work too). Protocol:

1. Request: the whole conversation, answers included, with the images as parts of the first user
   message, and ``"prompt_logprobs": 0, "add_generation_prompt": false, "max_tokens": 1,
   "temperature": 0, "skip_special_tokens": false, "return_token_ids": true``. The server applies the
   model's own chat template (so no local tokenizer is needed).
2. Response: a top-level ``prompt_logprobs`` list with one entry per prompt token: ``null`` for the
   first, then ``{"<token id>": {"logprob": x, "decoded_token": s, ...}}``. With ``0`` requested, the
   only entry is the prompt token itself; when ``prompt_token_ids`` is returned too, the entry of
   that id is taken (so servers that add top-k entries also work).
3. Answers are located in the text obtained by concatenating the ``decoded_token`` strings (vLLM
   detokenises prompt tokens incrementally, so the concatenation is the prompt text). Each
   message's text is searched in order from the start (forward) and in reverse order from the end
   (backward); an answer's span must be the same both ways, otherwise the request fails as
   ambiguous (possible only for degenerate answers such as the word ``user``). The answer tokens
   are those overlapping the span, as in :mod:`visa.backends.chat_spans`.

Requests run concurrently (``concurrency`` threads). Connection errors, timeouts, HTTP 408, 409,
429 and 5xx are retried with exponential backoff (doubling from ``backoff_s``, capped at
``backoff_max_s``, at least the server's ``Retry-After``); other errors, and the last retryable one,
become that request's :class:`APIError` result with the HTTP status and the server's message.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import Field, field_validator

from visa.backends.architectures import check_teacher_forced, clean_text, first_user_index, fit_pixels
from visa.backends.base import (
    AnswerLogprobsRequest,
    AnswerLogprobsResult,
    Backend,
    GenerateRequest,
    GenerateResult,
)
from visa.backends.chat_spans import SpanError, token_indices
from visa.backends.registry import BackendParams

RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})


class APIError(RuntimeError):
    """A request the server refused or failed; ``status`` is the HTTP status (None: no response)."""

    def __init__(self, message: str, status: int | None = None, attempts: int = 1):
        self.status, self.attempts = status, attempts
        super().__init__(message)


class OpenAIBackend(Backend):
    """Client of an OpenAI-compatible server (see the module docstring for the protocol).

    Sees images (image content parts); holds no local GPU (the server does).
    """

    class Params(BackendParams):
        base_url: str = Field(description="e.g. http://localhost:8000/v1")
        model: str = Field(description="the served model name")
        #: Name of the environment variable holding the API key (the key never goes into a recipe).
        api_key_env: str | None = "OPENAI_API_KEY"
        concurrency: int = Field(8, ge=1)
        timeout_s: float = Field(300.0, gt=0)
        max_retries: int = Field(4, ge=0)
        backoff_s: float = Field(1.0, ge=0)
        backoff_max_s: float = Field(30.0, ge=0)
        image_format: Literal["png", "jpeg"] = "png"
        max_image_pixels: int | None = Field(4096 * 28 * 28, ge=28 * 28)
        #: Extra top-level fields for every request (e.g. ``{"mm_processor_kwargs": {...}}``).
        extra_body: dict[str, Any] = Field(default_factory=dict)
        #: Model revision to record in run.json (the server does not report it).
        revision: str | None = None

        @field_validator("base_url")
        @classmethod
        def _http(cls, value: str) -> str:
            if not value.startswith(("http://", "https://")):
                raise ValueError("base_url must start with http:// or https://")
            return value.rstrip("/")

    @classmethod
    def endpoints(cls, params: Params) -> list[tuple[str, str]]:
        return [(params.base_url, params.model)]

    def __init__(self, params: Params):
        self.params = params
        self._pool: ThreadPoolExecutor | None = None

    def setup(self) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=self.params.concurrency, thread_name_prefix="visa-openai"
            )

    def teardown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def models(self) -> dict[str, str]:
        return {f"{self.params.model} @ {self.params.base_url}": self.params.revision or "unpinned"}

    # -- HTTP -----------------------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.params.api_key_env) if self.params.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST JSON with retries; the parsed JSON response, or :class:`APIError`."""
        p = self.params
        url = f"{p.base_url}/{path.lstrip('/')}"
        data = json.dumps({**p.extra_body, **body}).encode()
        attempts = p.max_retries + 1
        for attempt in range(1, attempts + 1):
            retry_after = 0.0
            try:
                request = urllib.request.Request(url, data=data, headers=self._headers(), method="POST")
                with urllib.request.urlopen(request, timeout=p.timeout_s) as response:
                    payload = response.read()
                try:
                    return json.loads(payload)
                except ValueError:
                    raise APIError(f"invalid JSON from {url}: {payload[:200]!r}", response.status) from None
            except urllib.error.HTTPError as error:
                message = _server_message(error)
                failure = APIError(f"HTTP {error.code} from {url}: {message}", error.code, attempt)
                if error.code not in RETRY_STATUSES:
                    raise failure from None
                retry_after = _retry_after(error.headers.get("Retry-After"))
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                reason = getattr(error, "reason", error)
                kind = "timed out" if isinstance(reason, (socket.timeout, TimeoutError)) else "failed"
                failure = APIError(f"request to {url} {kind}: {reason}", None, attempt)
            if attempt == attempts:
                raise APIError(f"{failure} (after {attempts} attempts)", failure.status, attempt)
            delay = min(p.backoff_max_s, p.backoff_s * 2 ** (attempt - 1))
            time.sleep(max(delay * (1 + 0.1 * random.random()), retry_after))
        raise AssertionError("unreachable")

    def _map(self, function: Any, items: Sequence[Any]) -> list[Any]:
        def safe(item: Any) -> Any:
            try:
                return function(item)
            except Exception as error:  # noqa: BLE001 - one request's failure must not cost the others
                return error

        if self._pool is None:
            self.setup()
        assert self._pool is not None
        return list(self._pool.map(safe, items))

    # -- messages -------------------------------------------------------------------------------
    def _image_part(self, image: Image.Image) -> dict[str, Any]:
        image = fit_pixels(image, self.params.max_image_pixels)
        buffer = io.BytesIO()
        fmt = self.params.image_format
        image.save(
            buffer, format="PNG" if fmt == "png" else "JPEG", **({"quality": 95} if fmt == "jpeg" else {})
        )
        encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
        return {"type": "image_url", "image_url": {"url": f"data:image/{fmt};base64,{encoded}"}}

    def _message(self, role: str, text: str, images: Sequence[Image.Image]) -> dict[str, Any]:
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"unknown role '{role}'")
        text = clean_text(text)
        if not images:
            return {"role": role, "content": text}
        if role != "user":
            raise ValueError(f"images can only be attached to user messages, not to '{role}'")
        return {
            "role": role,
            "content": [*(self._image_part(i) for i in images), {"type": "text", "text": text}],
        }

    # -- requests -------------------------------------------------------------------------------
    def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult | Exception]:
        return self._map(self._generate_one, requests)

    def _generate_one(self, request: GenerateRequest) -> GenerateResult:
        if not request.messages:
            raise ValueError("a generate request needs at least one message")
        body = {
            "model": self.params.model,
            "messages": [self._message(m.role, m.text, m.images) for m in request.messages],
            "max_tokens": request.max_new_tokens,
            "temperature": 0,
        }
        response = self.post("chat/completions", body)
        try:
            content = response["choices"][0]["message"].get("content")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise APIError(f"unexpected chat completion response: {str(response)[:300]}") from None
        return GenerateResult(text=content or "")

    def answer_logprobs(
        self, requests: Sequence[AnswerLogprobsRequest]
    ) -> list[AnswerLogprobsResult | Exception]:
        return self._map(self._logprobs_one, requests)

    def _logprobs_one(self, request: AnswerLogprobsRequest) -> AnswerLogprobsResult:
        roles = [turn.role for turn in request.turns]
        check_teacher_forced(roles)
        image_turn = first_user_index(roles) if request.images else -1
        messages = [
            self._message(t.role, t.text, request.images if i == image_turn else ())
            for i, t in enumerate(request.turns)
        ]
        body = {
            "model": self.params.model,
            "messages": messages,
            "max_tokens": 1,
            "temperature": 0,
            "prompt_logprobs": 0,
            "add_generation_prompt": False,
            "skip_special_tokens": False,
            "return_token_ids": True,
        }
        response = self.post("chat/completions", body)
        token_texts, logprobs = parse_prompt_logprobs(response)
        contents = [clean_text(t.text) for t in request.turns]
        per_turn = []
        for tokens in locate_answers(token_texts, roles, contents):
            values = [logprobs[i] for i in tokens]
            if any(v is None for v in values):
                raise APIError("the server returned no log-prob for an answer token")
            per_turn.append(np.asarray(values, dtype=np.float32))
        return AnswerLogprobsResult(per_turn=tuple(per_turn))


# -- protocol helpers (pure) ------------------------------------------------------------------------


def parse_prompt_logprobs(response: dict[str, Any]) -> tuple[list[str], list[float | None]]:
    """Per prompt token: its text and its log-prob (None for the first token), from a response."""
    entries = response.get("prompt_logprobs")
    if entries is None:
        choices = response.get("choices") or [{}]
        entries = choices[0].get("prompt_logprobs") if isinstance(choices[0], dict) else None
    if not isinstance(entries, list) or not entries:
        raise APIError(
            "the server returned no prompt_logprobs: answer log-probs need a server with vLLM's "
            "prompt_logprobs extension of chat completions"
        )
    ids = response.get("prompt_token_ids")
    if ids is not None and len(ids) != len(entries):
        raise APIError(f"{len(entries)} prompt log-probs for {len(ids)} prompt tokens")
    texts: list[str] = []
    values: list[float | None] = []
    for j, entry in enumerate(entries):
        if entry is None:
            texts.append("")
            values.append(None)
            continue
        if not isinstance(entry, dict) or not entry:
            raise APIError(f"malformed prompt_logprobs entry at position {j}")
        if ids is not None:
            chosen = entry.get(str(ids[j]))
            if chosen is None:
                raise APIError(f"prompt_logprobs at position {j} lack the prompt token {ids[j]}")
        elif len(entry) == 1:
            chosen = next(iter(entry.values()))
        else:
            raise APIError(
                "prompt_logprobs entries hold several tokens and the server did not return prompt_token_ids"
            )
        if isinstance(chosen, dict):
            texts.append(chosen.get("decoded_token") or "")
            values.append(float(chosen["logprob"]))
        else:
            raise APIError(f"malformed prompt_logprobs entry at position {j}")
    return texts, values


def _candidates(text: str) -> list[str]:
    return [c for c in dict.fromkeys((text, text.strip(), text.lstrip(), text.rstrip())) if c]


def _walk(
    prompt: str, contents: Sequence[str], roles: Sequence[str], backward: bool
) -> dict[int, tuple[int, int]]:
    spans: dict[int, tuple[int, int]] = {}
    order = range(len(contents) - 1, -1, -1) if backward else range(len(contents))
    limit = len(prompt) if backward else 0
    for i in order:
        for candidate in _candidates(contents[i]):
            pos = prompt.rfind(candidate, 0, limit) if backward else prompt.find(candidate, limit)
            if pos >= 0:
                spans[i] = (pos, pos + len(candidate))
                limit = pos if backward else pos + len(candidate)
                break
        else:
            if roles[i] == "assistant" and contents[i].strip():
                raise SpanError(f"answer {i} not found in the server's prompt tokens")
    return spans


def locate_answers(
    token_texts: Sequence[str], roles: Sequence[str], contents: Sequence[str]
) -> list[list[int]]:
    """Per assistant message, the indices of its tokens among the prompt tokens (see module docstring)."""
    prompt = "".join(token_texts)
    offsets = []
    position = 0
    for text in token_texts:
        offsets.append((position, position + len(text)))
        position += len(text)
    forward = _walk(prompt, contents, roles, backward=False)
    backward = _walk(prompt, contents, roles, backward=True)
    result = []
    for i, role in enumerate(roles):
        if role != "assistant":
            continue
        if not contents[i].strip():
            result.append([])
            continue
        if forward[i] != backward[i]:
            raise SpanError(
                f"answer {i} ('{contents[i][:40]}') cannot be located unambiguously in the prompt"
            )
        [tokens] = token_indices(offsets, [forward[i]])
        if not tokens or tokens[0] == 0:
            raise SpanError(f"answer {i} has no scorable tokens")
        result.append(tokens)
    return result


def _server_message(error: urllib.error.HTTPError) -> str:
    try:
        raw = error.read()
    except OSError:
        raw = b""
    text = raw.decode("utf-8", "replace").strip()
    try:
        payload = json.loads(text)
    except ValueError:
        return text[:500] or str(error.reason)
    if isinstance(payload, dict):
        inner = payload.get("error", payload)
        if isinstance(inner, dict):
            message = inner.get("message") or inner.get("detail")
            if message:
                return str(message)[:500]
        elif isinstance(inner, str):
            return inner[:500]
        if "detail" in payload:
            return str(payload["detail"])[:500]
    return text[:500]


def _retry_after(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        return 0.0
