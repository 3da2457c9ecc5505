"""Vectorised ranking helpers of the selection: percentiles, ranks within groups, top-k, codes."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def percentile_ranks(values: np.ndarray) -> np.ndarray:
    """Mid-rank percentiles in (0, 1) of the non-NaN values (ties share their mean rank); NaN stays NaN."""
    out = np.full(values.shape, np.nan)
    present = np.flatnonzero(~np.isnan(values))
    m = present.size
    if m == 0:
        return out
    v = values[present]
    order = np.argsort(v)  # not stable: tied values get their run's mean rank below
    s = v[order]
    new = np.empty(m, dtype=bool)
    new[0] = True
    np.not_equal(s[1:], s[:-1], out=new[1:])
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], m)
    mid = (starts + ends) / (2.0 * m)  # (mean 0-based rank of the run + 0.5) / m
    ranks = np.empty(m)
    ranks[order] = mid[np.cumsum(new) - 1]
    out[present] = ranks
    return out


def rank_within_groups(groups: np.ndarray) -> np.ndarray:
    """0-based position of every element among the elements of its group, in array order."""
    n = groups.size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    top = int(groups.max())
    narrow = np.int16 if top < 2**15 else (np.int32 if top < 2**31 else np.int64)  # small ints sort by radix
    order = np.argsort(groups.astype(narrow, copy=False), kind="stable")
    g = groups[order]
    new = np.empty(n, dtype=bool)
    new[0] = True
    np.not_equal(g[1:], g[:-1], out=new[1:])
    starts = np.flatnonzero(new)
    run_start = starts[np.cumsum(new) - 1]
    out = np.empty(n, dtype=np.int64)
    out[order] = np.arange(n) - run_start
    return out


def descending(primary: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Order by ``primary`` descending (NaN last), ties by ``rows`` ascending."""
    key = np.where(np.isnan(primary), np.inf, -primary)
    if rows.size < 2 or bool(np.all(rows[1:] > rows[:-1])):
        return np.argsort(key, kind="stable")  # rows already ascending: a stable sort breaks ties by row
    return np.lexsort((rows, key))


def top(primary: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` largest ``primary`` values (NaN smallest; ties: lower row first), unordered."""
    n = primary.size
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k >= n:
        return np.arange(n)
    key = np.where(np.isnan(primary), -np.inf, primary)
    threshold = np.partition(key, n - k)[n - k]  # the k-th largest value
    above = np.flatnonzero(key > threshold)
    ties = np.flatnonzero(key == threshold)
    ties = ties[np.argsort(rows[ties], kind="stable")[: k - above.size]]
    return np.concatenate([above, ties])


def half_up(x: float) -> int:
    """``x`` rounded half up (fractions of a pool: 2.5 -> 3)."""
    return math.floor(x + 0.5 + 1e-9)


def codes(column: pa.ChunkedArray) -> tuple[np.ndarray, list[Any]]:
    """Integer codes (first-appearance order) and the distinct values; null gets the last code."""
    encoded = pc.dictionary_encode(column).combine_chunks()
    values = encoded.dictionary.to_pylist()
    out = np.asarray(encoded.indices.fill_null(len(values)).to_numpy(zero_copy_only=False), dtype=np.int64)
    if encoded.null_count:
        values.append(None)
    return out, values
