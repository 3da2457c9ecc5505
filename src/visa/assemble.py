"""Assemble the score table from the work folder: one row per input record, flat typed columns.

Image-agent results join to every sample of the image (a multi-image sample takes the mean of its
images' numeric values and the first image's other fields); sample-agent results join by sample
key. Pool-level steps (``Agent.finalize``, e.g. TF-IDF) run here over all results of the run. A
sample whose image could not be decoded, or for which an agent failed, gets its error recorded.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from visa.agents.base import Unit
from visa.pipeline import SAMPLE_SCHEMA, PlannedAgent
from visa.store import WorkDir

META_PREFIX = "meta."


def assemble(work: WorkDir, shards: int, agents: list[PlannedAgent], decode_fp: str) -> pa.Table:
    samples = work.read_samples(shards) if shards else SAMPLE_SCHEMA.empty_table()
    n = samples.num_rows
    error_kind = samples.column("error_kind").to_pylist()
    error = samples.column("error").to_pylist()
    columns: dict[str, pa.Array] = {
        "row": samples.column("row"),
        "line": samples.column("line"),
        "sample_id": _unique_ids(samples.column("sample_id").to_pylist()),
        "image_key": samples.column("image_key"),
        "image_keys": samples.column("image_keys"),
        "text_hash": samples.column("text_hash"),
    }
    image_keys = samples.column("image_keys").to_pylist()
    sample_keys = samples.column("sample_key").to_pylist()

    decode = work.read_results(decode_fp)
    if decode is not None:
        failed = {k: e for k, e in zip(decode.column("key").to_pylist(), decode.column("error").to_pylist()) if e}
        for i, keys in enumerate(image_keys):
            if error[i] is None:
                bad = next((failed[k] for k in keys or () if k in failed), None)
                if bad is not None:
                    kind, _, _ = bad.partition(":")
                    error_kind[i], error[i] = _decode_kind(kind), bad

    agent_values: dict[str, pa.Array] = {}
    for planned in agents:
        table = work.read_results(planned.fingerprint)
        outputs = planned.agent.all_outputs()
        if table is None:
            table = pa.table(
                {"key": pa.array([], pa.string()), **{f: pa.array([], t) for f, t in planned.agent.outputs.items()},
                 "error": pa.array([], pa.string())}
            )
        if planned.agent.unit == Unit.IMAGE:
            present = {k for keys in image_keys for k in keys or ()}
        else:
            present = {k for k in sample_keys if k is not None}
        table = table.filter(pc.is_in(table.column("key"), value_set=pa.array(sorted(present), pa.string())))
        table = planned.agent.finalize(table)
        by_key = {k: i for i, k in enumerate(table.column("key").to_pylist())}
        errors = table.column("error").to_pylist()
        if planned.agent.unit == Unit.IMAGE:
            index_lists = [[by_key.get(k) for k in keys or ()] for keys in image_keys]
        else:
            index_lists = [[by_key.get(k)] if k is not None else [] for k in sample_keys]
        _mark_agent_errors(planned.column, index_lists, errors, error_kind, error)
        for field_name, kind in outputs.items():
            column = table.column(field_name) if field_name in table.column_names else pa.nulls(table.num_rows, kind)
            agent_values[planned.bound.column_of(field_name)] = _join(column, kind, index_lists, n)

    columns["error_kind"] = pa.array(error_kind, pa.string())
    columns["error"] = pa.array(error, pa.string())
    columns.update(_meta_columns(samples.column("meta").to_pylist()))
    columns.update(agent_values)
    return pa.table(columns)


def _mark_agent_errors(
    column: str, index_lists: list[list[int | None]], errors: list[str | None], error_kind: list[str | None],
    error: list[str | None],
) -> None:
    """A row with no error yet gets the agent's error for one of its keys, or, when the store holds
    no result for one of them, says so: a missing result is never a silent null."""
    for i, indices in enumerate(index_lists):
        if error[i] is None:
            bad = next((None if j is None else errors[j] for j in indices if j is None or errors[j]), "")
            if bad is None:
                bad = "no stored result (the run folder lost it; rerun the same command to recompute it)"
            if bad:
                error_kind[i], error[i] = "agent", f"agent {column}: {bad}"


def _unique_ids(ids: list[str]) -> pa.Array:
    """Identical records without an id share a content hash: later copies get ``#<n>`` appended."""
    seen: dict[str, int] = {}
    out = []
    for sid in ids:
        n = seen.get(sid, 0)
        seen[sid] = n + 1
        out.append(sid if n == 0 else f"{sid}#{n + 1}")
    return pa.array(out, pa.string())


