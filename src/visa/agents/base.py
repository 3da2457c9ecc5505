"""The agent contract.

An *agent* is one way of measuring one *score* (e.g. the Felzenszwalb region counter is an agent of
segmentation complexity, ``sc``). A recipe names, for every score, the agents that measure it. The
executor owns everything else: batching, per-item error capture, resume, timing and progress.

Lifecycle, per worker: ``__init__(params)`` (cheap, no model loading, no heavy imports) ->
``setup()`` (load models once; import optional dependencies here and raise
:class:`MissingDependency` naming the extra to install) -> ``score_batch(items)`` many times ->
``teardown()``.

Outputs: every agent declares the fields it returns in ``outputs`` (name -> pyarrow type). The field
``score`` is the agent's primary value and becomes the column ``<score>.<agent>``; any other field ``f``
becomes ``<score>.<agent>.<f>``. Agents whose value depends on the whole pool (e.g. TF-IDF over tags)
return raw fields from ``score_batch`` and derive ``score`` in :meth:`Agent.finalize`, which the
executor calls once over every result of the run when it assembles the table.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa
from PIL import Image
from pydantic import BaseModel, ConfigDict

from visa.deps import MissingDependency as MissingDependency  # agents raise it from setup()
from visa.deps import missing
from visa.samples import Turn


class Unit(enum.StrEnum):
    """What an agent scores: each unique image once, or each sample."""

    IMAGE = "image"
    SAMPLE = "sample"


class AgentParams(BaseModel):
    """Base class of every agent's parameters; a recipe's ``params:`` mapping is validated against it."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    batch_size: int = 8


@dataclass(frozen=True, slots=True)
class Resources:
    """What one instance of the agent needs; executors use it to size pools and place actors."""

    cpus: float = 1.0
    gpus: float = 0.0
    gpu_memory_gb: float = 0.0


@dataclass(frozen=True, slots=True)
class ImageItem:
    """One unique image. ``key`` is its content hash.

    ``context`` holds the values of the columns the agent listed in ``needs`` for this image (e.g.
    ``{"oa.tagger.top_labels": [...]}``), computed by those image agents before this one runs; a
    missing value (the upstream agent failed on the image) is None.
    """

    key: str
    image: Image.Image
    context: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SampleItem:
    """One sample. ``images`` are decoded in record order (empty for text-only samples).

    ``context`` holds the values of the columns the agent listed in ``needs`` for this sample's first
    image (e.g. ``{"oa.tagger.labels": [...]}``); a missing value is None.
    """

    key: str
    sample_id: str
    turns: tuple[Turn, ...]
    images: tuple[Image.Image, ...] = ()
    image_keys: tuple[str, ...] = ()
    context: dict[str, Any] = field(default_factory=dict)


class ItemError(Exception):
    """Returned (not raised) by ``score_batch`` in place of a result for one item that failed."""


Result = dict[str, Any] | Exception


class Agent(ABC):
    """Base class of all agents. Subclasses set the class attributes and implement ``score_batch``."""

    unit: ClassVar[Unit]
    #: Bump when the algorithm changes so that cached results are recomputed.
    version: ClassVar[str] = "1"
    Params: ClassVar[type[AgentParams]] = AgentParams
    #: Field name -> pyarrow type of what ``score_batch`` returns per item (before ``finalize``).
    outputs: ClassVar[dict[str, pa.DataType]] = {"score": pa.float64()}
    #: Extra fields ``finalize`` adds (usually ``score`` for pool-dependent agents).
    finalized_outputs: ClassVar[dict[str, pa.DataType]] = {}
    #: Columns of image agents this agent reads through ``ImageItem.context`` / ``SampleItem.context``
    #: (``<score>.<agent>`` or ``<score>.<agent>.<field>``). The pipeline runs an image agent after the
    #: image agents it needs; a need no image agent meets, or a cycle, fails when the recipe loads.
    needs: ClassVar[tuple[str, ...]] = ()
    #: Sample agents that never look at pixels (e.g. they read ``context`` only) set this to False,
    #: so the executor does not decode images for them.
    uses_images: ClassVar[bool] = True
    #: Python modules that must be importable for ``setup`` to work, with the extra that installs them.
    requires: ClassVar[dict[str, str]] = {}

    def __init__(self, params: AgentParams | None = None):
        self.params = params if params is not None else self.Params()

    # -- identity -----------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """Everything that determines this agent's results (used to key the result store)."""
        return {
            "agent": f"{type(self).__module__}:{type(self).__qualname__}",
            "version": self.version,
            "params": self.params.model_dump(mode="json", exclude={"batch_size"}),
        }

    def resources(self) -> Resources:
        return Resources()

    def models(self) -> dict[str, str]:
        """Model ids/revisions this agent uses, recorded in run.json."""
        return {}

    def hub_models(self) -> list[tuple[str, str | None]]:
        """(repo id or local folder, revision) of the weights ``setup()`` loads from the model hub.

        The default reads the ``model_id`` / ``revision`` parameters that hub-model agents share;
        models of a ``backend`` are the backend's to declare. :mod:`visa.preflight` checks them before
        a run.
        """
        model_id = getattr(self.params, "model_id", None)
        return [(model_id, getattr(self.params, "revision", None))] if isinstance(model_id, str) else []

    @classmethod
    def missing_requirements(cls) -> list[str]:
        """Install hints for requirements that are not importable here (empty when runnable)."""
        return missing(cls.requires)

    # -- lifecycle ----------------------------------------------------------------------------
    def setup(self) -> None:
        """Load models. Called once per worker before the first batch."""

    @abstractmethod
    def score_batch(self, items: Sequence[ImageItem] | Sequence[SampleItem]) -> list[Result]:
        """Score items; return one dict of ``outputs`` (or an Exception) per item, in order."""

    def teardown(self) -> None:
        """Release models."""

    def finalize(self, table: pa.Table) -> pa.Table:
        """Pool-level step over all results of the run (columns: ``key`` + ``outputs``).

        Returns the table with ``finalized_outputs`` added. The default is the identity.
        """
        return table

    @classmethod
    def all_outputs(cls) -> dict[str, pa.DataType]:
        return {**cls.outputs, **cls.finalized_outputs}


class PerImageAgent(Agent):
    """An image agent that scores one image at a time (``score_image``); an image that raises becomes
    its own error result while the others of the batch are scored."""

    unit = Unit.IMAGE

    def score_batch(self, items: Sequence[ImageItem]) -> list[Result]:  # type: ignore[override]
        results: list[Result] = []
        for item in items:
            try:
                results.append(self.score_image(item.image))
            except Exception as err:  # noqa: BLE001 - reported per item
                results.append(err)
        return results

    @abstractmethod
    def score_image(self, image: Image.Image) -> dict[str, Any]:
        """The outputs of one RGB image."""
