"""Selection over a finished run folder: read the scores, fuse, run the stages, write the outputs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from visa.families import IM, PT, VISUAL_FAMILIES, families_from_agents, families_from_columns
from visa.fusion import FusionError, fuse_scores, image_codes
from visa.probes.run import read_probes
from visa.run_folder import (
    DATASET_INFO,
    REPORT,
    SELECTION,
    SUBSET_NAMES,
    NoInputRecorded,
    RunFolder,
    RunFolderError,
    RunRecord,
    reopen_input,
)
from visa.selection.export import DATASET_NAME, dataset_entry, write_selection_table, write_subset
from visa.selection.options import SelectionError, SelectionOptions, resolve_options
from visa.selection.stages import TEXT_HASH, select_table

if TYPE_CHECKING:
    from visa.readers import Input


@dataclass
class SelectionResult:
    """What :func:`select` produced. ``summary`` is what went into run.json under ``selection``."""

    table: pa.Table
    summary: dict[str, Any]
    shapley: dict[str, Any]
    selected_rows: np.ndarray
    selection_path: Path | None = None
    subset_path: Path | None = None
    dataset_info_path: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)


def read_run(run_dir: Path | str) -> RunRecord:
    """``RUN_DIR/run.json`` as a :class:`~visa.run_folder.RunRecord`, or a SelectionError saying
    what is wrong with it."""
    try:
        return RunFolder(run_dir).read_record()
    except RunFolderError as err:
        raise SelectionError(str(err)) from None


def run_families(run: RunRecord, schema: pa.Schema) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Score families (agent columns present in the table) and their units, from run.json's agents.

    Falls back to the column names (``<family>.<agent>``) when run.json lists no agents.
    """
    numeric = {f.name: pa.types.is_floating(f.type) or pa.types.is_integer(f.type) for f in schema}
    if run.agents:
        families, units = families_from_agents(run.agent_dicts(), numeric)
        return families, {f: u for f, u in units.items() if f in families}
    return families_from_columns(numeric.items()), {}


def _read_scores(
    folder: RunFolder, run: RunRecord, options: SelectionOptions
) -> tuple[pa.Table, dict[str, list[str]], dict[str, str]]:
    try:
        path = folder.require_scores()
        schema = pq.read_schema(path)
    except RunFolderError as err:
        raise SelectionError(str(err)) from None
    except (OSError, pa.ArrowException) as err:
        raise SelectionError(
            f"{folder.scores} is not a readable Parquet file ({str(err).splitlines()[0] if str(err) else err!r}): "
            "rerun `visa score` with the same arguments to rebuild it from the run's store"
        ) from None
    families, units = run_families(run, schema)
    wanted = ["row", "sample_id", "image_key", "error_kind", TEXT_HASH]
    if options.quota_field:
        check_quota_field(options.quota_field, schema.names)
        wanted.append(options.quota_field)
    wanted.extend(options.cluster_columns())
    wanted.extend(options.image_gate or {})
    for agents in families.values():
        wanted.extend(agents)
    # families with no agent columns but an already fused column (a table fused elsewhere)
    wanted.extend(f for f in (*VISUAL_FAMILIES, IM, PT) if f not in families)
    columns = list(dict.fromkeys(c for c in wanted if c in schema.names))
    try:
        table = pq.read_table(path, columns=columns, memory_map=True)
    except (OSError, pa.ArrowException) as err:
        raise SelectionError(
            f"{path} is damaged ({str(err).splitlines()[0] if str(err) else type(err).__name__}): rerun "
            "`visa score` with the same arguments to rebuild it from the run's store"
        ) from None
    return table, families, units


def check_quota_field(name: str, columns: list[str]) -> None:
    """A SelectionError with a did-you-mean and the metadata columns there are, unless ``name`` is a
    column of the score table."""
    if name in columns:
        return
    from visa.registry import did_you_mean

    meta = sorted(c for c in columns if c.startswith("meta."))
    shown = ", ".join(meta[:20]) + (f" and {len(meta) - 20} more" if len(meta) > 20 else "")
    raise SelectionError(
        f"quota field '{name}' is not a column of the score table{did_you_mean(name, meta or columns)}; "
        + (f"metadata columns: {shown}" if meta else "the records have no metadata columns")
    )


