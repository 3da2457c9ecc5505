"""DP: a language model judges how much visual information an image holds, from 1 to 5.

The judge gets our rubric and five worked examples (:mod:`visa.agents.dp_rubric`) and rates each
unique image. Two modes:

* ``generate`` (for real vision-language models): greedy decoding of a judgement that ends with
  ``Final score: N``; :func:`visa.agents.dp_parser.parse_final_score` reads the FINAL score only.
  When no score can be read the score is null and ``parse_error`` says why. The raw judgement is
  kept in ``raw`` (column ``dp.<agent>.raw``) for inspection.
* ``likelihood``: the five answers ``Final score: 1`` ... ``Final score: 5`` are teacher-forced in one
  ``answer_logprobs`` call; the score is the expected value ``sum_k k * p_k`` under the model's
  distribution restricted to those five answers (``raw`` lists the five probabilities). This
  always yields a score and suits small models, which rarely follow the answer format.

Image input: ``pixels`` sends the image with the prompt; ``verbalized`` (the embedded recipe) sends a
text description instead, written (:mod:`visa.agents.verbalize`) from the results of other image
agents of the recipe that the judge ``needs``: the columns of its ``evidence`` parameter (default:
the tagger's labels and the image statistics, ``oa.tagger.*`` and ``image.stats*``). The pipeline
runs those agents first and hands their values over in ``ImageItem.context``, so nothing is
computed twice; a recipe without them fails when it is loaded (or set ``evidence`` to the columns
it has).

Honest limits: with the embedded backend the judge is a 135M-parameter text model reading a few
classifier labels and image statistics. It can tell "a plain texture with no labels" from "a scene
with several confident objects and text", not much more; treat ``dp.judge`` in the embedded recipe
as one weak vote that Shapley fusion weighs against SC and OA, not as an MLLM's judgement.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from visa.agents.base import Agent, AgentParams, ImageItem, Resources, Result, Unit
from visa.agents.dp_parser import parse_final_score
from visa.agents.dp_rubric import DESCRIPTION_INTRO, FINAL_LINE, IMAGE_INTRO, system_prompt
from visa.agents.verbalize import EvidenceColumns, VerbalizeOptions, gather, verbalize
from visa.backends import shared as shared_engines
from visa.backends.base import AnswerLogprobsRequest, Backend, GenerateRequest, Message
from visa.backends.registry import BackendSpec
from visa.samples import Turn

#: What the judge reads by default: the tagger's labels and the image statistics (no OCR, no regions).
JUDGE_EVIDENCE = EvidenceColumns(ocr_text=None, ocr_boxes=None, regions=None)


class JudgeAgent(Agent):
    """DP judge over any backend; see the module docstring for the modes."""

    class Params(AgentParams):
        #: Images per backend call: the rubric (~860 tokens) is run once per call and shared by its images.
        batch_size: int = 16
        backend: BackendSpec = Field(default_factory=lambda: BackendSpec(type="embedded_lm"))
        mode: Literal["auto", "generate", "likelihood"] = Field(
            "auto", description="auto: likelihood for a text-only backend, generate for one that sees images"
        )
        image_input: Literal["auto", "pixels", "verbalized"] = "auto"
        language: Literal["en", "zh"] = "en"
        examples: bool = Field(True, description="include the five worked examples in the prompt")
        max_new_tokens: int = Field(512, ge=8)
        evidence: EvidenceColumns = Field(
            default_factory=lambda: JUDGE_EVIDENCE,
            description="columns of other image agents verbalised for a text-only judge (its needs)",
        )
        verbalization: VerbalizeOptions = Field(default_factory=VerbalizeOptions)

    params: Params
    unit = Unit.IMAGE
    outputs = {"score": pa.float64(), "raw": pa.string(), "parse_error": pa.string()}

    def __init__(self, params: Params | None = None, *, backend: Backend | None = None):
        super().__init__(params)
        text_only = not self.params.backend.capabilities().sees_images
        self.mode = self.params.mode if self.params.mode != "auto" else ("likelihood" if text_only else "generate")
        self.verbalized = self.params.image_input == "verbalized" or (self.params.image_input == "auto" and text_only)
        # Instance attribute: what the judge reads depends on its parameters.
        self.needs = self.params.evidence.columns() if self.verbalized else ()
        self._backend = backend
        self._owns_backend = backend is None

    # -- lifecycle ----------------------------------------------------------------------------
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
        return dict(self._backend.models()) if self._backend is not None else {}

    def resources(self) -> Resources:
        return Resources(cpus=1.0, gpus=self.params.backend.capabilities().gpus)

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            raise RuntimeError("JudgeAgent.setup() has not been called")
        return self._backend

    # -- prompts ------------------------------------------------------------------------------
    def system(self) -> str:
        return system_prompt(self.params.language, examples=self.params.examples)

    def descriptions(self, items: Sequence[ImageItem]) -> list[str | Exception]:
        """Verbalised evidence per image, from the needed agents' values in ``ImageItem.context``."""
        out: list[str | Exception] = []
        for item in items:
            text = verbalize(gather(item.context, self.params.evidence), self.params.verbalization)
            out.append(text or ValueError(
                f"nothing to describe: no evidence in {', '.join(self.needs)} (those agents found nothing "
                "or failed on this image)"
            ))
        return out

    def user_message(self, item: ImageItem, description: str | None) -> Message:
        language = self.params.language
        if description is None:
            return Message("user", IMAGE_INTRO[language], (item.image,))
        return Message("user", f"{DESCRIPTION_INTRO[language]}\n\n{description}")

    # -- scoring ------------------------------------------------------------------------------
    def score_batch(self, items: Sequence[ImageItem]) -> list[Result]:
        results: list[Result | None] = [None] * len(items)
        messages: dict[int, Message] = {}
        descriptions = self.descriptions(items) if self.verbalized else [None] * len(items)
        for i, (item, description) in enumerate(zip(items, descriptions, strict=True)):
            if isinstance(description, Exception):
                results[i] = description
            else:
                messages[i] = self.user_message(item, description)
        if self.mode == "generate":
            self._generate(messages, results)
        else:
            self._likelihood(messages, results)
        return results  # type: ignore[return-value]

    def _generate(self, messages: dict[int, Message], results: list[Result | None]) -> None:
        system = Message("system", self.system())
        slots = list(messages)
        requests = [GenerateRequest((system, messages[i]), self.params.max_new_tokens) for i in slots]
        answers = self.backend.generate(requests) if requests else []
        for i, answer in zip(slots, answers, strict=True):
            if isinstance(answer, Exception):
                results[i] = answer
                continue
            parsed = parse_final_score(answer.text)
            results[i] = {
                "score": None if parsed.score is None else float(parsed.score),
                "raw": answer.text,
                "parse_error": parsed.error,
            }

    def _likelihood(self, messages: dict[int, Message], results: list[Result | None]) -> None:
        system = Turn("system", self.system())
        slots = list(messages)
        requests = []
        for i in slots:
            message = messages[i]
            for k in range(1, 6):
                answer = FINAL_LINE[self.params.language].format(score=k)
                requests.append(
                    AnswerLogprobsRequest(
                        (system, Turn("user", message.text), Turn("assistant", answer)), tuple(message.images)
                    )
                )
        answers = self.backend.answer_logprobs(requests) if requests else []
        for n, i in enumerate(slots):
            options = answers[5 * n : 5 * n + 5]
            failed = next((a for a in options if isinstance(a, Exception)), None)
            if failed is not None:
                results[i] = failed
                continue
            totals = np.asarray([float(np.sum(np.concatenate(a.per_turn))) for a in options])
            probs = np.exp(totals - totals.max())
            probs /= probs.sum()
            results[i] = {
                "score": float(np.dot(probs, np.arange(1, 6))),
                "raw": "likelihood p(1..5) = " + " ".join(f"{p:.3f}" for p in probs),
                "parse_error": None,
            }
