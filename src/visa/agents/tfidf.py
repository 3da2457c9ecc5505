"""TF-IDF of detected tags over the image pool: the OA (object alignment) score.

OA(image) = sum over the distinct tags t detected in the image of count(t) * ln(N / df(t)), where
count(t) is how many times t was detected in the image, N the number of images in the pool and
df(t) the number of pool images in which t was detected. Rare objects therefore weigh more than
common ones, and a tag found in every image adds nothing. Because N and df depend on the pool, OA
is computed in an agent's ``finalize`` over the whole run and must be recomputed when the pool
changes.

Images whose labels are missing (null: the image failed) are not part of the pool: they get a null
score and do not count in N or df. An image with no detection is part of the pool and scores 0.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import pyarrow as pa


def tfidf_scores(label_lists: Sequence[Sequence[str] | None]) -> list[float | None]:
    """OA score of every image from its list of detected labels (one entry per detection)."""
    counts = [Counter(labels) if labels is not None else None for labels in label_lists]
    pool = [c for c in counts if c is not None]
    n_images = len(pool)
    document_frequency: Counter[str] = Counter()
    for c in pool:
        document_frequency.update(c.keys())
    idf = {tag: math.log(n_images / df) for tag, df in document_frequency.items()}
    return [None if c is None else float(sum(n * idf[tag] for tag, n in c.items())) for c in counts]


def finalize_tfidf(table: pa.Table, labels_field: str = "labels", score_field: str = "score") -> pa.Table:
    """Add (or replace) column ``score_field`` with :func:`tfidf_scores` of column ``labels_field``.

    For ``Agent.finalize`` of tagging/detection agents whose ``outputs`` hold a list<string> of labels.
    """
    if labels_field not in table.column_names:
        raise KeyError(f"finalize needs column '{labels_field}'; the table has {table.column_names}")
    scores = pa.array(tfidf_scores(table.column(labels_field).to_pylist()), type=pa.float64())
    if score_field in table.column_names:
        return table.set_column(table.column_names.index(score_field), score_field, scores)
    return table.append_column(score_field, scores)
