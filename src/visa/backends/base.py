"""The backend interface: typed requests in, results out, in order.

A scorer builds requests; a backend answers a whole list of them, doing its own batching,
padding, caching and concurrency. A backend returns an ``Exception`` in place of a result for a
request that failed, so one bad request never costs the others.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from visa.samples import Turn


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message; ``images`` are shown before the text (user messages only)."""

    role: str
    text: str
    images: tuple[Image.Image, ...] = ()


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    messages: tuple[Message, ...]
    max_new_tokens: int = 512


@dataclass(frozen=True, slots=True)
class GenerateResult:
    text: str


@dataclass(frozen=True, slots=True)
class AnswerLogprobsRequest:
    """Teacher-forced conversation; ``images`` attach to the first user turn (empty: no image).

    The backend returns the log-probabilities of the assistant answer tokens only: not the prompt,
    not the chat template's end-of-turn tokens.
    """

    turns: tuple[Turn, ...]
    images: tuple[Image.Image, ...] = ()


@dataclass(frozen=True, slots=True)
class AnswerLogprobsResult:
    """One float array of per-token log-probs per assistant turn, in turn order."""

    per_turn: tuple[np.ndarray, ...]


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a configured backend can do, so that agents decide from it, never from a type name.

    ``sees_images``: the model reads pixels (a vision-language model); a text-only model needs the
    image described in words. ``gpus``: how many local GPUs one engine occupies (0: none, e.g. a CPU
    model or a remote endpoint); agents reserve that many and executors place them accordingly.
    """

    sees_images: bool
    gpus: float = 0.0


class Backend(ABC):
    """A model server. ``setup`` loads the model; the two request kinds are answered in order.

    One engine per backend spec and process is shared by every agent that names it
    (:mod:`visa.backends.shared`): a backend must therefore be safe to query from several agents
    one after another, and hold no per-agent state.
    """

    #: Defaults of :meth:`capabilities`; backends whose answer depends on parameters override it.
    sees_images: ClassVar[bool] = True
    gpus: ClassVar[float] = 0.0

    @classmethod
    def capabilities(cls, params: Any) -> Capabilities:
        """What a backend of this class with ``params`` (its validated ``Params``) can do."""
        return Capabilities(sees_images=cls.sees_images, gpus=cls.gpus)

    @classmethod
    def hub_models(cls, params: Any) -> list[tuple[str, str | None]]:
        """(repo id or local folder, revision) of the weights ``setup()`` loads (checked before a run)."""
        return []

    @classmethod
    def endpoints(cls, params: Any) -> list[tuple[str, str]]:
        """(base URL, served model name) of the servers the backend queries (checked before a run)."""
        return []

    def setup(self) -> None:
        """Load the model (import optional dependencies here)."""

    @abstractmethod
    def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult | Exception]: ...

    @abstractmethod
    def answer_logprobs(
        self, requests: Sequence[AnswerLogprobsRequest]
    ) -> list[AnswerLogprobsResult | Exception]: ...

    def models(self) -> dict[str, str]:
        """Model id -> revision, for run.json."""
        return {}

    def teardown(self) -> None:
        """Release the model."""
