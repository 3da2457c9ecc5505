"""`visa score`: read the input, run the recipe's agents over shards, write the score table and run record."""

from __future__ import annotations

import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from itertools import islice
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from visa import __version__
from visa.assemble import assemble
from visa.executors.base import Executor, RunPlan
from visa.families import is_score
from visa.fusion import unique_image_count
from visa.pipeline import AgentStats, PlannedAgent, ShardStats, missing_results, plan_agents, warm_agents
from visa.progress import RunProgress
from visa.readers import Input, InputError, duplicate_ids, open_input
from visa.recipe import Recipe, RecipeError
from visa.run_folder import RunFolder, RunRecord
from visa.samples import RawRecord
from visa.store import WorkDir
from visa.threads import AUTO, resolve_threads

RECORDED_PACKAGES = (
    "torch", "transformers", "pyarrow", "pillow", "scikit-image", "numpy", "sentence-transformers",
    "rapidocr-onnxruntime", "onnxruntime", "vllm", "ray", "datasets",
)
MAX_REPAIR_NOTES = 20


@dataclass
class _Tally:
    shards: int = 0
    resumed: int = 0
    agents: dict[str, AgentStats] = field(default_factory=dict)
    fresh_records: int = 0  # records of the shards scored by this call (not resumed)
    missing: int = 0
    missing_example: str | None = None

    def add(self, stats: ShardStats) -> None:
        self.shards = max(self.shards, stats.shard + 1)
        if stats.skipped:
            self.resumed += 1
        else:
            self.fresh_records += stats.records
            self.missing += stats.errors.get("missing", 0)
            self.missing_example = self.missing_example or stats.examples.get("missing")
        for column, agent_stats in stats.agents.items():
            self.agents.setdefault(column, AgentStats()).add(agent_stats)

    def check_missing(self) -> None:
        """Raise :class:`MissingImages` when more than half of the records scored so far have
        ``missing`` images."""
        if self.missing > MISSING_SHARE * self.fresh_records:
            raise MissingImages(_missing_message(self.missing, self.fresh_records, self.missing_example, True))


class _CountingIds:
    """Wraps an input so the id pre-pass also counts the records (for the progress bar's total)."""

    def __init__(self, inp: Input, progress: RunProgress):
        self.inp, self.progress, self.count, self._passes = inp, progress, 0, 0
        self._task = progress.stage("indexing ids", inp.num_records(), "rec")

    def iter_ids(self) -> Iterator[object | None]:
        self._passes += 1
        for value in self.inp.iter_ids():
            if self._passes == 1:
                self.count += 1
                if self.progress.progress is not None and self._task is not None and self.count % 4096 == 0:
                    self.progress.progress.advance(self._task, 4096)
            yield value
        if self._passes == 1 and self.progress.progress is not None and self._task is not None:
            self.progress.progress.update(self._task, completed=self.count, total=self.count)


def check_runnable(recipe: Recipe, *, reach: bool = True) -> None:
    """Fail before any work when an agent's optional dependency (or its backend's) is missing, or
    (``reach``) a model's weights are neither here nor reachable or an endpoint does not answer
    (:mod:`visa.preflight`; seconds, no retries)."""
    from visa.backends.registry import BackendSpec, missing_backend

    problems = []
    for bound in recipe.build_agents():
        missing = type(bound.agent).missing_requirements()
        backend = getattr(bound.agent.params, "backend", None)
        if isinstance(backend, BackendSpec) and (hint := missing_backend(backend.type)):
            missing.append(hint)
        if missing:
            problems.append(f"{bound.column} needs {', '.join(missing)}")
    if problems:
        raise RecipeError(f"recipe '{recipe.name}' cannot run here: " + "; ".join(problems))
    if reach:
        from visa import preflight

        unreachable = preflight.problems(recipe)
        if unreachable:
            more = f" (and {len(unreachable) - 1} more)" if len(unreachable) > 1 else ""
            raise RecipeError(f"recipe '{recipe.name}' cannot run here: {unreachable[0]}{more}")


class MissingImages(InputError):
    """Most records so far name image files that do not exist: almost always a wrong image root."""


