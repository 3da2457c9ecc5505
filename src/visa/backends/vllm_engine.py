"""Multimodal LLMs through vLLM's offline engine (``pip install 'visa[vllm]'``).

The same request semantics as :mod:`visa.backends.transformers_vlm`, at serving speed:

- **Generation** (DP judge): greedy (temperature 0), one ``SamplingParams`` per request. Automatic
  prefix caching is on by default, so the long DP prompt (system prompt + few-shot examples with
  their images) is computed once and reused by every image.
- **Answer log-probs** (PT, IM): ``prompt_logprobs=0`` returns, for every prompt token, the
  log-probability of that token given what precedes it; ``max_tokens=1`` (vLLM must generate
  something). vLLM computes prompt log-probs without prefix-cache hits, so PT/IM requests pay full
  prefill.

Prompts are built by pure functions (no vLLM needed; unit-tested): the checkpoint's chat template
renders the conversation with image placeholders, :mod:`visa.backends.chat_spans` finds the answer
spans, and the local tokenizer's offsets turn them into token indices. vLLM then expands each image
placeholder into many tokens; since every image sits before the first answer, the answers are in the
tail that vLLM leaves untouched. :func:`answer_logprobs_from_output` aligns that tail between our
tokenisation and vLLM's ``prompt_token_ids`` and checks it token by token, so a mismatch is an error
for that request, never a silently shifted score.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import Field

from visa.backends.architectures import (
    AlignmentError,
    Family,
    align_tail,
    load_processor,
    model_type_of,
    resolve_family,
)
from visa.backends.base import (
    AnswerLogprobsRequest,
    AnswerLogprobsResult,
    Backend,
    Capabilities,
    GenerateRequest,
    GenerateResult,
)
from visa.backends.batching import run_isolated
from visa.backends.prompts import (
    ChatPrompt,
    build_generate_prompt,
    build_logprobs_prompt,
    image_placeholders,
)
from visa.backends.registry import BackendParams
from visa.deps import MissingDependency

__all__ = ["AlignmentError", "VLLMBackend", "VLLMPrompt", "answer_logprobs_from_output",
           "build_generate_prompt", "build_logprobs_prompt"]

#: The engine's input: a rendered prompt with its images (see :mod:`visa.backends.prompts`).
VLLMPrompt = ChatPrompt


def _logprob_value(entry: Any) -> float:
    """A vLLM ``Logprob`` object, a ``{"logprob": x}`` dict, or a bare number."""
    if isinstance(entry, dict):
        entry = entry["logprob"]
    return float(getattr(entry, "logprob", entry))


def answer_logprobs_from_output(
    prompt: VLLMPrompt, prompt_token_ids: Sequence[int], prompt_logprobs: Sequence[Any]
) -> AnswerLogprobsResult:
    """Per-turn answer log-probs from vLLM's ``prompt_token_ids`` and ``prompt_logprobs``.

    ``prompt_logprobs[j]`` maps token ids to log-probs at prompt position ``j`` (None at 0); the
    entry of the actual prompt token is used. The answer tokens are located by aligning the tail of
    the prompt (from the first answer token on) between the local tokenisation and vLLM's.
    """
    theirs = list(prompt_token_ids)
    if len(prompt_logprobs) != len(theirs):
        raise AlignmentError(f"{len(prompt_logprobs)} prompt log-probs for {len(theirs)} prompt tokens")
    per_turn = []
    for turn in align_tail(prompt.token_ids, theirs, prompt.answers):
        values = []
        for j in turn:
            entry = prompt_logprobs[j]
            if entry is None or theirs[j] not in entry:
                raise AlignmentError(f"no log-prob for prompt token {j}")
            values.append(_logprob_value(entry[theirs[j]]))
        per_turn.append(np.asarray(values, dtype=np.float32))
    return AnswerLogprobsResult(per_turn=tuple(per_turn))


class VLLMBackend(Backend):
    """A multimodal chat model served in-process by vLLM (see the module docstring)."""

    class Params(BackendParams):
        model: str = Field(description="hub id or local directory of the checkpoint")
        revision: str | None = None
        family: str = "auto"
        dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
        #: e.g. ``awq``, ``gptq`` for the quantised 72B/78B reference models (None: from the checkpoint).
        quantization: str | None = None
        tensor_parallel_size: int = Field(1, ge=1)
        gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
        max_model_len: int | None = Field(None, ge=1)
        enable_prefix_caching: bool = True
        #: Most images one prompt may carry (the DP prompt has one per few-shot example + 1).
        max_images_per_prompt: int = Field(8, ge=1)
        #: Passed to the model's processor inside vLLM (e.g. ``{"max_pixels": 1003520}`` for Qwen2-VL).
        mm_processor_kwargs: dict[str, Any] = Field(default_factory=dict)
        max_image_pixels: int | None = Field(4096 * 28 * 28, ge=28 * 28)
        #: Requests per ``LLM.generate`` call (vLLM schedules within a call).
        chunk_size: int = Field(256, ge=1)
        seed: int = 0
        trust_remote_code: bool = False

    @classmethod
    def capabilities(cls, params: Params) -> Capabilities:
        """Sees images; one engine spans ``tensor_parallel_size`` GPUs."""
        return Capabilities(sees_images=True, gpus=float(params.tensor_parallel_size))

    @classmethod
    def hub_models(cls, params: Params) -> list[tuple[str, str | None]]:
        return [(params.model, params.revision)]

    def __init__(self, params: Params):
        self.params = params
        self.llm: Any = None
        self.processor: Any = None
        self.family: Family | None = None
        self._sampling: Any = None

    def setup(self) -> None:
        try:
            import vllm
        except ImportError as error:
            raise MissingDependency("vllm", "vllm", "the vllm backend") from error
        p = self.params
        self.family = resolve_family(
            p.family, model_type_of(p.model, revision=p.revision, trust_remote_code=p.trust_remote_code)
        )
        self.processor = load_processor(
            p.model, self.family, revision=p.revision, trust_remote_code=p.trust_remote_code
        )
        kwargs: dict[str, Any] = {
            "model": p.model,
            "revision": p.revision,
            "dtype": p.dtype,
            "tensor_parallel_size": p.tensor_parallel_size,
            "gpu_memory_utilization": p.gpu_memory_utilization,
            "enable_prefix_caching": p.enable_prefix_caching,
            "limit_mm_per_prompt": {"image": p.max_images_per_prompt},
            "seed": p.seed,
            "trust_remote_code": p.trust_remote_code,
        }
        if p.max_model_len:
            kwargs["max_model_len"] = p.max_model_len
        if p.quantization:
            kwargs["quantization"] = p.quantization
        if p.mm_processor_kwargs:
            kwargs["mm_processor_kwargs"] = dict(p.mm_processor_kwargs)
        self.llm = vllm.LLM(**kwargs)
        self._sampling = vllm.SamplingParams

    def teardown(self) -> None:
        self.llm = None

    def models(self) -> dict[str, str]:
        return {self.params.model: self.params.revision or "unpinned"}

    def _render(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, **kwargs)

    def _require_setup(self) -> None:
        if self.llm is None:
            raise RuntimeError("VLLMBackend.setup() must be called before use")

    def _run(
        self, prompts: list[VLLMPrompt | Exception], params: list[Any], read: Callable[[VLLMPrompt, Any], Any]
    ) -> list[Any]:
        results: list[Any] = list(prompts)
        ready = [i for i, prompt in enumerate(prompts) if isinstance(prompt, VLLMPrompt)]
        for start in range(0, len(ready), self.params.chunk_size):
            chunk = ready[start : start + self.params.chunk_size]

            def run_batch(indices: list[int]) -> list[Any]:
                outputs = self.llm.generate(
                    [prompts[i].engine_input() for i in indices],  # type: ignore[union-attr]
                    [params[i] for i in indices],
                    use_tqdm=False,
                )
                return [_read_safely(read, prompts[i], out) for i, out in zip(indices, outputs, strict=True)]

            for i, result in zip(chunk, run_isolated(chunk, run_batch), strict=True):
                results[i] = result
        return results

    def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult | Exception]:
        self._require_setup()
        placeholders = image_placeholders(self.processor)
        prompts: list[VLLMPrompt | Exception] = []
        params = []
        for request in requests:
            try:
                prompts.append(
                    build_generate_prompt(
                        request,
                        self._render,
                        placeholders=placeholders,
                        max_image_pixels=self.params.max_image_pixels,
                    )
                )
            except Exception as error:  # noqa: BLE001
                prompts.append(error)
            params.append(
                self._sampling(
                    temperature=0.0, max_tokens=max(1, request.max_new_tokens), seed=self.params.seed
                )
            )
        return self._run(prompts, params, lambda prompt, out: GenerateResult(text=out.outputs[0].text))

    def answer_logprobs(
        self, requests: Sequence[AnswerLogprobsRequest]
    ) -> list[AnswerLogprobsResult | Exception]:
        self._require_setup()
        placeholders = image_placeholders(self.processor)
        tokenizer = self.processor.tokenizer
        prompts: list[VLLMPrompt | Exception] = []
        for request in requests:
            try:
                prompts.append(
                    build_logprobs_prompt(
                        request,
                        self._render,
                        tokenizer,
                        placeholders=placeholders,
                        max_image_pixels=self.params.max_image_pixels,
                    )
                )
            except Exception as error:  # noqa: BLE001
                prompts.append(error)
        sampling = self._sampling(temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
        return self._run(
            prompts,
            [sampling] * len(prompts),
            lambda prompt, out: answer_logprobs_from_output(
                prompt, out.prompt_token_ids, out.prompt_logprobs
            ),
        )


def _read_safely(read: Callable[[VLLMPrompt, Any], Any], prompt: VLLMPrompt, output: Any) -> Any:
    try:
        return read(prompt, output)
    except Exception as error:  # noqa: BLE001 - a bad output fails its request only
        return error