def stale_outputs(folder: RunFolder, *, keep_records: bool) -> list[str]:
    """The outputs of an earlier selection that the new one does not rewrite and that its commit
    removes: the report and (unless ``keep_records``: they are about to be rewritten) the selected
    records and the LLaMA-Factory entry; names of those that exist."""
    stale = [folder.report]
    if not keep_records:
        stale += [folder.path / name for name in SUBSET_NAMES] + [folder.dataset_info]
    return [path.name for path in stale if path.exists() or path.is_symlink()]


def _refuse_input_among_outputs(folder: RunFolder, run: RunRecord) -> None:
    """Before any work: the input must not be one of the files selection (re)writes."""
    path = run.input.path if run.input is not None else None
    output = folder.output_holding(Path(path)) if path else None
    if output is not None:
        raise SelectionError(
            f"the input {path} is the run folder's own '{output.name}', which selection writes: "
            "move the input (and re-score) or select without writing records into this folder"
        )


def open_source(run: RunRecord) -> Input:
    """The run's input, checked to be unchanged since scoring and writable in its format.

    Rows are positions in the input, so copying records from an input rewritten after scoring
    would copy the wrong ones: a fingerprint that differs from run.json's is an error.
    """
    from visa.readers import InputError

    try:
        source, changed = reopen_input(run)
        if changed:
            raise SelectionError(
                f"the input {run.input.path} changed since it was scored (fingerprint differs); "
                "re-score it, or select without writing records"
            )
        source.check_writable()
    except NoInputRecorded:
        raise SelectionError("run.json has no input.path: cannot write the selected records") from None
    except InputError as err:
        raise SelectionError(f"cannot read the input to copy the selected records: {err}") from None
    except (ImportError, OSError) as err:
        raise SelectionError(str(err)) from None
    return source


def _write_records(
    folder: RunFolder, run: RunRecord, source: Input, result: SelectionResult, summary: dict[str, Any],
    out: RunFolder,
) -> None:
    """The selected records in the input's format and their LLaMA-Factory entry, written into ``out``
    (the staging folder of the new generation of ``folder``'s outputs)."""
    staged = write_subset(source, result.selected_rows, out.path)
    result.subset_path = folder.path / staged.name
    summary["outputs"]["records"] = str(result.subset_path)
    entry, entry_notes = dataset_entry(staged, out.path)
    if entry is not None:
        out.write_json(out.dataset_info, entry)
        result.dataset_info_path = folder.dataset_info
        summary["outputs"]["dataset_info"] = str(folder.dataset_info)
    image_root = run.input.image_root if run.input is not None else None
    if image_root and entry is not None and "images" in entry[DATASET_NAME]["columns"]:
        entry_notes.append(f"image paths are relative to {image_root}: pass it as LLaMA-Factory's media_dir")
    summary["notes"].extend(entry_notes)


def _note_removed(summary: dict[str, Any], folder: RunFolder, removed: list[str]) -> None:
    if removed:
        summary["notes"].append(
            f"removed what described the previous selection: {', '.join(removed)}"
            + (" (run `visa report` for a new report)" if folder.report.name in removed else "")
        )


def _nothing_selected(summary: dict[str, Any]) -> str:
    dropped = ", ".join(f"{n} {reason}" for reason, n in summary["dropped"].items() if n)
    return (
        f"nothing selected from {summary['pool']} rows ({dropped or 'the score table is empty'}); "
        "selection.parquet gives each row's reason"
    )


def _timed(timings: dict[str, float], name: str, started: float) -> None:
    timings[name] = time.perf_counter() - started