MISSING_SHARE = 0.5
"""The run stops when more than this share of the records read so far have ``missing`` images."""


def _missing_message(missing: int, rows: int, example: str | None, resumable: bool) -> str:
    example = f" ({example.removeprefix('missing: ')})" if example else ""
    tail = "; rerun with another --out" if resumable else ""
    return (
        f"{missing} of the first {rows} records name image files that do not exist{example}: pass the "
        f"folder that holds them with --image-root (or --allow-missing-images to score anyway){tail}"
    )


def open_checked(
    recipe: Recipe, data: Path, image_root: Path | None, *, stop_on_missing: bool
) -> tuple[Input, Path, Path]:
    """Open the input and check it before any model loads: it has records and (with
    ``stop_on_missing``) the first shard's images mostly exist. Returns the input, the resolved data
    path and the image root (``image_root``, else the data's folder)."""
    inp = open_input(data)
    data = Path(data).resolve()
    root = Path(image_root).resolve() if image_root else (data if data.is_dir() else data.parent)
    first_shard = list(islice(inp.iter_raw(), recipe.execution.shard_size))
    if not first_shard:
        raise InputError(f"{data}: the input holds no records")
    if stop_on_missing:
        check_images_resolve(first_shard, root, recipe)
    return inp, data, root


def check_images_resolve(records: list[RawRecord], root: Path, recipe: Recipe) -> None:
    """Before any model loads: read the first shard's image references (bytes only, no decoding) and
    raise :class:`MissingImages` when more than half of its records name files that do not exist."""
    from visa.images import ImageSource
    from visa.pipeline import prepare_shard

    rows = prepare_shard(0, records, ImageSource(root, recipe.images), frozenset()).rows
    missing = [r for r in rows if r["error_kind"] == "missing"]
    if rows and len(missing) > MISSING_SHARE * len(rows):
        raise MissingImages(_missing_message(len(missing), len(rows), missing[0]["error"], False))


def score(
    recipe: Recipe,
    data: Path,
    run_dir: Path,
    *,
    image_root: Path | None = None,
    workers: int = 1,
    executor: Executor | None = None,
    progress: RunProgress | None = None,
    stop_on_missing: bool = True,
    wait: bool = False,
) -> dict[str, Any]:
    """Score ``data`` with ``recipe`` into ``run_dir``; returns the run record (also in run.json) as
    a JSON-able dict.

    Raises InputError for an input without records and, with ``stop_on_missing``, :class:`MissingImages`
    when more than half of the records read so far name image files that do not exist (checked on the
    first shard before any model loads, then after every shard).

    Holds the run folder's lock (:class:`~visa.run_lock.RunLock`) throughout: a second command on
    the same folder is refused (``RunFolderBusy``), or waits with ``wait=True``. An input that is
    one of the run folder's own files is refused before any work.
    """
    check_input_not_in_outputs(Path(data), Path(run_dir))
    check_runnable(recipe)  # all before the lock, which creates the folder: a refused run leaves nothing
    inp, data, root = open_checked(recipe, data, image_root, stop_on_missing=stop_on_missing)
    folder = RunFolder(run_dir)
    with folder.lock(wait=wait), warm_agents():  # the probe parts reuse the pool run's loaded models
        folder.recover()
        return _score(
            recipe, inp, data, root, run_dir, workers=workers, executor=executor, progress=progress,
            stop_on_missing=stop_on_missing,
        )


def with_fixed_threads(recipe: Recipe, executor: Any) -> Recipe:
    """``recipe`` with ``execution.threads: auto`` replaced by the count this run uses: what the
    executor's ``auto_threads()`` says (the local one: this process's CPUs divided among its
    workers), else all the CPUs this process may use (:func:`visa.threads.resolve_threads`)."""
    if recipe.execution.threads != AUTO:
        return recipe
    auto = getattr(executor, "auto_threads", None)
    threads = auto() if callable(auto) else resolve_threads(AUTO)
    execution = recipe.execution.model_copy(update={"threads": threads})
    return recipe.model_copy(update={"execution": execution})


