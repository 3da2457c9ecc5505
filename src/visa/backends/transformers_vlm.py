"""Multimodal LLMs through Hugging Face transformers: Qwen2-VL / Qwen2.5-VL, InternVL (-hf), LLaVA-OneVision.

Teacher-forced answer log-probabilities (PT, IM):

1. The conversation becomes chat-template messages; the request's images attach to the first user
   turn as image parts (none for the text-only pass). LLaVA ``<image>`` markers are removed from the
   text.
2. The checkpoint's own chat template renders it, and :mod:`visa.backends.chat_spans` finds the
   character span of every assistant answer (a second rendering with sentinels; never token ids).
   The tokenizer's offset mapping turns the spans into token indices: the tokens overlapping an
   answer span, not the role header, not ``<|im_end|>``.
3. The processor expands each image placeholder into the image's tokens. Every image precedes the
   first answer, so the answers sit in the tail of the sequence that the expansion leaves alone:
   :func:`visa.backends.architectures.align_tail` maps the indices there and checks the tail token by
   token (this works with any transformers version, whatever its processor returns).
4. One forward pass per batch (right padding by default, so every row keeps the positions it has
   alone; Qwen2-VL's multimodal rotary positions are computed from the attention mask either way).
   Hidden states are gathered at the positions that predict answer tokens *before* the LM head, so
   a 150K-word vocabulary is projected only where it is needed, and log-softmax runs in float32.

Generation (the DP judge) is greedy, batched with left padding. Requests are grouped by whether
they carry images and sorted by length before batching; results come back in request order. A
batch that fails is split in halves until the failing request is isolated: only that request gets an
``Exception`` result.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import Field

from visa.backends.architectures import (
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
from visa.backends.prompts import ChatPrompt, build_generate_prompt, build_logprobs_prompt, image_placeholders
from visa.backends.registry import BackendParams
from visa.deps import MissingDependency

#: Rows of hidden states projected through the LM head at once (bounds the float32 logits buffer).
_HEAD_CHUNK = 1024


class RequestTooLong(ValueError):
    pass


@dataclass(slots=True)
class _Prepared:
    """One request, rendered: template text, images, and (teacher forcing) its tokens and answers."""

    index: int
    text: str
    images: list[Image.Image]
    token_ids: list[int] | None = None
    answers: list[list[int]] | None = None
    max_new_tokens: int = 0

    @classmethod
    def of(cls, index: int, prompt: ChatPrompt, max_new_tokens: int = 0) -> _Prepared:
        teacher_forced = bool(prompt.token_ids)  # generation prompts are not tokenised here
        return cls(
            index,
            prompt.prompt,
            list(prompt.images),
            token_ids=list(prompt.token_ids) if teacher_forced else None,
            answers=[list(a) for a in prompt.answers] if teacher_forced else None,
            max_new_tokens=max_new_tokens,
        )


class TransformersVLMBackend(Backend):
    """A multimodal chat model loaded with transformers (see the module docstring)."""

    class Params(BackendParams):
        model: str = Field(description="hub id or local directory of the checkpoint")
        revision: str | None = None
        #: ``auto``: from the checkpoint's ``model_type``; else one of :data:`visa.backends.architectures.FAMILIES`.
        family: str = "auto"
        #: ``auto``: bfloat16 on CUDA, float32 on CPU.
        dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
        #: ``auto``: CUDA when available. Ignored when ``device_map`` is set.
        device: str = "auto"
        #: e.g. ``auto`` to shard a large model over all visible GPUs (needs accelerate).
        device_map: str | None = None
        #: Requests per forward pass.
        batch_size: int = Field(8, ge=1)
        #: Images are downscaled (aspect ratio kept) to at most this many pixels before the processor
        #: sees them. The default is the reference's upper bound (4096 * 28 * 28); None keeps the size.
        max_image_pixels: int | None = Field(4096 * 28 * 28, ge=28 * 28)
        attn_implementation: str | None = None
        #: Padding for teacher forcing; generation always pads on the left.
        padding_side: Literal["right", "left"] = "right"
        #: Requests longer than this many tokens fail (None: no limit).
        max_length: int | None = Field(None, ge=1)
        trust_remote_code: bool = False

    @classmethod
    def capabilities(cls, params: Params) -> Capabilities:
        """Sees images; one GPU per engine unless it is told to run on the CPU."""
        return Capabilities(sees_images=True, gpus=0.0 if params.device.startswith("cpu") else 1.0)

    @classmethod
    def hub_models(cls, params: Params) -> list[tuple[str, str | None]]:
        return [(params.model, params.revision)]

    def __init__(self, params: Params):
        self.params = params
        self.model: Any = None
        self.processor: Any = None
        self.family: Family | None = None
        self._commit: str | None = None

    @classmethod
    def from_loaded(cls, model: Any, processor: Any, /, **params: Any) -> TransformersVLMBackend:
        """A ready backend around an already loaded model and processor (benchmarks, tests).

        ``params`` are :class:`Params` fields; ``model`` defaults to the model's class name.
        """
        backend = cls(cls.Params(**{"model": type(model).__name__, **params}))
        backend.model, backend.processor = model.eval(), processor
        backend.family = resolve_family(backend.params.family, model.config.model_type)
        return backend

    # -- lifecycle ------------------------------------------------------------------------------
    def setup(self) -> None:
        try:
            import torch
            import transformers
        except ImportError as error:
            raise MissingDependency(
                error.name or "transformers", "transformers", "the transformers backend"
            ) from error
        p = self.params
        self.family = resolve_family(
            p.family, model_type_of(p.model, revision=p.revision, trust_remote_code=p.trust_remote_code)
        )
        self.processor = load_processor(
            p.model, self.family, revision=p.revision, trust_remote_code=p.trust_remote_code
        )
        device = p.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if p.dtype == "auto":
            dtype = torch.bfloat16 if device.startswith("cuda") or p.device_map else torch.float32
        else:
            dtype = getattr(torch, p.dtype)
        kwargs: dict[str, Any] = {"dtype": dtype, "revision": p.revision}
        if p.attn_implementation:
            kwargs["attn_implementation"] = p.attn_implementation
        if p.device_map:
            kwargs["device_map"] = p.device_map
        if p.trust_remote_code:
            kwargs["trust_remote_code"] = True
        model_class = getattr(transformers, self.family.model_class)
        model = model_class.from_pretrained(p.model, **kwargs)
        if not p.device_map:
            model = model.to(device)
        model.eval().requires_grad_(False)
        self.model = model
        self._commit = getattr(model.config, "_commit_hash", None)
        tokenizer = self.processor.tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    def teardown(self) -> None:
        self.model = self.processor = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

    def models(self) -> dict[str, str]:
        return {self.params.model: self._commit or self.params.revision or "unpinned"}

    def _require_setup(self) -> None:
        if self.model is None:
            raise RuntimeError("TransformersVLMBackend.setup() must be called before use")

    # -- rendering ------------------------------------------------------------------------------
    def _render(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, **kwargs)

    def _prepare_logprobs(self, index: int, request: AnswerLogprobsRequest) -> _Prepared:
        prompt = build_logprobs_prompt(
            request,
            self._render,
            self.processor.tokenizer,
            placeholders=image_placeholders(self.processor),
            max_image_pixels=self.params.max_image_pixels,
        )
        return _Prepared.of(index, prompt)

    def _prepare_generate(self, index: int, request: GenerateRequest) -> _Prepared:
        prompt = build_generate_prompt(
            request,
            self._render,
            placeholders=image_placeholders(self.processor),
            max_image_pixels=self.params.max_image_pixels,
        )
        return _Prepared.of(index, prompt, max_new_tokens=request.max_new_tokens)

    def _encode(self, batch: Sequence[_Prepared], padding_side: str) -> Any:
        images = [item.images for item in batch] if batch[0].images else None
        encoding = self.processor(
            text=[item.text for item in batch],
            images=images,
            return_tensors="pt",
            padding=True,
            padding_side=padding_side,
            add_special_tokens=False,
        )
        if self.params.max_length is not None and encoding["input_ids"].shape[1] > self.params.max_length:
            lengths = encoding["attention_mask"].sum(dim=1).tolist()
            too_long = [n for n in lengths if n > self.params.max_length]
            if too_long:
                raise RequestTooLong(
                    f"{max(too_long)} tokens is more than max_length={self.params.max_length}"
                )
        return encoding

    def _to_model(self, encoding: Any) -> dict[str, Any]:
        import torch

        device = self.model.device
        dtype = self.model.dtype
        inputs = {}
        for key, value in encoding.items():
            if isinstance(value, torch.Tensor):
                value = value.to(device, dtype=dtype if value.is_floating_point() else None)
            inputs[key] = value
        return inputs

    # -- batching -------------------------------------------------------------------------------
    def _run(
        self,
        prepared: list[_Prepared | Exception],
        run_batch: Callable[[list[_Prepared]], list[Any]],
    ) -> list[Any]:
        results: list[Any] = [item if isinstance(item, Exception) else None for item in prepared]
        ready = [item for item in prepared if isinstance(item, _Prepared)]
        # Same-shape inputs batch together: with images or without, then by length.
        ready.sort(key=lambda item: (bool(item.images), len(item.text)))
        groups: dict[bool, list[_Prepared]] = {}
        for item in ready:
            groups.setdefault(bool(item.images), []).append(item)
        size = self.params.batch_size
        for group in groups.values():
            for start in range(0, len(group), size):
                chunk = group[start : start + size]
                for item, result in zip(chunk, run_isolated(chunk, run_batch), strict=True):
                    results[item.index] = result
        return results

    # -- requests -------------------------------------------------------------------------------
    def answer_logprobs(
        self, requests: Sequence[AnswerLogprobsRequest]
    ) -> list[AnswerLogprobsResult | Exception]:
        self._require_setup()
        prepared: list[_Prepared | Exception] = []
        for i, request in enumerate(requests):
            try:
                prepared.append(self._prepare_logprobs(i, request))
            except Exception as error:  # noqa: BLE001
                prepared.append(error)
        return self._run(prepared, self._logprobs_batch)

    def _logprobs_batch(self, batch: list[_Prepared]) -> list[AnswerLogprobsResult]:
        import torch

        encoding = self._encode(batch, self.params.padding_side)
        encoding.pop("text_replacement_offsets", None)
        input_ids = encoding["input_ids"]
        attention = encoding["attention_mask"].bool()
        rows: list[int] = []
        positions: list[int] = []
        turn_sizes: list[list[int]] = []
        for b, item in enumerate(batch):
            assert item.token_ids is not None and item.answers is not None
            real = attention[b].nonzero()[:, 0].tolist()  # the row's token positions, padding excluded
            theirs = input_ids[b, real].tolist()
            sizes = []
            for tokens in align_tail(item.token_ids, theirs, item.answers):
                rows.extend([b] * len(tokens))
                positions.extend(real[t] for t in tokens)
                sizes.append(len(tokens))
            turn_sizes.append(sizes)
        with torch.inference_mode():
            hidden = self.model.model(**self._to_model(encoding)).last_hidden_state
            row_index = torch.tensor(rows, dtype=torch.long, device=hidden.device)
            position_index = torch.tensor(positions, dtype=torch.long, device=hidden.device)
            # The logits at position t - 1 predict token t.
            selected = hidden[row_index, position_index - 1]
            targets = input_ids.to(hidden.device)[row_index, position_index]
            values = [
                self._token_logprobs(selected[s : s + _HEAD_CHUNK], targets[s : s + _HEAD_CHUNK])
                for s in range(0, len(rows), _HEAD_CHUNK)
            ]
        flat = np.concatenate(values) if values else np.zeros(0, dtype=np.float32)
        results = []
        cursor = 0
        for sizes in turn_sizes:
            per_turn = []
            for n in sizes:
                per_turn.append(flat[cursor : cursor + n].copy())
                cursor += n
            results.append(AnswerLogprobsResult(per_turn=tuple(per_turn)))
        return results

    def _token_logprobs(self, hidden: Any, targets: Any) -> np.ndarray:
        import torch

        logits = self.model.get_output_embeddings()(hidden).float()
        cap = getattr(self.model.config.get_text_config(), "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        logprobs = torch.log_softmax(logits, dim=-1)
        return logprobs.gather(1, targets[:, None])[:, 0].cpu().numpy().astype(np.float32)

    def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult | Exception]:
        self._require_setup()
        prepared: list[_Prepared | Exception] = []
        for i, request in enumerate(requests):
            try:
                prepared.append(self._prepare_generate(i, request))
            except Exception as error:  # noqa: BLE001
                prepared.append(error)
        return self._run(prepared, self._generate_batch)

    def _generate_batch(self, batch: list[_Prepared]) -> list[GenerateResult]:
        import torch

        encoding = self._encode(batch, "left")
        encoding.pop("text_replacement_offsets", None)
        tokenizer = self.processor.tokenizer
        stop = _stop_ids(self.model.generation_config.eos_token_id, tokenizer.eos_token_id)
        with torch.inference_mode():
            output = self.model.generate(
                **self._to_model(encoding),
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                max_new_tokens=max(item.max_new_tokens for item in batch),
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stop or None,
            )
        new_tokens = output[:, encoding["input_ids"].shape[1] :].tolist()
        results = []
        for item, tokens in zip(batch, new_tokens, strict=True):
            tokens = tokens[: item.max_new_tokens]
            for k, token in enumerate(tokens):
                if token in stop:
                    tokens = tokens[:k]
                    break
            results.append(GenerateResult(text=tokenizer.decode(tokens, skip_special_tokens=True)))
        return results


def _stop_ids(*values: Any) -> list[int]:
    ids: list[int] = []
    for value in values:
        if value is None:
            continue
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if int(token) not in ids:
                ids.append(int(token))
    return ids
