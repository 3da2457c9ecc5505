"""The run folder: every path of a run, its typed record (``run.json``) and the one atomic writer.

Layout of ``RUN_DIR`` (only this module spells these names)::

    run.json            the run record (:class:`RunRecord`): scoring writes it, selection extends it
    scores.parquet      one row per input record: ids, per-agent and fused score columns, errors
    selection.parquet   written by `visa select`: selected, rank, visual / instruction score, reason
    selected.*          the selected records in the input's own format (selected.json, .jsonl, .parquet,
                        or a selected/ folder), written by the input's reader
    dataset_info.json   a LLaMA-Factory entry for the selected records
    report.html         written by `visa report`
    work/               shard outputs and the content-keyed result store (:mod:`visa.store`)
    probes/             probe images, their two small runs and probes.parquet (:mod:`visa.probes.run`)

Every file of a run is written by :func:`atomic_write`: into a temporary file next to the target,
flushed to disk, then renamed over it, so a reader (or a crash) sees the whole old file or the
whole new one (a folder output, :func:`atomic_write_folder`, the same way as a whole folder).
New files get the permissions the user's umask gives any other file.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

if TYPE_CHECKING:
    import pyarrow as pa

    from visa.readers import Input
    from visa.run_lock import RunLock

RUN_JSON = "run.json"
SCORES = "scores.parquet"
SELECTION = "selection.parquet"
DATASET_INFO = "dataset_info.json"
REPORT = "report.html"
WORK = "work"
LOCK = ".lock"
#: the names a reader gives the selected records: a file in the input's format, or a folder
#: (a ``datasets`` folder, or WebDataset shards)
SUBSET_JSON = "selected.json"
SUBSET_JSONL = "selected.jsonl"
SUBSET_PARQUET = "selected.parquet"
SUBSET_FOLDER = "selected"
SUBSET_NAMES = (SUBSET_JSON, SUBSET_JSONL, SUBSET_PARQUET, SUBSET_FOLDER)
PROBES = "probes"
#: inside ``probes/``: the probe table, the probe images, and one input file and sub-run per part
PROBE_TABLE = "probes.parquet"
PROBE_IMAGES = "images"

#: The layout of run.json this release writes; a record without the key is a layout-1 record.
RECORD_VERSION = 1


class RunFolderError(ValueError):
    """The run folder or its record cannot be used; the message is one clear line."""


class NoInputRecorded(RunFolderError):
    """run.json does not name the input the run scored."""


# ---------------------------------------------------------------------------------------------
# The one atomic writer
# ---------------------------------------------------------------------------------------------
def _temporary(path: Path) -> Path:
    # ends in ".tmp": WorkDir.claim removes what a killed writer left behind
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def atomic_write(path: Path, content: bytes | Callable[[Path], None]) -> None:
    """Write ``path`` atomically: ``content`` bytes, or a function that writes the file it is given.

    The temporary file is created like any other file (mode 0666 less the umask), flushed to disk
    and renamed over ``path``; on any error it is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        if isinstance(content, bytes):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "wb") as fh:
                fh.write(content)
                fh.flush()
                os.fsync(fh.fileno())
        else:
            content(tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_folder(path: Path, fill: Callable[[Path], None]) -> None:
    """Write the folder ``path`` atomically: ``fill`` writes the files of the (new, empty) folder it
    is given, which then replaces ``path`` (a folder that was there is removed only after the
    rename). Folders and files get the umask's permissions; on any error ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = _temporary(path), _temporary(path)
    tmp.mkdir()
    try:
        fill(tmp)
        for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
        if path.exists():
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old.exists():
                os.replace(old, path)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def json_bytes(obj: Any) -> bytes:
    """The one JSON layout of a run's files: indented, keys sorted, UTF-8, newline at the end."""
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n").encode()


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON (:func:`json_bytes`) atomically."""
    atomic_write(path, json_bytes(obj))


def atomic_write_table(path: Path, table: pa.Table, **options: Any) -> None:
    """Write ``table`` as Parquet atomically; ``options`` go to ``pyarrow.parquet.write_table``
    (default: zstd compression)."""
    import pyarrow.parquet as pq

    options.setdefault("compression", "zstd")
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, **options))


# ---------------------------------------------------------------------------------------------
# The run record
# ---------------------------------------------------------------------------------------------
class _Section(BaseModel):
    """A run.json section: known fields typed, unknown ones kept as they are."""

    model_config = ConfigDict(extra="allow", protected_namespaces=(), validate_assignment=True)


class InputRecord(_Section):
    """The input the run scored."""

    path: str | None = None
    format: str | None = None
    fingerprint: str | None = None
    image_root: str | None = None


class AgentRecord(_Section):
    """One agent of the run: its score column, family, unit and identity."""

    column: str
    score: str
    name: str | None = None
    type: str | None = None
    unit: str | None = None
    fingerprint: str | None = None
    identity: dict[str, Any] | None = None
    models: Any = None


class Counts(_Section):
    """Record, image, error and malformed-line counts of the scored input."""

    records: int | None = None
    ok: int | None = None
    unique_images: int | None = None
    text_only: int | None = None
    errors: dict[str, int] = Field(default_factory=dict)
    malformed: int | None = None
    malformed_lines: list[int] = Field(default_factory=list)


class ShardCounts(_Section):
    """Shards of the run, how many were already done (resumed), and the shard size."""

    total: int | None = None
    resumed: int | None = None
    size: int | None = None


class AgentTiming(_Section):
    """Items an agent scored in this run, its errors and its seconds."""

    items: int = 0
    errors: int = 0
    seconds: float = 0.0


class Timings(_Section):
    """Per-agent timings and the seconds of the run's phases."""

    agents: dict[str, AgentTiming] = Field(default_factory=dict)
    scoring_seconds: float | None = None
    assemble_seconds: float | None = None
    total_seconds: float | None = None


class ClusterRecord(_Section):
    """The content clusters `visa score` computed (``clusters``; see :mod:`visa.clusters`): the
    embeddings clustered, the k chosen (and each tried k's silhouette), sizes largest first, each
    cluster's most typical row and its centre."""

    embeddings: list[str] = Field(default_factory=list)
    k: int | None = None
    chosen_by: str | None = None
    silhouette: dict[str, float] = Field(default_factory=dict)
    sizes: list[int] = Field(default_factory=list)
    typical_rows: list[int | None] = Field(default_factory=list)
    #: each cluster's centre in the reduced space, in cluster id order (absent before this field existed)
    centres: list[list[float]] = Field(default_factory=list)


class ProbeFusion(_Section):
    """The probe game behind one family's weights (``shapley.<family>.probes``; see
    :mod:`visa.probes.value`): per agent its probe AUROC and the 5-95% bootstrap interval of its
    weight, and the agents whose AUROC interval contains 1/2."""

    pairs: int | None = None
    ladders: int | None = None
    probe_auroc: dict[str, float | None] = Field(default_factory=dict)
    interval: dict[str, list[float | None]] = Field(default_factory=dict)
    no_information: list[str] = Field(default_factory=list)


class FamilyFusion(_Section):
    """How fusion combined one family's agents (``shapley.<family>``; see :mod:`visa.fusion`)."""

    unit: str | None = None
    agents: list[str] = Field(default_factory=list)
    #: per agent column; a list follows the order of ``agents``
    weights: dict[str, float] | list[float] = Field(default_factory=dict)
    exact: bool | None = None
    permutations: int | None = None
    calibration_size: int | None = None
    calibration_pool: int | None = None
    seed: int | None = None
    pearson: list[list[float | None]] | None = None
    standardisation: dict[str, dict[str, float]] = Field(default_factory=dict)
    excluded: dict[str, str] = Field(default_factory=dict)
    stderr: dict[str, float] = Field(default_factory=dict)
    note: str | None = None
    #: ``"probes"`` or ``"consensus"`` (absent in records written before the probe value existed)
    value: str | None = None
    warnings: list[str] = Field(default_factory=list)
    probes: ProbeFusion | None = None

    def weight_of(self) -> dict[str, float]:
        """The weights by agent column, whichever form they were recorded in."""
        if isinstance(self.weights, list):
            return dict(zip(self.agents, self.weights, strict=False))
        return dict(self.weights)


class ImagesKept(_Section):
    unique: int | None = None
    kept: int | None = None


class QuotaReport(_Section):
    """How the budget was shared between the values of ``field``; per group: pool, survivors,
    target or cap, selected."""

    field: str | None = None
    mode: str | None = None
    groups: dict[str, dict[str, int]] = Field(default_factory=dict)


class SelectionSummary(_Section):
    """What `visa select` did (``selection``): counts, cut-offs, options, notes and outputs."""

    pool: int | None = None
    budget: int | str | None = None
    budget_rows: int | None = None
    selected: int | None = None
    dropped: dict[str, int] = Field(default_factory=dict)
    images: ImagesKept = Field(default_factory=ImagesKept)
    text_only_rows: int | None = None
    visual_weights: dict[str, float] = Field(default_factory=dict)
    ranked_by: str | None = None
    pt_cut: float | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    quota: QuotaReport | None = None
    #: per-cluster counts when the selection ran within content clusters (see :mod:`visa.selection`)
    clusters: dict[str, Any] | None = None
    notes: list[str] = Field(default_factory=list)
    outputs: dict[str, str] = Field(default_factory=dict)


class RunRecord(_Section):
    """``run.json``: what was run on what, with which agents, what came out and how long it took.

    Scoring writes every section but ``selection``; `visa select` replaces ``shapley`` with the
    weights it fitted and adds ``selection`` (its summary). Every field is optional, so a partial
    record (an older run, a table fused elsewhere) still loads; unknown keys are kept as written.
    """

    record_version: int | None = None
    visa_version: str | None = None
    created: str | None = None
    command: str | None = None
    python: str | None = None
    packages: dict[str, str] = Field(default_factory=dict)
    run_dir: str | None = None
    input: InputRecord | None = None
    recipe: dict[str, Any] | None = None
    agents: list[AgentRecord] = Field(default_factory=list)
    counts: Counts = Field(default_factory=Counts)
    shards: ShardCounts = Field(default_factory=ShardCounts)
    timings: Timings = Field(default_factory=Timings)
    shapley: dict[str, FamilyFusion] = Field(default_factory=dict)
    clusters: ClusterRecord | None = None
    selection: SelectionSummary | None = None
    outputs: dict[str, str] = Field(default_factory=dict)

    def agent_dicts(self) -> list[dict[str, Any]]:
        """The agents as plain mappings (``column``, ``score``, ``unit``, ...)."""
        return [a.model_dump(mode="json") for a in self.agents]

    def to_json(self) -> dict[str, Any]:
        """The record as run.json holds it: the fields that were read or set, nothing invented."""
        return self.model_dump(mode="json", exclude_unset=True)


def _validation_line(err: ValidationError, path: Path, raw: Mapping[str, Any]) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    version = raw.get("visa_version")
    written = f" (written by visa {version})" if isinstance(version, str) else ""
    return f"{path}{written}: field {where}: {first['msg'].removeprefix('Value error, ')}"


def parse_record(raw: Any, path: Path) -> RunRecord:
    """A :class:`RunRecord` from parsed JSON, or a RunFolderError naming the field and the version."""
    if not isinstance(raw, dict):
        raise RunFolderError(f"{path} must hold a JSON object")
    version = raw.get("record_version", 1)
    if isinstance(version, int) and not isinstance(version, bool) and version > RECORD_VERSION:
        raise RunFolderError(
            f"{path} was written by visa {raw.get('visa_version', '(unknown)')} in record layout "
            f"{version}; this visa reads layout {RECORD_VERSION} and older: upgrade visa"
        )
    try:
        return RunRecord.model_validate(raw)
    except ValidationError as err:
        raise RunFolderError(_validation_line(err, path, raw)) from None


# ---------------------------------------------------------------------------------------------
# The folder
# ---------------------------------------------------------------------------------------------
class ProbeFolder:
    """``RUN_DIR/probes``: the probes of a run (:mod:`visa.probes.run`)::

        images/<name>.png        every probe image
        <part>_probes.jsonl      the input of one part ("image", "sample")
        <part>/                  that part's own run folder
        probes.parquet           every probe row with its scores
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)

    @property
    def table(self) -> Path:
        return self.path / PROBE_TABLE

    def image(self, name: str) -> str:
        """The path of probe image ``name`` as records give it (relative to this folder)."""
        return f"{PROBE_IMAGES}/{name}.png"

    def data(self, part: str) -> Path:
        return self.path / f"{part}_probes.jsonl"

    def part(self, part: str) -> RunFolder:
        return RunFolder(self.path / part)


class RunFolder:
    """Every path of one run folder, and reading and writing its record."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @property
    def run_json(self) -> Path:
        return self.path / RUN_JSON

    @property
    def scores(self) -> Path:
        return self.path / SCORES

    @property
    def selection(self) -> Path:
        return self.path / SELECTION

    @property
    def dataset_info(self) -> Path:
        return self.path / DATASET_INFO

    @property
    def report(self) -> Path:
        return self.path / REPORT

    @property
    def work(self) -> Path:
        return self.path / WORK

    @property
    def probes(self) -> ProbeFolder:
        return ProbeFolder(self.path / PROBES)

    # -- checks ----------------------------------------------------------------------------------
    def require_dir(self) -> None:
        """RunFolderError unless the folder exists."""
        if not self.path.is_dir():
            raise RunFolderError(f"run folder not found: {self.path}")

    def require_scores(self) -> Path:
        """The score table's path; RunFolderError when the run has not finished scoring."""
        if not self.scores.is_file():
            raise RunFolderError(f"{self.path} is not a finished run folder: no {SCORES}")
        return self.scores

    def has_record(self) -> bool:
        return self.run_json.is_file()

    def outputs(self) -> list[Path]:
        """Every path a run writes into the folder (files, the selected records, ``work/``, the lock)."""
        names = (RUN_JSON, SCORES, SELECTION, DATASET_INFO, REPORT, WORK, LOCK, *SUBSET_NAMES)
        return [self.path / name for name in names]

    def output_holding(self, path: Path) -> Path | None:
        """The output of this folder that ``path`` is (or lies inside), symlinks resolved; else None."""
        real = Path(os.path.realpath(path))
        base = Path(os.path.realpath(self.path))
        for output in self.outputs():
            target = base / output.name
            if real == target or real.is_relative_to(target):
                return output
        return None

    # -- one writer at a time, one generation at a time -----------------------------------------
    def lock(self, *, wait: bool = False) -> RunLock:
        """The folder's exclusive lock (see :mod:`visa.run_lock`); use as ``with folder.lock():``."""
        from visa.run_lock import RunLock

        return RunLock(self.path, wait=wait)

    def generation(self) -> Generation:
        """A new set of outputs, written aside and installed as a whole (see :class:`Generation`)."""
        return Generation(self.path)

    def recover(self) -> None:
        """Finish or undo an interrupted generation; remove temporary files a crash left (hold the lock)."""
        recover(self.path)

    # -- the record ------------------------------------------------------------------------------
    def read_record(self) -> RunRecord:
        """run.json as a :class:`RunRecord`; RunFolderError (one line) when it is missing or invalid."""
        if not self.has_record():
            raise RunFolderError(f"{self.path} is not a finished run folder: no {RUN_JSON}")
        try:
            raw = json.loads(self.run_json.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise RunFolderError(f"{self.run_json} is not readable JSON: {err}") from None
        return parse_record(raw, self.run_json)

    def read_record_or_empty(self) -> RunRecord:
        """The record, or an empty one when the folder has no run.json (a table scored elsewhere)."""
        return self.read_record() if self.has_record() else RunRecord()

    def write_record(self, record: RunRecord) -> None:
        """Write run.json atomically (sorted keys: the same record gives the same bytes)."""
        record.record_version = RECORD_VERSION
        atomic_write(self.run_json, json_bytes(record.to_json()))

    def write_json(self, path: Path, obj: Any) -> None:
        """Write one of the folder's JSON files atomically."""
        atomic_write_json(path, obj)

    def write_table(self, path: Path, table: pa.Table, **options: Any) -> None:
        """Write one of the folder's Parquet files atomically (``options``: ``pq.write_table``'s)."""
        atomic_write_table(path, table, **options)


# ---------------------------------------------------------------------------------------------
# Outputs written as one generation
# ---------------------------------------------------------------------------------------------
GENERATION_PREFIX = ".generation-"
JOURNAL = ".generation.json"


class Generation:
    """A set of a run folder's outputs that replaces the previous set as a whole (``visa select``).

    Everything is first written into a staging folder ``RUN_DIR/.generation-<token>/`` (through
    :attr:`folder`, a :class:`RunFolder` over it). :meth:`commit` then writes a journal
    (``RUN_DIR/.generation.json``: what to install, what of the old set to remove) atomically, which
    is the commit point, and carries it out: each staged file or folder is renamed over its target,
    old outputs the new set does not have are removed, the journal and the staging folder go.
    A crash before the commit point leaves the old set (the staging folder is removed by the next
    command); a crash after it is completed by the next command (:func:`recover`, which every
    command that opens a run folder runs first). Either way the folder holds the whole old set or
    the whole new one, and nothing temporary stays behind.
    """

    def __init__(self, run_dir: Path | str) -> None:
        self.run_dir = Path(run_dir)
        self.staging = self.run_dir / f"{GENERATION_PREFIX}{secrets.token_hex(6)}"
        self.folder = RunFolder(self.staging)
        self.committed = False

    def __enter__(self) -> Generation:
        recover(self.run_dir)
        self.staging.mkdir(parents=True)
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        if not self.committed:
            shutil.rmtree(self.staging, ignore_errors=True)

    def final(self, staged: Path) -> Path:
        """Where a path of the staging folder lands once committed."""
        return self.run_dir / Path(staged).relative_to(self.staging)

    def commit(self, replaces: Iterable[str] = ()) -> None:
        """Install the staged outputs as one set; ``replaces``: names of the old set to remove when
        the new set has no file of that name (e.g. ``selected.json`` after a selection without records)."""
        install = sorted(os.listdir(self.staging))
        journal = {"staging": self.staging.name, "install": install,
                   "remove": sorted(set(replaces) - set(install))}
        atomic_write(self.run_dir / JOURNAL, json_bytes(journal))
        self.committed = True
        _complete(self.run_dir, journal)


def recover(run_dir: Path | str) -> None:
    """Finish or undo a generation a crash interrupted, and remove leftover temporary files."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    journal_path = run_dir / JOURNAL
    if journal_path.exists():
        try:
            journal = json.loads(journal_path.read_bytes())
            valid = isinstance(journal, dict) and _journal_fields_ok(journal)
        except (OSError, ValueError):
            valid = False
        if valid:
            _complete(run_dir, journal)
        else:
            journal_path.unlink(missing_ok=True)
    for leftover in run_dir.glob(f"{GENERATION_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for temporary in run_dir.glob(".*.tmp"):
        temporary.unlink(missing_ok=True)


def _journal_fields_ok(journal: dict[str, Any]) -> bool:
    names = [*journal.get("install", []), *journal.get("remove", [])]
    staging = journal.get("staging")
    return (
        isinstance(staging, str) and staging.startswith(GENERATION_PREFIX) and "/" not in staging
        and all(isinstance(n, str) and n and "/" not in n and n not in (".", "..") for n in names)
    )


def _complete(run_dir: Path, journal: dict[str, Any]) -> None:
    """Carry out a committed journal; every step can be repeated, so a crash midway is finished later."""
    staging = run_dir / journal["staging"]
    for name in journal["install"]:
        source, target = staging / name, run_dir / name
        if not source.exists() and not source.is_symlink():
            continue  # installed before a crash
        if target.is_dir() and not target.is_symlink():
            old = staging / f"{name}.replaced"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(target, old)
        os.replace(source, target)
    for name in journal["remove"]:
        target = run_dir / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    _fsync_dir(run_dir)
    (run_dir / JOURNAL).unlink(missing_ok=True)
    shutil.rmtree(staging, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def reopen_input(record: RunRecord) -> tuple[Input, bool]:
    """The input the run scored, and whether it changed since (its fingerprint differs).

    Rows of the score table are positions in the input: reading records from an input rewritten
    after scoring reads the wrong ones, so callers either refuse a changed input (selection) or
    check each record they show (the report). Raises NoInputRecorded when run.json names no
    input; the reader's InputError, ImportError (a reader's optional dependency) and OSError pass
    through.
    """
    spec = record.input
    if spec is None or not spec.path:
        raise NoInputRecorded("run.json records no input path")
    from visa.readers import open_input

    source = open_input(spec.path)
    changed = spec.fingerprint is not None and spec.fingerprint != source.fingerprint()
    return source, changed