def check_input_not_in_outputs(data: Path, run_dir: Path) -> None:
    """Raise InputError when ``data`` is (or is inside) a file or folder that a run writes into
    ``run_dir``, or when ``run_dir`` lies inside an input folder."""
    real = Path(os.path.realpath(data))
    if real.is_dir() and Path(os.path.realpath(run_dir)).is_relative_to(real):
        raise InputError(f"the run folder {run_dir} is inside the input folder {data}: choose an --out outside it")
    output = RunFolder(run_dir).output_holding(data)
    if output is not None:
        raise InputError(
            f"the input {data} is the run folder's own '{output.name}', which the run writes: "
            "move the input or choose another --out"
        )


def _score(
    recipe: Recipe,
    inp: Input,
    data: Path,
    root: Path,
    run_dir: Path,
    *,
    workers: int = 1,
    executor: Any = None,
    progress: RunProgress | None = None,
    stop_on_missing: bool = True,
) -> dict[str, Any]:
    started = time.perf_counter()
    progress = progress or RunProgress(None)
    if recipe.execution.hf_offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
    run_dir = Path(run_dir)
    folder = RunFolder(run_dir)
    work = WorkDir(run_dir)
    resuming = work.claim(
        {
            "input": str(data),
            "input_fingerprint": inp.fingerprint(),
            "image_root": str(root),
            "shard_size": recipe.execution.shard_size,
        }
    )

    planned, decode = plan_agents(recipe)
    if resuming:
        _redo_incomplete_shards(work, planned, decode["fingerprint"])

    counting = _CountingIds(inp, progress)
    duplicates = duplicate_ids(counting)  # type: ignore[arg-type]
    progress.start_records(counting.count)

    if executor is None:
        from visa.executors.local import LocalExecutor

        executor = LocalExecutor(workers)
    recipe = with_fixed_threads(recipe, executor)  # before anything runs: run.json records the number
    tally = _Tally()

    def on_shard(stats: ShardStats) -> None:
        tally.add(stats)
        progress.records(stats.records)
        if stop_on_missing:
            tally.check_missing()

    scoring_started = time.perf_counter()
    plan = RunPlan(recipe, inp.iter_raw(), root, run_dir, duplicates)
    executor.run(plan, on_shard, progress.items)
    scoring_seconds = time.perf_counter() - scoring_started

    assemble_started = time.perf_counter()
    table = assemble(work, tally.shards, planned, decode["fingerprint"])
    assemble_seconds = time.perf_counter() - assemble_started
    probes_section, probe_table = _probes(recipe, run_dir, table, inp, root, workers, executor, scoring_seconds)
    pool_started = time.perf_counter()
    table, shapley, clusters = _pool_steps(table, planned, recipe, probe_table)
    folder.write_table(folder.scores, table)
    assemble_seconds += time.perf_counter() - pool_started

    notes = _notes(work, table.num_rows, folder)
    markers = work.shard_markers()
    malformed_lines = sorted(line for m in markers for line in m["malformed_lines"])
    errors = Counter(k for k in table.column("error_kind").to_pylist() if k is not None)
    ok = table.filter(pc.is_null(table.column("error")))
    record = RunRecord.model_validate({
        "visa_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "python": platform.python_version(),
        "packages": _package_versions(),
        "run_dir": str(run_dir),
        "input": {"path": str(data), "format": inp.format, "fingerprint": inp.fingerprint(), "image_root": str(root)},
        "recipe": recipe.model_dump(mode="json"),
        "agents": [
            {
                "column": p.column,
                "score": p.bound.score,
                "name": p.bound.name,
                "type": type(p.agent).__name__,
                "unit": str(p.agent.unit),
                "fingerprint": p.fingerprint,
                "identity": p.identity,
                "models": p.agent.models(),
            }
            for p in planned
        ],
        "counts": {
            "records": table.num_rows,
            "ok": ok.num_rows,
            "unique_images": unique_image_count(table),
            "text_only": sum(1 for ks in ok.column("image_keys").to_pylist() if not ks),
            "errors": dict(sorted(errors.items())),
            "malformed": len(malformed_lines),
            "malformed_lines": malformed_lines[:1000],
        },
        "shards": {"total": tally.shards, "resumed": tally.resumed, "size": recipe.execution.shard_size},
        "timings": {
            "agents": {
                column: {"items": s.items, "errors": s.errors, "seconds": round(s.seconds, 3)}
                for column, s in tally.agents.items()
            },
            "scoring_seconds": round(scoring_seconds, 3),
            "assemble_seconds": round(assemble_seconds, 3),
            "total_seconds": round(time.perf_counter() - started, 3),
        },
        "shapley": shapley,
        "clusters": clusters,
        "outputs": {"scores": str(folder.scores)},
        "notes": notes,
        **({"probes": probes_section} if probes_section is not None else {}),
    })
    folder.write_record(record)
    return record.to_json()


