"""Content clusters: which samples are about the same kind of thing, found without labels.

A visual-richness ranking over a whole pool lets simple-looking task families (a line of rendered
text, a code snippet, a handwritten digit) lose to rich photos, although their questions teach
skills a model needs. Content clusters let the selection rank each image against its own kind and
spread the budget over kinds (see :mod:`visa.selection`). They are computed once, at scoring time,
from embeddings the recipe already produces, and written to the score table as two columns:

``cluster``
    the cluster id (int32; 0 is the largest cluster of the fit sample, 1 the next, ...); null for
    rows with an error or without the embeddings (e.g. text-only samples);
``cluster_distance``
    the Euclidean distance of the row to its cluster's centre in the reduced space (float64): small
    values are the cluster's most typical samples (the report shows the nearest as its example);
``cluster_typicality``
    the cosine similarity of the row's ``typicality`` embedding (default: the first of
    ``embeddings``, the verbalised image evidence in the embedded recipe) to the mean of that
    embedding over its cluster (float64). When a cluster is held together by its questions (a
    kind of task), a row whose image is unlike the images of its kind is a likely mismatch: a
    conversation on the wrong image, or a damaged copy of one (the selection can drop each
    cluster's least typical rows, see :mod:`visa.selection.crops`).

How (all steps seeded, so the same table and recipe give the same clusters):

1. **Embeddings.** Each column named in ``embeddings`` (list<float> columns of the score table; the
   embedded recipe uses the MiniLM embeddings of the verbalised image evidence and of the
   conversation that ``im.similarity`` writes) is L2-normalised and scaled by the square root of its
   share of ``weights``; the blocks are concatenated. A row needs every block to be clustered.
2. **Fit sample.** At most ``fit_rows`` clusterable rows, drawn uniformly with the seed.
3. **Reduced dimensions.** PCA (scikit-learn, randomized SVD) to ``dims`` components, fitted on
   the fit sample.
4. **k.** A fixed ``k``, or ``auto``: k-means for every k of a geometric grid between ``k_min``
   and ``min(k_max, rows / min_cluster_size)`` (every k up to 10, then steps of 30%), fitted on
   ``search_rows`` of the fit sample, keeping the k with the best silhouette (measured on
   ``silhouette_rows`` of them); the centres of that k are then fitted on the whole fit sample.
5. **Centres.** Mini-batch k-means (scikit-learn ``MiniBatchKMeans``) on the reduced fit sample.
6. **Assignment.** Every row, in chunks of ``chunk_rows``: reduce, then nearest centre. Memory is
   bounded by the chunk, the fit sample and the three output columns, whatever the pool size.
7. **Typicality.** Each cluster's mean ``typicality`` vector (L2-normalised rows) over the fit
   sample's rows of that cluster; every row's cosine to its cluster's mean is computed with the
   assignment, chunk by chunk.
8. **Centres kept.** run.json keeps every cluster's centre in the reduced space (``clusters.centres``,
   in cluster id order): a selection whose budget is smaller than k spreads it over groups of
   neighbouring clusters (:func:`visa.selection.crops.merge_clusters`).

The BLAS/OpenMP pools run ``threads`` threads (default 1): k-means on these small matrices spends
more CPU waking threads than computing when the cores are busy (measured on a loaded 2-core
machine: 1.7 CPU-s with one thread, 14.7 with the default pool, same clusters).

A pool too small for two clusters of ``min_cluster_size`` gets one cluster (selection within it is
then the plain global selection).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.decomposition import PCA

CLUSTER_COLUMN = "cluster"
DISTANCE_COLUMN = "cluster_distance"
TYPICALITY_COLUMN = "cluster_typicality"
DEFAULT_EMBEDDINGS = ("im.similarity.image_embedding", "im.similarity.text_embedding")


class ClusterError(ValueError):
    """Clusters cannot be computed from this table with these settings; one clear line."""


class ClusterSpec(BaseModel):
    """The recipe's ``clusters:`` section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    embeddings: list[str] = Field(
        default_factory=lambda: list(DEFAULT_EMBEDDINGS),
        description="list<float> columns of the score table whose concatenation is clustered",
    )
    weights: list[float] | None = Field(None, description="share of each embedding (default: equal)")
    typicality: str | None = Field(
        None, description="list<float> column whose cosine to its cluster's mean is written to cluster_typicality "
        "(default: the first of embeddings)",
    )
    k: int | Literal["auto"] = Field("auto", description="number of clusters, or 'auto' (silhouette)")
    k_min: int = Field(4, ge=1, description="smallest k tried by 'auto'")
    k_max: int = Field(64, ge=1, description="largest k tried by 'auto'")
    min_cluster_size: int = Field(8, ge=1, description="'auto' tries no k above rows / min_cluster_size")
    dims: int = Field(32, ge=1, le=1024, description="PCA components the embeddings are reduced to")
    fit_rows: int = Field(50_000, ge=10, description="rows the PCA and the centres are fitted on")
    search_rows: int = Field(10_000, ge=10, description="fit-sample rows 'auto' fits each k on")
    silhouette_rows: int = Field(3000, ge=10, description="rows the silhouette of each k is measured on")
    chunk_rows: int = Field(65_536, ge=1, description="rows assigned per chunk (bounds memory)")
    threads: int = Field(1, ge=1, description="BLAS/OpenMP threads of the PCA and k-means")
    seed: int = 0

    @field_validator("k")
    @classmethod
    def _k(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("k must be >= 1 or 'auto'")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ClusterSpec:
        if not self.embeddings:
            raise ValueError("clusters.embeddings names no column")
        if self.weights is not None:
            if len(self.weights) != len(self.embeddings):
                raise ValueError("clusters.weights needs one weight per embedding column")
            if any(not (w >= 0 and math.isfinite(w)) for w in self.weights) or not any(self.weights):
                raise ValueError("clusters.weights must be finite, >= 0, and not all 0")
        if self.k_min > self.k_max:
            raise ValueError("clusters.k_min must not exceed k_max")
        return self

    @property
    def typicality_column(self) -> str:
        return self.typicality or self.embeddings[0]

    def block_scales(self) -> list[float]:
        weights = self.weights or [1.0] * len(self.embeddings)
        total = float(sum(weights))
        return [math.sqrt(w / total) for w in weights]


# ---------------------------------------------------------------------------------------------
# Embedding matrix from Arrow columns
# ---------------------------------------------------------------------------------------------
def _vectors(column: pa.ChunkedArray | pa.Array, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows x dim float32 matrix, present mask) of a list<float> column; rows whose list is null,
    of another length than ``dim`` or not finite are absent (zeros)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(array)
    lengths = pc.list_value_length(array).fill_null(0).to_numpy(zero_copy_only=False)
    present = lengths == dim
    values = pc.list_flatten(array.filter(pa.array(present))).cast(pa.float32())
    matrix = np.zeros((n, dim), dtype=np.float32)
    if present.any():
        matrix[present] = values.to_numpy(zero_copy_only=False).reshape(-1, dim)
    finite = np.isfinite(matrix).all(axis=1)
    matrix[~finite] = 0.0
    return matrix, present & finite


def embedding_dims(table: pa.Table, spec: ClusterSpec) -> list[int]:
    """The length of each embedding column's vectors: its most common non-zero list length."""
    return [column_dim(table, name) for name in spec.embeddings]


def column_dim(table: pa.Table, name: str, what: str = "embedding") -> int:
    """The length of a list<float> column's vectors: its most common non-zero list length."""
    if name not in table.column_names:
        raise ClusterError(f"clusters: the score table has no {what} column '{name}'")
    column = table.column(name)
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        raise ClusterError(f"clusters: column '{name}' ({column.type}) is not a list of numbers")
    lengths = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False)
    return int(np.bincount(lengths[lengths > 0]).argmax()) if lengths.any() else 0


