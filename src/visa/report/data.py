"""Read a run folder into the arrays the report needs, defensively.

Only the columns the report uses are read from ``scores.parquet`` (ids, errors, numeric score columns,
candidate category columns); per-row extras (error messages, auxiliary agent fields) are read later
for the few rows that are shown, one row group at a time. Everything here is vectorised, so a
3M-row table costs seconds, not minutes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from visa import families as fam
from visa.run_folder import FamilyFusion, RunFolder, RunFolderError, RunRecord
from visa.selection.stages import REASONS

REASON_ORDER = REASONS
REASON_TEXT = {
    "error": "the sample has an error",
    "image_gate": "a guard found its image information-free (noise, flat, heavy JPEG)",
    "atypical": "its image is unlike the images of its content cluster",
    "text_only": "text-only samples were dropped",
    "image_below_cut": "its image is below the visual-score cut",
    "im_nonpositive": "IM <= threshold: the image does not help the answer",
    "pt_tail": "in the high-PT (garbled text) tail",
    "duplicate": "repeats a better-ranked sample",
    "quota": "its group's quota was full",
    "budget": "ranked beyond the budget",
}
MAX_CATEGORIES = 24
MAX_CATEGORY_FIELDS = 6
_BATCH = 1 << 16


class ReportError(ValueError):
    """The report cannot be built from this folder; the message is one clear line."""


@dataclass
class Family:
    """One score (``sc``, ``im``, ...): its fused column (if any) and its agents' columns."""

    name: str
    unit: str
    fused: str | None
    agents: list[str]
    shapley: FamilyFusion | None = None

    @property
    def title(self) -> str:
        return fam.spec(self.name).title

    @property
    def hint(self) -> str:
        return fam.spec(self.name).hint

    @property
    def ranking_column(self) -> str | None:
        """The column galleries rank by: the fused score, else the first agent."""
        return self.fused or (self.agents[0] if self.agents else None)


@dataclass
class Category:
    """A categorical metadata column: its distinct values (most frequent first) and a code per row."""

    column: str
    labels: list[str]
    codes: np.ndarray  # int64 per row, -1 = null


@dataclass
class Selection:
    selected: np.ndarray  # bool per row
    rank: np.ndarray  # float per row, NaN when not selected
    reason: np.ndarray  # int8 per row, index into ``reasons``; -1 for selected rows
    reasons: list[str]


@dataclass
class RunData:
    run_dir: Path
    run: RunRecord
    scores_path: Path
    n: int
    rows: np.ndarray
    image_codes: np.ndarray  # int64 per row, -1 = no image
    image_keys: pa.Array  # image_key of each code
    error_kind: pa.ChunkedArray | None
    error: np.ndarray
    families: list[Family]
    values: dict[str, np.ndarray]
    categories: list[Category]
    selection: Selection | None
    notes: list[str] = field(default_factory=list)

    def value(self, column: str | None) -> np.ndarray | None:
        return None if column is None else self.values.get(column)

    def image_key(self, position: int) -> str | None:
        code = int(self.image_codes[position])
        return None if code < 0 else str(self.image_keys[code].as_py())

    def fields(self, positions: Sequence[int], columns: Sequence[str] = ()) -> dict[int, dict[str, Any]]:
        """``sample_id``, ``line`` and ``columns`` of a few rows, read from the score table."""
        found = read_rows(self.scores_path, ["sample_id", "line", *columns], positions)
        for position, values in found.items():
            if values.get("sample_id") is None:
                values["sample_id"] = str(self.rows[position])
            values["sample_id"] = str(values["sample_id"])
        return found


def read_run_json(run_dir: Path) -> RunRecord:
    """run.json (an empty record when the run has none: the report also works from the table alone)."""
    try:
        return RunFolder(run_dir).read_record_or_empty()
    except RunFolderError as err:
        raise ReportError(str(err)) from None


def load_run(run_dir: Path) -> RunData:
    """Read ``run.json``, ``scores.parquet`` and (when present) ``selection.parquet``."""
    run_dir = Path(run_dir)
    folder = RunFolder(run_dir)
    try:
        folder.require_dir()
        scores_path = folder.require_scores()
    except RunFolderError as err:
        raise ReportError(str(err)) from None
    run = read_run_json(run_dir)
    try:
        schema = pq.read_schema(scores_path)
    except (OSError, pa.ArrowException) as err:
        raise ReportError(f"{scores_path} is not a readable Parquet file: {err}") from None
    names = set(schema.names)
    if "row" not in names:
        raise ReportError(f"{scores_path} has no 'row' column: not a visa score table")

    notes: list[str] = []
    families = _families(run, schema)
    numeric = [c for f in families for c in ([f.fused] if f.fused else []) + f.agents]
    # ids, lines and messages are strings or unused per row: read later, only for the rows shown
    base = [c for c in ("row", "image_key", "error_kind") if c in names]
    try:
        parquet = pq.ParquetFile(scores_path)
        table = parquet.read(columns=base)
        # one column at a time, so only one Arrow copy of a score column is alive next to the arrays
        values = {c: _floats(parquet.read(columns=[c]).column(0)) for c in numeric}
    except (OSError, pa.ArrowException) as err:
        raise ReportError(f"{scores_path} cannot be read: {err}") from None
    n = table.num_rows
    rows = _ints(table.column("row"))
    if "image_key" in names:
        encoded = pc.dictionary_encode(table.column("image_key")).combine_chunks()
        image_codes = np.asarray(encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)
        image_keys = encoded.dictionary
    else:
        image_codes, image_keys = np.full(n, -1, dtype=np.int64), pa.array([], pa.string())
    error_kind = table.column("error_kind") if "error_kind" in names else None
    error = (
        np.asarray(pc.is_valid(error_kind).to_numpy(zero_copy_only=False), dtype=bool)
        if error_kind is not None
        else np.zeros(n, dtype=bool)
    )
    del table
    categories = _categories(scores_path, schema, n)
    selection = _selection(folder.selection, rows, notes)
    return RunData(
        run_dir=run_dir,
        run=run,
        scores_path=scores_path,
        n=n,
        rows=rows,
        image_codes=image_codes,
        image_keys=image_keys,
        error_kind=error_kind,
        error=error,
        families=families,
        values=values,
        categories=categories,
        selection=selection,
        notes=notes,
    )


def _ints(column: pa.ChunkedArray) -> np.ndarray:
    return np.asarray(column.cast(pa.int64()).fill_null(-1).to_numpy(), dtype=np.int64)


def _floats(column: pa.ChunkedArray) -> np.ndarray:
    values = np.array(column.cast(pa.float64()).to_numpy(), dtype=np.float64)  # a writable copy
    values[~np.isfinite(values)] = np.nan
    return values


def _is_number(kind: pa.DataType) -> bool:
    return pa.types.is_floating(kind) or pa.types.is_integer(kind)


def _families(run: RunRecord, schema: pa.Schema) -> list[Family]:
    """Score families from run.json's agents and shapley sections, completed from the column names.

    Descriptive families (image statistics) are listed too: the report shows them, unfused.
    """
    numeric = {f.name: _is_number(f.type) for f in schema}
    agents, units = fam.families_from_agents(run.agent_dicts(), numeric, scores_only=False)
    for name, columns in fam.families_from_columns(numeric.items(), scores_only=False).items():
        members = agents.setdefault(name, [])
        members.extend(c for c in columns if c not in members)
    for name in list(fam.FAMILIES) + list(run.shapley):
        if numeric.get(name) and name != fam.META:
            agents.setdefault(name, [])
    out = []
    for name in sorted(agents, key=fam.order_key):
        report = run.shapley.get(name)
        unit = units.get(name) or (report.unit if report else None) or fam.default_unit(name)
        fused = name if numeric.get(name) else None
        if fused is None and not agents[name]:
            continue
        out.append(Family(name, str(unit), fused, agents[name], report))
    return out


def _categories(path: Path, schema: pa.Schema, n: int) -> list[Category]:
    """Metadata columns with a small number of distinct values (source, category, kind, ...)."""
    candidates = [
        f.name
        for f in schema
        if f.name.startswith("meta.")
        and (
            pa.types.is_string(f.type)
            or pa.types.is_large_string(f.type)
            or pa.types.is_boolean(f.type)
            or pa.types.is_integer(f.type)
            or pa.types.is_dictionary(f.type)
        )
    ]
    if not candidates or n == 0:
        return []
    parquet = pq.ParquetFile(path)
    found = [c for c in (_category(parquet, name) for name in candidates) if c is not None]
    # prefer the most informative fields: more values first, then the name
    found.sort(key=lambda c: (-len(c.labels), c.column))
    return sorted(found[:MAX_CATEGORY_FIELDS], key=lambda c: c.column)


def _batches(parquet: pq.ParquetFile, name: str):
    for batch in parquet.iter_batches(batch_size=_BATCH, columns=[name]):
        column = batch.column(0)
        yield column.dictionary_decode() if pa.types.is_dictionary(column.type) else column