def _pool_steps(
    table: pa.Table, planned: list[PlannedAgent], recipe: Recipe, probes: pa.Table | None
) -> tuple[pa.Table, dict[str, Any], dict[str, Any] | None]:
    """Steps over the whole assembled table: Shapley fusion of every score family (valued on the
    probes when the run has them, else by consensus), then the recipe's content clusters. Returns
    the table and the two run.json sections."""
    families: dict[str, list[str]] = {}
    units: dict[str, str] = {}
    for p in planned:
        if is_score(p.bound.score) and "score" in p.agent.all_outputs():
            families.setdefault(p.bound.score, []).append(p.column)
            units[p.bound.score] = str(p.agent.unit)
    shapley: dict[str, Any] = {}
    if families:
        from visa.fusion import fuse_scores

        value = "probes" if probes is not None else "consensus"
        table, shapley = fuse_scores(table, families, units=units, value=value, probes=probes)
    clusters: dict[str, Any] | None = None
    if recipe.clusters is not None:
        from visa.clusters import add_clusters

        table, clusters = add_clusters(table, recipe.clusters)
    return table, shapley, clusters


def _notes(work: WorkDir, rows: int, folder: RunFolder) -> list[str]:
    """What the run summary says besides the counts: repairs of the store, an empty input."""
    notes = [f"repaired: {line}" for line in work.repairs[:MAX_REPAIR_NOTES]]
    if len(work.repairs) > MAX_REPAIR_NOTES:
        notes.append(f"repaired: {len(work.repairs) - MAX_REPAIR_NOTES} more damaged or missing pieces")
    if rows == 0:
        notes.append(f"the input holds no records: {folder.scores.name} is an empty table")
    return notes


def _redo_incomplete_shards(work: WorkDir, planned: list[PlannedAgent], decode_fp: str) -> None:
    """Shards marked done whose results the store no longer holds are redone (and said so)."""
    for shard, lacking in missing_results(work, planned, decode_fp, work.done_shards()).items():
        work.invalidate_shard(shard)
        work.repairs.append(f"shard {shard}: results of {', '.join(lacking)} were missing; the shard is redone")


def _probes(
    recipe: Recipe, run_dir: Path, table: Any, inp: Input, root: Path, workers: int, executor: Any,
    scoring_seconds: float,
) -> tuple[dict[str, Any] | None, Any]:
    """Score the run's probes (when the recipe asks for them and has a score family for them to
    weigh or calibrate): the run.json section and the probe table.

    The section records the probes' own cost next to the pool's (``share`` = probe seconds over
    pool scoring plus probe seconds).
    """
    if not recipe.probes.enabled or table.num_rows == 0 or not any(is_score(name) for name in recipe.scores):
        return None, None
    from visa.probes.run import read_probes, run_probes

    def score_part(part: Recipe, data: Path, folder: Path, image_root: Path) -> dict[str, Any]:
        return score(part, data, folder, image_root=image_root, workers=workers, executor=executor)

    section = run_probes(recipe, run_dir, table, inp, root, score_part)
    total = scoring_seconds + section["seconds"]
    section["share_of_scoring"] = round(section["seconds"] / total, 3) if total > 0 else None
    return section, read_probes(run_dir)


def _package_versions() -> dict[str, str]:
    versions = {}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions
