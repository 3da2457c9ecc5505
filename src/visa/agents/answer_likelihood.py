"""PT and IM: how predictable the answers are, with and without the image, under a language model.

Both agents teacher-force the whole conversation (every turn; LLaVA ``<image>`` placeholders
stripped) through any :class:`~visa.backends.base.Backend` and read the log-probabilities of the
assistant answer tokens only.

* **PT** (prior token perplexity) = -(mean log-prob of the first ``k`` tokens of every answer turn,
  image given), pooled over the turns. High PT = the answers start in an unexpected way (garbled or
  unusual text).
* **IM** (image-text mutual information) = CE(answers | text only) - CE(answers | image and text),
  with CE the mean NLL per answer token over all turns. IM > 0: the image makes the answers more
  predictable; IM <= 0: the answers do not need the image, or do not match it.

How the image is given (``image_input``):

* ``pixels``: the sample's images go with the first user turn (a vision-language backend);
* ``verbalized``: a text-only backend reads the verbalised image (:mod:`visa.agents.verbalize`),
  placed before the first question by ``template``. The agent then reads the visual agents'
  outputs through ``needs`` and never decodes pixels;
* ``auto`` (default): ``verbalized`` for a text-only backend (``embedded_lm``), ``pixels`` for one
  that sees images.

With a verbalised image, "IM" measures how much the *description* helps: a 135M LM over a
few classifier labels is a weak reader (see BENCHMARKS.md), which is why the embedded recipe adds
other IM agents. Samples without an image (text-only) get a null IM and a PT without image; a
sample whose evidence is empty gets null scores (the upstream agents' errors are reported there).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from visa.agents.base import Agent, AgentParams, Resources, Result, SampleItem, Unit
from visa.agents.verbalize import (
    EvidenceColumns,
    VerbalizeOptions,
    gather,
    strip_image_placeholders,
    verbalize,
)
from visa.backends import shared as shared_engines
from visa.backends.base import AnswerLogprobsRequest, AnswerLogprobsResult, Backend
from visa.backends.registry import BackendSpec
from visa.samples import Turn

ImageInput = Literal["auto", "pixels", "verbalized"]


class LikelihoodParams(AgentParams):
    #: Samples per backend call: the backend shares prefixes (system prompt, one image's description)
    #: and batches forwards within a call only, so a call should hold a whole chunk of samples.
    batch_size: int = 64
    backend: BackendSpec = Field(default_factory=lambda: BackendSpec(type="embedded_lm"))
    image_input: ImageInput = "auto"
    evidence: EvidenceColumns = Field(default_factory=EvidenceColumns)
    verbalization: VerbalizeOptions = Field(default_factory=VerbalizeOptions)
    template: str = Field(
        "{evidence}\n\n{question}",
        description="first user turn with a verbalised image; must contain {evidence} and {question}",
    )

    @field_validator("template")
    @classmethod
    def _placeholders(cls, template: str) -> str:
        if "{evidence}" not in template or "{question}" not in template:
            raise ValueError("template must contain {evidence} and {question}")
        return template


class _LikelihoodAgent(Agent):
    """Shared request building for PT and IM."""

    unit = Unit.SAMPLE
    Params: ClassVar[type[AgentParams]] = LikelihoodParams
    params: LikelihoodParams

    def __init__(self, params: LikelihoodParams | None = None, *, backend: Backend | None = None):
        super().__init__(params)
        self.verbalized = self.params.image_input == "verbalized" or (
            self.params.image_input == "auto" and not self.params.backend.capabilities().sees_images
        )
        # Instance attributes: what the agent reads depends on its parameters.
        self.needs = self.params.evidence.columns() if self.verbalized else ()
        self.uses_images = not self.verbalized
        self._backend = backend
        self._owns_backend = backend is None

    def setup(self) -> None:
        if self._backend is None:
            self._backend = shared_engines.acquire(self.params.backend)  # set up once per process
        elif not self._owns_backend:
            self._backend.setup()

    def teardown(self) -> None:
        if self._backend is not None and self._owns_backend:
            shared_engines.release(self._backend)
            self._backend = None

    def models(self) -> dict[str, str]:
        return self._backend.models() if self._backend is not None else {}

    def resources(self) -> Resources:
        return Resources(cpus=1.0, gpus=self.params.backend.capabilities().gpus)

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not been called")
        return self._backend

    # -- requests -----------------------------------------------------------------------------
    @staticmethod
    def text_turns(item: SampleItem) -> tuple[Turn, ...]:
        turns = tuple(Turn(t.role, strip_image_placeholders(t.text)) for t in item.turns)
        if not any(t.role == "assistant" for t in turns):
            raise ValueError("the sample has no assistant answer")
        if not any(t.role == "user" for t in turns):
            raise ValueError("the sample has no user turn")
        return turns

    def image_request(self, item: SampleItem, turns: tuple[Turn, ...]) -> AnswerLogprobsRequest | None:
        """The request with the image (None: no image, or no evidence about it)."""
        if not item.images and not item.image_keys:
            return None
        if not self.verbalized:
            if not item.images:
                raise ValueError("the sample's images were not decoded")
            return AnswerLogprobsRequest(turns, tuple(item.images))
        description = verbalize(gather(item.context, self.params.evidence), self.params.verbalization)
        if not description:
            return None
        first = next(i for i, t in enumerate(turns) if t.role == "user")
        text = self.params.template.format(evidence=description, question=turns[first].text)
        return AnswerLogprobsRequest(turns[:first] + (Turn("user", text),) + turns[first + 1 :])


def _concat(result: AnswerLogprobsResult) -> np.ndarray:
    arrays = [np.asarray(a, dtype=np.float64) for a in result.per_turn]
    return np.concatenate(arrays) if arrays else np.zeros(0)


def _check(result: Any) -> AnswerLogprobsResult:
    if isinstance(result, Exception):
        raise result
    if not result.per_turn or any(len(a) == 0 for a in result.per_turn):
        raise ValueError("the backend returned an empty answer")
    values = _concat(result)
    if not np.all(np.isfinite(values)):
        raise ValueError("the backend returned non-finite log-probabilities")
    return result


class PriorTokenPerplexityAgent(_LikelihoodAgent):
    """PT = -(mean log-prob of the first ``k`` answer tokens of every turn, image given).

    Outputs: ``score`` (nats per token), ``tokens`` (how many tokens were averaged). Text-only
    samples are scored without an image.
    """

    class Params(LikelihoodParams):
        k: int = Field(10, ge=1, description="answer tokens per turn")

    params: Params
    outputs = {"score": pa.float64(), "tokens": pa.int32()}

    def score_batch(self, items: Sequence[SampleItem]) -> list[Result]:
        results: list[Result | None] = [None] * len(items)
        requests: list[AnswerLogprobsRequest] = []
        slots: list[int] = []
        for i, item in enumerate(items):
            try:
                turns = self.text_turns(item)
                request = self.image_request(item, turns)
                if request is None:
                    if item.images or item.image_keys:  # an image without evidence: no score
                        results[i] = {"score": None, "tokens": None}
                        continue
                    request = AnswerLogprobsRequest(turns)
            except Exception as err:  # noqa: BLE001 - reported per item
                results[i] = err
                continue
            requests.append(request)
            slots.append(i)
        answers = self.backend.answer_logprobs(requests) if requests else []
        for i, answer in zip(slots, answers, strict=True):
            try:
                first = np.concatenate([np.asarray(a[: self.params.k]) for a in _check(answer).per_turn])
                results[i] = {"score": float(-first.mean()), "tokens": int(first.size)}
            except Exception as err:  # noqa: BLE001 - reported per item
                results[i] = err
        return results  # type: ignore[return-value]


class MutualInformationAgent(_LikelihoodAgent):
    """IM = CE(answers | text only) - CE(answers | image + text), in nats per answer token.

    Outputs: ``score``, ``ce_image``, ``ce_text``, ``tokens`` (answer tokens). Both requests of all
    samples go to the backend in one call so that it can batch and share prefixes. Text-only samples
    and images without evidence get null values (no error: nothing is wrong with the sample).
    """

    params: LikelihoodParams
    outputs = {"score": pa.float64(), "ce_image": pa.float64(), "ce_text": pa.float64(), "tokens": pa.int32()}

    def score_batch(self, items: Sequence[SampleItem]) -> list[Result]:
        results: list[Result | None] = [None] * len(items)
        with_image: list[AnswerLogprobsRequest] = []
        without: list[AnswerLogprobsRequest] = []
        slots: list[int] = []
        empty = {"score": None, "ce_image": None, "ce_text": None, "tokens": None}
        for i, item in enumerate(items):
            try:
                turns = self.text_turns(item)
                request = self.image_request(item, turns)
            except Exception as err:  # noqa: BLE001 - reported per item
                results[i] = err
                continue
            if request is None:
                results[i] = dict(empty)
                continue
            with_image.append(request)
            without.append(AnswerLogprobsRequest(turns))
            slots.append(i)
        answers = self.backend.answer_logprobs(with_image + without) if slots else []
        n = len(slots)
        for j, i in enumerate(slots):
            try:
                image_lp = _concat(_check(answers[j]))
                text_lp = _concat(_check(answers[n + j]))
                ce_image, ce_text = float(-image_lp.mean()), float(-text_lp.mean())
                results[i] = {
                    "score": ce_text - ce_image,
                    "ce_image": ce_image,
                    "ce_text": ce_text,
                    "tokens": int(image_lp.size),
                }
            except Exception as err:  # noqa: BLE001 - reported per item
                results[i] = err
        return results  # type: ignore[return-value]


class EvidenceLikelihoodAgent(_LikelihoodAgent):
    """IM read the other way round: does the conversation make the image's labels predictable?

    For a text-only LM the verbalised image is a handful of classifier labels, and predicting a long
    answer from them (:class:`MutualInformationAgent`) is dominated by the answer's own fluency. This
    agent scores the short label list instead, as the answer to ``question``, once after the
    conversation and once without it::

        score = mean log p(labels | conversation, question) - mean log p(labels | question)

    (pointwise mutual information per label token, in nats). > 0: the conversation talks about what
    the visual agents saw; <= 0: it does not (text-only or misaligned). The no-conversation pass
    depends only on the image, so it is computed once per image (the backend's memo). Always reads
    the verbalised evidence, whatever the backend. Outputs: ``score``, ``tokens`` (label tokens).
    """

    class Params(LikelihoodParams):
        image_input: ImageInput = "verbalized"
        verbalization: VerbalizeOptions = Field(default_factory=lambda: VerbalizeOptions(top_k=5, min_prob=0.02))
        preamble: str = "Here is a conversation about an image:"
        question: str = "Name the main things shown in the image."
        max_conversation_chars: int = Field(3000, ge=100, description="longer conversations are cut")

        @field_validator("image_input")
        @classmethod
        def _verbalized(cls, value: str) -> str:
            if value == "pixels":
                raise ValueError("this agent scores the verbalised evidence; image_input cannot be 'pixels'")
            return value

    params: Params
    outputs = {"score": pa.float64(), "tokens": pa.int32()}

    def __init__(self, params: Params | None = None, *, backend: Backend | None = None):
        super().__init__(params, backend=backend)
        self.verbalized = True
        self.needs = self.params.evidence.columns()
        self.uses_images = False

    def label_answer(self, item: SampleItem) -> str:
        from visa.agents.verbalize import classifier_items

        evidence = gather(item.context, self.params.evidence)
        labels = [label for label, _ in classifier_items(evidence, self.params.verbalization)]
        labels += [label for label in evidence.label_counts() if label not in labels and label != "face"]
        return ", ".join(labels) + "." if labels else ""

    def conversation(self, turns: tuple[Turn, ...]) -> str:
        lines = [("Q: " if t.role == "user" else "A: ") + t.text for t in turns if t.role in ("user", "assistant")]
        text = "\n".join(lines)
        return text[: self.params.max_conversation_chars]

    def score_batch(self, items: Sequence[SampleItem]) -> list[Result]:
        results: list[Result | None] = [None] * len(items)
        conditional: list[AnswerLogprobsRequest] = []
        baseline: list[AnswerLogprobsRequest] = []
        slots: list[int] = []
        for i, item in enumerate(items):
            try:
                turns = self.text_turns(item)
            except Exception as err:  # noqa: BLE001 - reported per item
                results[i] = err
                continue
            answer = self.label_answer(item) if (item.image_keys or item.images) else ""
            if not answer:
                results[i] = {"score": None, "tokens": None}
                continue
            prompt = f"{self.params.preamble}\n{self.conversation(turns)}\n\n{self.params.question}"
            conditional.append(AnswerLogprobsRequest((Turn("user", prompt), Turn("assistant", answer))))
            baseline.append(AnswerLogprobsRequest((Turn("user", self.params.question), Turn("assistant", answer))))
            slots.append(i)
        answers = self.backend.answer_logprobs(conditional + baseline) if slots else []
        n = len(slots)
        for j, i in enumerate(slots):
            try:
                with_text = _concat(_check(answers[j]))
                alone = _concat(_check(answers[n + j]))
                results[i] = {"score": float(with_text.mean() - alone.mean()), "tokens": int(with_text.size)}
            except Exception as err:  # noqa: BLE001 - reported per item
                results[i] = err
        return results  # type: ignore[return-value]