def _decode_kind(kind: str) -> str:
    return kind.strip() or "unreadable"


def _join(column: pa.ChunkedArray | pa.Array, kind: pa.DataType, index_lists: list[list[int | None]], n: int) -> pa.Array:
    """Values per sample: the value of its single key; the mean over keys for numeric multi-image."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    first = pa.array([ix[0] if ix and ix[0] is not None else None for ix in index_lists], pa.int64())
    joined = column.take(first) if len(column) else pa.nulls(n, kind)
    multi = [i for i, ix in enumerate(index_lists) if len(ix) > 1]
    if not multi or not (pa.types.is_floating(kind) or pa.types.is_integer(kind)):
        return joined
    values = joined.to_numpy(zero_copy_only=False).astype(np.float64) if pa.types.is_floating(kind) else None
    if values is None:
        return joined
    column_np = column.to_numpy(zero_copy_only=False).astype(np.float64)
    for i in multi:
        picked = [column_np[j] for j in index_lists[i] if j is not None and not np.isnan(column_np[j])]
        values[i] = float(np.mean(picked)) if picked and len(picked) == len(index_lists[i]) else np.nan
    return pa.array(values, type=kind, from_pandas=True)


META_DICT = "meta"
"""LLaVA-style records keep their metadata in a ``meta`` object; its fields become columns beside the
record's other top-level fields."""


def meta_fields(meta: dict[str, Any]) -> dict[str, Any]:
    """A sample's metadata as ``meta.<field>`` columns: the fields of its ``meta`` object and its other
    top-level fields alike, scalar values only, one nested object level as ``meta.<field>.<sub>``.
    When a field is both in ``meta`` and at the top level, the ``meta`` object's value is used."""
    row: dict[str, Any] = {}
    inner = meta.get(META_DICT)
    fields = {k: v for k, v in meta.items() if not (k == META_DICT and isinstance(v, dict))}
    if isinstance(inner, dict):
        fields.update(inner)
    for key, value in fields.items():
        if isinstance(value, dict):
            for sub, nested in value.items():
                if _scalar(nested):
                    row[f"{META_PREFIX}{key}.{sub}"] = nested
        elif _scalar(value):
            row[f"{META_PREFIX}{key}"] = value
    return row


MAX_META_COLUMNS = 256
"""At most this many distinct ``meta.*`` columns per table (first come, in input order)."""
MAX_META_FIELDS_PER_RECORD = 64
"""At most this many ``meta.*`` values taken from one record."""
MAX_META_NAME_CHARS = 128
"""A metadata field whose column name would be longer than this gets no column of its own."""
META_OVERFLOW = "meta_overflow"
"""The column holding, as JSON text, the scalar metadata fields that got no column of their own."""
_INT64 = (-(2**63), 2**63 - 1)


def _meta_columns(metas: list[str | None]) -> dict[str, pa.Array]:
    """The ``meta.<field>`` columns of all samples (see :func:`meta_fields`); a field whose values
    have different types across records becomes a string column.

    Hostile metadata cannot blow up the table: at most :data:`MAX_META_FIELDS_PER_RECORD` fields of
    a record and :data:`MAX_META_COLUMNS` columns in all get a column (names up to
    :data:`MAX_META_NAME_CHARS` characters); the other scalar fields of a record go, as one JSON
    object, into the text column :data:`META_OVERFLOW` (absent when nothing overflows). Integers
    outside the 64-bit range are kept as text.
    """
    flat: list[dict[str, Any]] = []
    overflow: list[str | None] = []
    names: dict[str, None] = {}
    for text in metas:
        row: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for name, value in meta_fields(json.loads(text) if text else {}).items():
            value = _int64_or_text(value)
            admitted = name in names or len(names) < MAX_META_COLUMNS
            if admitted and len(row) < MAX_META_FIELDS_PER_RECORD and len(name) <= MAX_META_NAME_CHARS:
                row[name] = value
                names[name] = None
            else:
                extra[name[len(META_PREFIX) :]] = value
        flat.append(row)
        overflow.append(json.dumps(extra, ensure_ascii=False, sort_keys=True) if extra else None)
    out: dict[str, pa.Array] = {name: _meta_array([row.get(name) for row in flat]) for name in names}
    if any(text is not None for text in overflow):
        out[META_OVERFLOW] = pa.array(overflow, pa.string())
    return out


def _int64_or_text(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and not _INT64[0] <= value <= _INT64[1]:
        return str(value)
    return value


def _meta_array(values: list[Any]) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):  # mixed types across records
        return pa.array([None if v is None else str(v) for v in values], pa.string())


def _scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool)) or value is None