def select(
    run_dir: Path | str,
    options: SelectionOptions | None = None,
    *,
    write_records: bool = True,
    update_run: bool = True,
    wait: bool = False,
) -> SelectionResult:
    """Select from a finished run: fuse, run the two stages, write the outputs into ``run_dir``.

    Reads only ``scores.parquet`` and ``run.json`` (plus the input when ``write_records`` copies
    the selected records). Writes ``selection.parquet``; with ``write_records`` the selected
    records in the input's format and ``dataset_info.json``; with ``update_run`` merges
    ``shapley`` and ``selection`` into run.json. What described an earlier selection and is not
    rewritten (``report.html``; without ``write_records`` the selected records and the entry too) is
    removed. Raises SelectionError for a bad run folder or options, and after writing
    selection.parquet when nothing was selected.

    The outputs are one generation (:class:`~visa.run_folder.Generation`): written aside, then
    installed together, replacing the previous selection's files as a whole, so the folder never
    pairs a new selection with old records; a crash leaves the old set or the new one. Holds the
    folder's lock (refused when another command uses the folder, or waits with ``wait``).
    """
    folder = RunFolder(run_dir)
    if not folder.path.is_dir():
        raise SelectionError(f"run folder not found: {folder.path}")
    with folder.lock(wait=wait):
        folder.recover()
        with folder.generation() as generation:
            result = _select(folder, generation.folder, options, write_records, update_run)
            generation.commit(replaces=[SELECTION, DATASET_INFO, REPORT, *SUBSET_NAMES])
    if not result.selected_rows.size:
        raise SelectionError(_nothing_selected(result.summary))
    return result


def _select(
    folder: RunFolder, out: RunFolder, options: SelectionOptions | None, write_records: bool, update_run: bool
) -> SelectionResult:
    """:func:`select`'s work: read ``folder``, write every output into ``out`` (the staging folder)."""
    run = read_run(folder.path)
    _refuse_input_among_outputs(folder, run)
    options = options or resolve_options(run)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    table, families, units = _read_scores(folder, run, options)
    source = open_source(run) if write_records else None  # fail before writing when it cannot be copied
    _timed(timings, "read", started)

    t = time.perf_counter()
    codes = image_codes(table) if "image_key" in table.column_names else None
    _timed(timings, "image_keys", t)

    t = time.perf_counter()
    probes = read_probes(folder.path) if "probes" in (options.value, options.image_keep, options.im_min) else None
    try:
        table, shapley = fuse_scores(
            table, families, units=units, calibration_size=options.calibration_size, seed=options.seed,
            permutations=options.permutations, codes=codes, value=options.value, probes=probes,
        )
    except FusionError as err:
        raise SelectionError(str(err)) from None
    _timed(timings, "fusion", t)

    t = time.perf_counter()
    centres = run.clusters.centres if run.clusters is not None else None
    selection, summary = select_table(
        table, options, units=units, shapley=shapley, codes=codes, probes=probes, cluster_centres=centres
    )
    summary["notes"][:0] = [f"{family}: {line}" for family, r in shapley.items() for line in r.get("warnings", [])]
    _timed(timings, "selection", t)

    t = time.perf_counter()
    write_selection_table(selection, out.selection)
    _timed(timings, "write_selection", t)
    chosen = np.asarray(selection.column("selected").to_numpy(zero_copy_only=False), dtype=bool)
    selected_rows = np.sort(np.asarray(selection.column("row").to_numpy(), dtype=np.int64)[chosen])
    summary["outputs"] = {"selection": str(folder.selection)}

    result = SelectionResult(selection, summary, shapley, selected_rows, selection_path=folder.selection)
    stale = stale_outputs(folder, keep_records=source is not None and selected_rows.size > 0)
    _note_removed(summary, folder, stale)
    if source is not None and selected_rows.size:
        t = time.perf_counter()
        _write_records(folder, run, source, result, summary, out)
        _timed(timings, "write_records", t)
    if update_run:
        record = read_run(folder.path)
        record.shapley = shapley
        record.selection = summary
        out.write_record(record)
    _timed(timings, "total", started)
    result.timings = timings
    return result