def unit_vectors(column: pa.ChunkedArray | pa.Array, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised rows of a list<float> column and which rows have a non-zero vector of length ``dim``."""
    matrix, ok = _vectors(column, dim)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    ok &= norms[:, 0] > 0
    matrix /= np.maximum(norms, 1e-12)
    return matrix, ok


def cluster_means(vectors: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Per cluster, the L2-normalised mean of its rows' unit vectors (a zero row for an empty cluster)."""
    sums = np.zeros((k, vectors.shape[1]), dtype=np.float64)
    np.add.at(sums, ids, vectors)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return (sums / np.maximum(norms, 1e-12)).astype(np.float32)


def embedding_matrix(table: pa.Table, spec: ClusterSpec, dims: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The weighted, normalised concatenation of the spec's embedding columns (of lengths ``dims``)
    over ``table``'s rows, and which rows have all of them (the others are zero rows)."""
    blocks, present = [], np.ones(table.num_rows, dtype=bool)
    for name, scale, dim in zip(spec.embeddings, spec.block_scales(), dims, strict=True):
        matrix, ok = unit_vectors(table.column(name), dim)
        blocks.append(matrix * np.float32(scale))
        present &= ok
    out = np.concatenate(blocks, axis=1) if len(blocks) > 1 else blocks[0]
    out[~present] = 0.0
    return out, present


# ---------------------------------------------------------------------------------------------
# Fitting and assignment
# ---------------------------------------------------------------------------------------------
def _sklearn() -> tuple[Any, Any, Any]:
    try:
        from sklearn.cluster import MiniBatchKMeans
        from sklearn.decomposition import PCA
        from sklearn.metrics import silhouette_score
    except ImportError:
        raise ClusterError("content clusters need scikit-learn: pip install scikit-learn") from None
    return PCA, MiniBatchKMeans, silhouette_score


def k_grid(rows: int, spec: ClusterSpec) -> list[int]:
    """The k values ``auto`` tries: every k up to 10, then a geometric grid (ratio 1.3) up to the size limit."""
    high = min(spec.k_max, rows // spec.min_cluster_size, rows - 1)
    if high < max(2, spec.k_min):
        return [1] if high < 2 else [high]
    grid, k = [], max(2, spec.k_min)
    while k < high:
        grid.append(k)
        k = k + 1 if k < 10 else max(k + 1, int(round(k * 1.3)))
    grid.append(high)
    return grid


@dataclass
class ContentClusterer:
    """A fitted reduction + centres; assigns any number of rows chunk by chunk."""

    pca: PCA | None
    kmeans: MiniBatchKMeans | None
    relabel: np.ndarray
    report: dict[str, Any]

    @property
    def k(self) -> int:
        return int(self.relabel.size)

    def reduce(self, matrix: np.ndarray) -> np.ndarray:
        return matrix if self.pca is None else self.pca.transform(matrix).astype(np.float32)

    def assign(self, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cluster id, distance to its centre) of every row of an embedding matrix."""
        if self.kmeans is None:
            reduced = self.reduce(matrix)
            centre = reduced.mean(axis=0) if self.report.get("centre") is None else self.report["centre"]
            return np.zeros(len(matrix), dtype=np.int32), np.linalg.norm(reduced - centre, axis=1)
        distances = self.kmeans.transform(self.reduce(matrix))
        nearest = distances.argmin(axis=1)
        return self.relabel[nearest].astype(np.int32), distances[np.arange(len(matrix)), nearest]


def _kmeans(reduced: np.ndarray, k: int, seed: int) -> MiniBatchKMeans:
    _, mini_batch_kmeans, _ = _sklearn()
    model = mini_batch_kmeans(n_clusters=k, random_state=seed, n_init=3, batch_size=min(4096, len(reduced)),
                              max_no_improvement=20)
    return model.fit(reduced)


def _choose_k(reduced: np.ndarray, spec: ClusterSpec) -> tuple[int, MiniBatchKMeans | None, dict[str, float]]:
    """The k with the best silhouette over :func:`k_grid` (or the fixed k), with its fitted model."""
    if spec.k != "auto":
        k = min(int(spec.k), len(reduced))
        return k, (_kmeans(reduced, k, spec.seed) if k > 1 else None), {}
    search = reduced[: spec.search_rows]  # the fit sample is already in random order
    grid = k_grid(len(search), spec)
    if grid == [1]:
        return 1, None, {}
    _, _, silhouette_score = _sklearn()
    best: tuple[float, int, Any] = (-math.inf, 1, None)
    scores: dict[str, float] = {}
    size = min(spec.silhouette_rows, len(search))
    for k in grid:
        model = _kmeans(search, k, spec.seed)
        if len(np.unique(model.labels_)) < 2:
            continue
        score = float(silhouette_score(search, model.labels_, sample_size=size, random_state=spec.seed))
        scores[str(k)] = round(score, 4)
        if score > best[0]:
            best = (score, k, model)
    if best[2] is not None and len(search) < len(reduced):
        best = (best[0], best[1], _kmeans(reduced, best[1], spec.seed))
    return best[1], best[2], scores


def fit_clusterer(sample: np.ndarray, spec: ClusterSpec) -> ContentClusterer:
    """Fit the reduction and the centres on an embedding sample (rows x features, all present)."""
    pca_cls, _, _ = _sklearn()
    rows, features = sample.shape
    components = min(spec.dims, features, max(rows - 1, 1))
    pca = None
    explained = 1.0
    if components < features and rows > 2:
        pca = pca_cls(n_components=components, svd_solver="randomized", random_state=spec.seed).fit(sample)
        explained = float(pca.explained_variance_ratio_.sum())
    reduced = pca.transform(sample).astype(np.float32) if pca is not None else sample
    k, model, silhouettes = _choose_k(reduced, spec)
    report: dict[str, Any] = {
        "k": k,
        "chosen_by": "silhouette" if spec.k == "auto" else "recipe",
        "silhouette": silhouettes,
        "dims": int(reduced.shape[1]),
        "explained_variance": round(explained, 4),
        "fit_rows": rows,
    }
    if model is None:
        report["centre"] = reduced.mean(axis=0) if rows else np.zeros(reduced.shape[1], dtype=np.float32)
        return ContentClusterer(pca, None, np.zeros(1, dtype=np.int64), report)
    sizes = np.bincount(model.predict(reduced), minlength=k)
    order = np.lexsort((np.arange(k), -sizes))  # largest first, ties by centre index
    relabel = np.empty(k, dtype=np.int64)
    relabel[order] = np.arange(k)
    report["centres"] = np.asarray(model.cluster_centers_, dtype=np.float64)[order]
    return ContentClusterer(pca, model, relabel, report)


def fit_sample_rows(present: np.ndarray, spec: ClusterSpec) -> np.ndarray:
    """Row positions of the fit sample, in a seeded random order: every clusterable row, or
    ``fit_rows`` of them drawn with the seed."""
    rows = np.flatnonzero(present)
    rng = np.random.default_rng(spec.seed)
    if rows.size <= spec.fit_rows:
        return rng.permutation(rows)
    return rng.choice(rows, size=spec.fit_rows, replace=False)


def _usable(table: pa.Table) -> np.ndarray:
    if "error_kind" not in table.column_names:
        return np.ones(table.num_rows, dtype=bool)
    return np.asarray(pc.is_null(table.column("error_kind")).to_numpy(zero_copy_only=False), dtype=bool)


def add_clusters(table: pa.Table, spec: ClusterSpec) -> tuple[pa.Table, dict[str, Any]]:
    """The table with ``cluster`` and ``cluster_distance`` columns, and a summary for run.json.

    Rows with an ``error_kind`` or without every embedding get null in both columns.
    """
    from threadpoolctl import threadpool_limits

    _sklearn()  # loaded first: threadpoolctl limits only the libraries already loaded
    with threadpool_limits(limits=spec.threads):
        return _add_clusters(table, spec)


def _add_clusters(table: pa.Table, spec: ClusterSpec) -> tuple[pa.Table, dict[str, Any]]:
    started = time.perf_counter()
    n = table.num_rows
    dims = embedding_dims(table, spec)
    typical_name = spec.typicality_column
    typical_dim = column_dim(table, typical_name, "typicality")
    present = _usable(table) & (min(dims) > 0)
    for name, dim in zip(spec.embeddings, dims, strict=True):
        present &= pc.list_value_length(table.column(name)).fill_null(0).to_numpy(zero_copy_only=False) == dim
    embeddings = table.select(list(dict.fromkeys([*spec.embeddings, typical_name])))
    fit_rows = fit_sample_rows(present, spec)
    ids = np.zeros(n, dtype=np.int32)
    distance = np.zeros(n, dtype=np.float64)
    typicality = np.full(n, np.nan)
    clusterer = None
    means = None
    if fit_rows.size:
        fit_table = embeddings.take(pa.array(fit_rows, pa.int64()))
        sample, ok = embedding_matrix(fit_table, spec, dims)
        clusterer = fit_clusterer(sample[ok], spec) if ok.any() else None
        if clusterer is not None and typical_dim:
            vectors, has = unit_vectors(fit_table.column(typical_name), typical_dim)
            use = ok & has
            means = cluster_means(vectors[use], clusterer.assign(sample[use])[0], clusterer.k)
    if clusterer is None:
        present[:] = False
    for start in range(0, n if clusterer is not None else 0, spec.chunk_rows):
        chunk = embeddings.slice(start, spec.chunk_rows)
        block, ok = embedding_matrix(chunk, spec, dims)
        end = start + len(block)
        ids[start:end], distance[start:end] = clusterer.assign(block)
        present[start:end] &= ok
        if means is not None:
            vectors, has = unit_vectors(chunk.column(typical_name), typical_dim)
            cosine = np.einsum("ij,ij->i", vectors, means[ids[start:end]]).astype(np.float64)
            typicality[start:end] = np.where(has, cosine, np.nan)
    rows = np.asarray(table.column("row"), dtype=np.int64) if "row" in table.column_names else np.arange(n)
    summary = cluster_summary(ids, distance, present, spec, clusterer, rows)
    summary["seconds"] = round(time.perf_counter() - started, 3)
    table = _set_column(table, CLUSTER_COLUMN, pa.array(ids, pa.int32(), mask=~present))
    table = _set_column(table, DISTANCE_COLUMN, pa.array(distance, pa.float64(), mask=~present))
    typical_mask = ~present | np.isnan(typicality)
    table = _set_column(table, TYPICALITY_COLUMN, pa.array(np.nan_to_num(typicality), pa.float64(), mask=typical_mask))
    return table, summary


def cluster_summary(ids: np.ndarray, distance: np.ndarray, present: np.ndarray, spec: ClusterSpec,
                    clusterer: ContentClusterer | None, rows: np.ndarray) -> dict[str, Any]:
    """What run.json records about the clusters: settings, the choice of k, sizes, typical rows."""
    report = dict(clusterer.report) if clusterer is not None else {"k": 0}
    report.pop("centre", None)
    if "centres" in report:  # cluster id order; the selection merges neighbours when its budget is below k
        report["centres"] = np.round(report["centres"], 5).tolist()
    k = int(report["k"])
    sizes = np.bincount(ids[present], minlength=k) if k else np.zeros(0, dtype=np.int64)
    typical = typical_rows(ids, distance, present, k)
    return {
        "embeddings": list(spec.embeddings),
        **report,
        "rows": int(present.sum()),
        "unclustered": int((~present).sum()),
        "sizes": [int(s) for s in sizes],
        "typical_rows": [int(rows[p]) if p >= 0 else None for p in typical],
    }


def typical_rows(ids: np.ndarray, distance: np.ndarray, present: np.ndarray, k: int) -> np.ndarray:
    """For every cluster, the table position of its row nearest to its centre (-1 when empty)."""
    out = np.full(k, -1, dtype=np.int64)
    rows = np.flatnonzero(present)
    if not rows.size or not k:
        return out
    order = rows[np.lexsort((rows, distance[rows], ids[rows]))]
    first = np.flatnonzero(np.r_[True, ids[order][1:] != ids[order][:-1]])
    out[ids[order[first]]] = order[first]
    return out


def _set_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)


def check_sources(spec: ClusterSpec, produced: Sequence[str]) -> None:
    """Raise ClusterError when an embedding column is not produced by any agent of the recipe."""
    missing = [c for c in dict.fromkeys([*spec.embeddings, spec.typicality_column]) if c not in produced]
    if missing:
        from visa.registry import did_you_mean

        raise ClusterError(
            f"clusters: no agent of the recipe writes '{missing[0]}'"
            f"{did_you_mean(missing[0], list(produced))}"
        )