def _category(parquet: pq.ParquetFile, name: str) -> Category | None:
    """A category column, or None as soon as it has too many distinct values (an id, free text).

    Streams the column in batches, so a column of millions of distinct strings is given up after its
    first batch instead of being hashed whole.
    """
    tally: dict[Any, int] = {}
    kind = None
    present = 0
    for column in _batches(parquet, name):
        kind = column.type
        counts = pc.value_counts(column.drop_null())
        present += len(column) - column.null_count
        for value, count in zip(
            counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True
        ):
            tally[value] = tally.get(value, 0) + count
        if len(tally) > MAX_CATEGORIES:
            return None
    if kind is None or len(tally) < 2 or len(tally) > max(2, present // 2):  # one value per row: an id
        return None
    values = sorted(tally, key=lambda v: (-tally[v], str(v)))
    lookup = pa.array(values, type=kind)
    codes = [
        np.asarray(
            pc.index_in(column, value_set=lookup).fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64
        )
        for column in _batches(parquet, name)
    ]
    return Category(
        name, [_label(v) for v in values], np.concatenate(codes) if codes else np.zeros(0, np.int64)
    )


def _label(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value)


def _selection(path: Path, rows: np.ndarray, notes: list[str]) -> Selection | None:
    if not path.is_file():
        return None
    try:
        parquet = pq.ParquetFile(path)
        sel_rows = _ints(parquet.read(columns=["row"]).column(0))
        if len(sel_rows) != len(rows):
            take = None
        elif np.array_equal(sel_rows, rows):  # as `visa select` writes it: the score table's order
            take = slice(None)
        else:
            order = np.argsort(sel_rows, kind="stable")
            where = np.minimum(np.searchsorted(sel_rows[order], rows), len(rows) - 1)
            take = order[where] if np.array_equal(sel_rows[order[where]], rows) else None
        del sel_rows
        if take is None:
            notes.append(
                f"selection.parquet ignored: its rows do not match the {len(rows):,} rows of scores.parquet "
                "(rerun the selection)"
            )
            return None
        selected = np.asarray(
            parquet.read(columns=["selected"]).column(0).fill_null(False).to_numpy(), dtype=bool
        )[take]
        rank = np.asarray(
            parquet.read(columns=["rank"]).column(0).cast(pa.float64()).to_numpy(), dtype=np.float64
        )[take]
        reasons = parquet.read(columns=["reason"], use_pandas_metadata=False).column(0).cast(pa.string())
    except (OSError, pa.ArrowException, KeyError) as err:
        notes.append(f"selection.parquet ignored: {str(err).splitlines()[0]}")
        return None
    encoded = pc.dictionary_encode(reasons).combine_chunks()
    del reasons
    found = [str(r) for r in encoded.dictionary.to_pylist()]
    known = [r for r in REASON_ORDER if r in found] + sorted(r for r in found if r not in REASON_ORDER)
    remap = np.array([known.index(r) for r in found] + [-1], dtype=np.int8)
    raw = np.asarray(encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)
    reason = remap[raw][take]
    reason[selected] = -1
    return Selection(selected=selected, rank=rank, reason=reason, reasons=known)


def read_rows(path: Path, columns: Sequence[str], positions: Sequence[int]) -> dict[int, dict[str, Any]]:
    """``{position: {column: value}}`` for a few table positions, reading only their row groups."""
    wanted = sorted({int(p) for p in positions})
    if not wanted or not columns:
        return {p: {} for p in wanted}
    parquet = pq.ParquetFile(path)
    present = [c for c in columns if c in parquet.schema_arrow.names]
    out: dict[int, dict[str, Any]] = {p: {} for p in wanted}
    if not present:
        return out
    start = 0
    k = 0
    for group in range(parquet.num_row_groups):
        size = parquet.metadata.row_group(group).num_rows
        local = []
        while k < len(wanted) and wanted[k] < start + size:
            local.append(wanted[k])
            k += 1
        if local:
            part = parquet.read_row_group(group, columns=present)
            picked = part.take(pa.array([p - start for p in local], pa.int64()))
            for name in present:
                for p, value in zip(local, picked.column(name).to_pylist(), strict=True):
                    out[p][name] = value
        start += size
        if k >= len(wanted):
            break
    return out


def aux_columns(schema: pa.Schema, families: Sequence[Family]) -> list[str]:
    """Auxiliary agent fields worth showing beside a thumbnail (``oa.tagger.labels``, sizes, ...)."""
    agents = {a for f in families for a in f.agents}
    out = []
    for f in schema:
        parent, _, leaf = f.name.rpartition(".")
        if (
            parent in agents
            and leaf
            and (
                _is_number(f.type)
                or pa.types.is_string(f.type)
                or pa.types.is_boolean(f.type)
                or (pa.types.is_list(f.type) and pa.types.is_string(f.type.value_type))
            )
        ):
            out.append(f.name)
    return out
