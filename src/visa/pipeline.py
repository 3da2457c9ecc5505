"""Scoring one shard: records in, sample rows and agent results out (executor-independent).

Data flow for one shard of raw records::

    RawRecord -> normalize -> Sample -> sample_id           (malformed records become error rows)
              -> ImageSource.read_bytes -> image_key         (missing/escaping/too-large: error rows)
    unique image keys not yet in the store
              -> decode (once per key) -> image agents       (results keyed by image_key; an agent
                                                        runs after the image agents it needs)
    samples with usable images
              -> sample agents (context from image agents)   (results keyed by a sample hash)
    -> WorkDir: agent results, then sample rows, then the shard's completion marker

The three stages are separate so executors can place them: :func:`prepare_shard` (CPU: parse, read,
hash), :class:`AgentGroup` (some or all agents; models set up once per worker) and
:func:`commit_shard` (sample rows, then the completion marker). The local executor runs them in one
worker through :class:`ShardProcessor`; the Ray executor runs prepare and commit as tasks and one
actor pool per agent.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from visa.agents.base import Agent, ImageItem, Result, SampleItem, Unit
from visa.images import ImageError, ImageLimits, ImageSource, decode_image, decoded_size, image_key
from visa.recipe import BoundAgent, ExecutionSpec, Recipe
from visa.samples import ImageRef, RawRecord, RecordError, Sample, normalize, sample_id, stable_hash
from visa.store import ResultIndex, WorkDir, fingerprint

DECODE_VERSION = "1"
SAMPLE_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("line", pa.int64()),
        ("sample_id", pa.string()),
        ("image_key", pa.string()),
        ("image_keys", pa.list_(pa.string())),
        ("sample_key", pa.string()),
        ("text_hash", pa.string()),
        ("error_kind", pa.string()),
        ("error", pa.string()),
        ("meta", pa.string()),
    ]
)
DECODE_OUTPUTS = {"width": pa.int32(), "height": pa.int32()}


@dataclass
class PlannedAgent:
    """A bound agent with its content fingerprint and how its ``needs`` map to upstream agents."""

    bound: BoundAgent
    fingerprint: str
    identity: dict[str, Any]
    #: needed column -> (upstream PlannedAgent fingerprint, field)
    needs: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def agent(self) -> Agent:
        return self.bound.agent

    @property
    def column(self) -> str:
        return self.bound.column


def plan_agents(recipe: Recipe) -> tuple[list[PlannedAgent], dict[str, Any]]:
    """Fingerprint every agent of the recipe (upstream fingerprints included) and the image decoder.

    Agents come in the order they run (:meth:`Recipe.build_agents`: every image agent after the
    image agents it needs), so each agent's upstream is planned before it.
    """
    planned: list[PlannedAgent] = []
    by_column: dict[str, tuple[PlannedAgent, str]] = {}
    for bound in recipe.build_agents():
        needs: dict[str, tuple[str, str]] = {}
        for column in bound.agent.needs:
            upstream, field_name = by_column[column]
            needs[column] = (upstream.fingerprint, field_name)
        identity = {**bound.agent.identity(), "needs": {c: fp for c, (fp, _) in sorted(needs.items())}}
        item = PlannedAgent(bound, fingerprint(identity), identity, needs)
        planned.append(item)
        if bound.agent.unit == Unit.IMAGE:
            for field_name in bound.agent.outputs:
                by_column[bound.column_of(field_name)] = (item, field_name)
    decode_identity = {"decoder": DECODE_VERSION, "limits": recipe.images.model_dump(mode="json")}
    return planned, {"identity": decode_identity, "fingerprint": fingerprint(decode_identity)}


@dataclass
class AgentStats:
    items: int = 0
    errors: int = 0
    seconds: float = 0.0

    def add(self, other: AgentStats) -> None:
        self.items += other.items
        self.errors += other.errors
        self.seconds += other.seconds


@dataclass
class ShardStats:
    shard: int
    records: int = 0
    skipped: bool = False
    errors: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)  # the first error message of each kind
    malformed_lines: list[int] = field(default_factory=list)
    agents: dict[str, AgentStats] = field(default_factory=dict)
    seconds: float = 0.0


ProgressHook = Callable[[str, int], None]


class WarmAgents:
    """Set-up agents that a run hands on to the next runs of this process (its probe parts).

    Inside :func:`warm_agents`, an :class:`AgentGroup` that finishes keeps its agents loaded here
    instead of tearing them down, and a later group that plans an agent with the same fingerprint
    (same type, version, parameters and upstream agents) uses that instance without a second setup.
    Only agents whose setup succeeded are kept. Worker processes, Ray actors and other threads have
    none: this saves the model loads of the in-process runs that follow each other in one
    ``visa score``.
    """

    def __init__(self) -> None:
        self._agents: dict[str, Agent] = {}

    def take(self, fp: str) -> Agent | None:
        return self._agents.pop(fp, None)

    def keep(self, fp: str, agent: Agent) -> None:
        previous = self._agents.pop(fp, None)
        if previous is not None and previous is not agent:
            previous.teardown()
        self._agents[fp] = agent

    def close(self) -> None:
        agents, self._agents = list(self._agents.values()), {}
        for agent in agents:
            agent.teardown()


#: the innermost :func:`warm_agents` block of this thread (a context variable: runs in other threads
#: of the process never share agents with it)
_WARM: ContextVar[WarmAgents | None] = ContextVar("visa_warm_agents", default=None)


@contextmanager
def warm_agents() -> Iterator[None]:
    """Keep set-up agents for the next run of this thread until the block ends (see
    :class:`WarmAgents`); then tear them all down. A nested block leaves them to the outer one."""
    if _WARM.get() is not None:
        yield
        return
    warm = WarmAgents()
    token = _WARM.set(warm)
    try:
        yield
    finally:
        _WARM.reset(token)
        warm.close()


def _chunks(seq: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


def run_agent_batches(agent: Agent, items: Sequence[Any]) -> list[Result]:
    """Call ``score_batch`` in batches; a batch that raises is retried item by item so one bad item
    never costs the others its result."""
    return [r for batch in _chunks(items, max(1, agent.params.batch_size)) for r in _score_chunk(agent, batch)]


def _score_chunk(agent: Agent, batch: Sequence[Any]) -> list[Result]:
    try:
        out = agent.score_batch(batch)
        if len(out) != len(batch):
            raise RuntimeError(f"score_batch returned {len(out)} results for {len(batch)} items")
        return out
    except Exception as err:  # noqa: BLE001 - isolate the failing item
        if len(batch) == 1:
            return [err]
        return [r for item in batch for r in _score_chunk(agent, [item])]


def results_table(keys: Sequence[str], results: Sequence[Result], outputs: dict[str, pa.DataType]) -> pa.Table:
    """Agent results as a table: ``key``, one column per declared output, ``error``."""
    columns: dict[str, list[Any]] = {name: [] for name in outputs}
    errors: list[str | None] = []
    for result in results:
        problem = _check_result(result, outputs)
        if problem is not None:
            errors.append(problem)
            for name in outputs:
                columns[name].append(None)
            continue
        errors.append(None)
        for name in outputs:
            value = result.get(name)  # type: ignore[union-attr]
            if isinstance(value, float) and math.isnan(value):  # NaN is no score
                value = None
            columns[name].append(value)
    arrays = {"key": pa.array(list(keys), pa.string())}
    for name, kind in outputs.items():
        arrays[name] = pa.array(columns[name], type=kind)
    arrays["error"] = pa.array(errors, pa.string())
    return pa.table(arrays)


def _check_result(result: Result, outputs: dict[str, pa.DataType]) -> str | None:
    if isinstance(result, BaseException):
        lines = str(result).strip().splitlines()
        message = lines[0] if lines else ""
        if isinstance(result, ImageError):
            return message
        return f"{type(result).__name__}: {message}" if message else type(result).__name__
    if not isinstance(result, dict):
        return f"agent returned {type(result).__name__}, not a dict of outputs"
    extra = set(result) - set(outputs)
    if extra:
        return f"agent returned undeclared fields {sorted(extra)}"
    return None


def sample_key(sid: str, sample: Sample, image_keys: Sequence[str]) -> str:
    return stable_hash({"id": sid, "turns": [[t.role, t.text] for t in sample.turns], "images": list(image_keys)})


@dataclass
class PreparedShard:
    """One shard after the CPU-only preparation, on its way through the agents to :func:`commit_shard`.

    ``rows`` are the shard's sample rows (:data:`SAMPLE_SCHEMA`; a record that could not be used
    already carries its error), ``samples`` the parsed samples of the usable rows by record index,
    ``payloads`` the bytes of each unique image key. ``produced`` carries the values that image agents
    computed for this shard and that some sample agent ``needs`` (fingerprint -> key -> field ->
    value), so a sample agent running in another process gets them with the shard.
    """

    shard: int
    rows: list[dict[str, Any]]
    samples: dict[int, Sample]
    payloads: dict[str, bytes]
    stats: ShardStats
    produced: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    #: image keys whose bytes were not kept (over the memory budget): read again when decoded
    reload: dict[str, ImageRef] = field(default_factory=dict)
    image_root: str | None = None
    #: key -> bytes its decoded pixels take, estimated from the image header
    decoded_sizes: dict[str, int] = field(default_factory=dict)
    #: the most bytes of decoded pixels held at once (None: no limit)
    decode_budget: int | None = None

    def drop_inputs(self, *, payloads: bool = True, samples: bool = True) -> None:
        """Forget what no later stage needs (keeps shards small when they travel between processes)."""
        if payloads:
            self.payloads = {}
            self.reload = {}
        if samples:
            self.samples = {}

    def payload(self, key: str, limits: ImageLimits) -> bytes:
        """The bytes of image ``key``: kept in memory, or read again (and checked to be the same image)."""
        data = self.payloads.get(key)
        if data is not None:
            return data
        ref = self.reload[key]
        data = ImageSource(Path(self.image_root or "."), limits).read_bytes(ref)
        if image_key(data) != key:
            raise ImageError("unreadable", f"image file '{ref.describe()}' changed while the run read it")
        return data


@dataclass
class _Reader:
    """Reads a shard's images, keeping at most ``budget`` bytes of file payloads in memory."""

    source: ImageSource
    budget: int | None
    payloads: dict[str, bytes] = field(default_factory=dict)
    reload: dict[str, ImageRef] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    held: int = 0

    def key_of(self, ref: ImageRef) -> str:
        data = self.source.read_bytes(ref)  # raises ImageError
        key = image_key(data)
        if key in self.payloads or key in self.reload:
            return key
        self.sizes[key] = decoded_size(data)
        if ref.data is None and self.budget is not None and self.held + len(data) > self.budget:
            self.reload[key] = ref  # a file: read again when it is decoded
        else:
            self.payloads[key] = data
            self.held += 0 if ref.data is not None else len(data)  # embedded bytes are held by the record
        return key


def prepare_shard(
    shard: int,
    records: Sequence[RawRecord],
    source: ImageSource,
    duplicates: frozenset[str],
    execution: ExecutionSpec | None = None,
) -> PreparedShard:
    """Normalise every record, read its images' bytes and key them by content (no decoding, no store).

    A record that cannot be used becomes a row with its error (``malformed``, ``text_too_long``, or
    the image error's kind). With ``execution``, its memory budget bounds what the shard holds: half
    for image file bytes (beyond it, an image's bytes are read again when decoded), half for decoded
    pixels at once; and conversations longer than ``max_text_chars`` are refused before any agent
    (or tokenizer) sees them.
    """
    budget = execution.memory_budget_bytes // 2 if execution is not None else None
    reader = _Reader(source, budget)
    stats = ShardStats(shard=shard, records=len(records))
    rows: list[dict[str, Any]] = []
    samples: dict[int, Sample] = {}
    for raw in records:
        row: dict[str, Any] = {
            "row": raw.index, "line": raw.line, "sample_id": None, "image_key": None, "image_keys": [],
            "sample_key": None, "text_hash": None, "error_kind": None, "error": None, "meta": None,
        }
        rows.append(row)
        sample = _prepare_row(row, raw, reader, duplicates, stats, execution)
        if sample is not None:
            samples[raw.index] = sample
    return PreparedShard(
        shard, rows, samples, reader.payloads, stats, reload=reader.reload, image_root=str(source.root),
        decoded_sizes=reader.sizes, decode_budget=budget,
    )


def _prepare_row(
    row: dict[str, Any], raw: RawRecord, reader: _Reader, duplicates: frozenset[str], stats: ShardStats,
    execution: ExecutionSpec | None,
) -> Sample | None:
    """Fill ``row`` for one record; the sample when it is usable, else None (the row has the error)."""
    try:
        if raw.record is None:
            raise RecordError(raw.error or "unreadable record")
        sample = normalize(raw)
    except RecordError as err:
        record_id = (raw.record or {}).get("id") if isinstance(raw.record, dict) else None
        row["sample_id"] = str(record_id) if record_id is not None else f"row:{raw.index}"
        message = str(err)
        _fail(row, stats, "malformed", message if message.startswith("line ") else f"line {raw.line}: {message}")
        stats.malformed_lines.append(raw.line)
        return None
    sid = sample_id(sample, duplicates)
    row["sample_id"] = sid
    row["meta"] = json.dumps(sample.meta, ensure_ascii=False, sort_keys=True, default=str)
    size = sum(len(t.text) + 1 for t in sample.turns)  # a turn counts one character more: no endless empty turns
    if execution is not None and size > execution.max_text_chars:
        _fail(row, stats, "text_too_long", f"the conversation has {size - len(sample.turns)} characters in "
              f"{len(sample.turns)} turns, more than execution.max_text_chars={execution.max_text_chars}")
        return None
    keys: list[str] = []
    for position, ref in enumerate(sample.images):
        try:
            keys.append(reader.key_of(ref))
        except ImageError as err:
            where = f" (image {position + 1} of {len(sample.images)})" if len(sample.images) > 1 else ""
            _fail(row, stats, err.kind, f"{err.message}{where}")
            return None
    row["image_keys"] = keys
    row["image_key"] = keys[0] if len(keys) == 1 else (stable_hash(keys) if keys else None)
    row["sample_key"] = sample_key(sid, sample, keys)
    row["text_hash"] = stable_hash([[t.role, t.text] for t in sample.turns])
    return sample


def _budget_chunks(items: Sequence[Any], count: int, cost: Callable[[Any], int], budget: int | None) -> Iterator[list[Any]]:
    """Consecutive chunks of at most ``count`` items whose summed ``cost`` stays within ``budget``
    (an item that alone costs more than the budget makes a chunk of its own)."""
    part: list[Any] = []
    used = 0
    for item in items:
        c = cost(item)
        if part and (len(part) >= count or (budget is not None and used + c > budget)):
            yield part
            part, used = [], 0
        part.append(item)
        used += c
    if part:
        yield part


def _fail(row: dict[str, Any], stats: ShardStats, kind: str, message: str) -> None:
    row["error_kind"], row["error"] = kind, f"{kind}: {message}"
    stats.errors[kind] = stats.errors.get(kind, 0) + 1
    stats.examples.setdefault(kind, row["error"])


def commit_shard(work: WorkDir, prepared: PreparedShard, fingerprints: Sequence[str], seconds: float) -> ShardStats:
    """Write the shard's sample rows, then its completion marker; the shard is done once this returns.

    Run it only after every agent has written its results for the shard: the marker says so.
    """
    stats = prepared.stats
    stats.seconds = seconds
    table = pa.Table.from_pylist(prepared.rows, schema=SAMPLE_SCHEMA)
    marker = {
        "shard": prepared.shard,
        "records": stats.records,
        "agents": list(fingerprints),
        "errors": stats.errors,
        "malformed_lines": stats.malformed_lines,
        "timings": {col: vars(s) for col, s in stats.agents.items()},
        "seconds": stats.seconds,
    }
    work.commit_shard(prepared.shard, table, marker)
    return stats


def needed_fields(agents: Sequence[PlannedAgent]) -> dict[str, tuple[str, ...]]:
    """For each upstream fingerprint, the fields that some agent of ``agents`` reads through ``needs``."""
    fields: dict[str, set[str]] = {}
    for planned in agents:
        for fp, field_name in planned.needs.values():
            fields.setdefault(fp, set()).add(field_name)
    return {fp: tuple(sorted(names)) for fp, names in fields.items()}


def missing_results(
    work: WorkDir, planned: Sequence[PlannedAgent], decode_fp: str, shards: Sequence[int]
) -> dict[int, list[str]]:
    """Done shards whose rows lack a stored result that their marker promises: shard -> what lacks.

    The expectation follows :class:`AgentGroup`: every image key of a usable row has a decode
    result; every image that decoded has a result from each image agent; every usable row whose
    images decoded (or every usable row, for agents that do not use images) has a result from each
    sample agent. A result file lost or removed as damaged thus shows up here, and the shard is redone.
    """
    if not shards:
        return {}
    decoded = work.result_keys(decode_fp)
    failed = work.result_keys(decode_fp, failed=True)
    stored = {p.fingerprint: work.result_keys(p.fingerprint) for p in planned}
    markers = {m["shard"]: set(m["agents"]) for m in work.shard_markers() if isinstance(m.get("shard"), int)}
    missing: dict[int, list[str]] = {}
    for shard in shards:
        table = work.read_shard(shard)
        rows = table.filter(pa.compute.is_null(table.column("error"))).to_pylist()
        covered = markers.get(shard, set())
        lacking = _lacking(rows, planned, covered, decode_fp, decoded, failed, stored)
        if lacking:
            missing[shard] = lacking
    return missing


def _lacking(
    rows: list[dict[str, Any]], planned: Sequence[PlannedAgent], covered: set[str], decode_fp: str,
    decoded: set[str], failed: set[str], stored: dict[str, set[str]],
) -> list[str]:
    image_keys = {k for r in rows for k in r["image_keys"] or ()}
    lacking = ["image decoding"] if decode_fp in covered and not image_keys <= decoded else []
    usable = image_keys - failed
    for p in planned:
        if p.fingerprint not in covered:
            continue
        if p.agent.unit == Unit.IMAGE:
            wanted = usable
        else:
            wanted = {
                r["sample_key"] for r in rows
                if not p.agent.uses_images or not set(r["image_keys"] or ()) & failed
            }
        if not wanted <= stored[p.fingerprint]:
            lacking.append(p.column)
    return lacking


class AgentGroup:
    """Some of a recipe's agents, set up once in one worker and run over prepared shards.

    The local executor runs all agents as one group (images are decoded once per chunk for all of
    them); the Ray executor runs one group per agent, each in its own actor pool. A group keeps, per
    agent, which keys already have results (so nothing is computed twice) and the upstream values its
    sample agents need. With ``refresh=True`` it re-reads, before every shard, only the result files
    other workers wrote since (for long-lived workers sharing a RUN_DIR).
    """

    def __init__(
        self,
        work: WorkDir,
        planned: Sequence[PlannedAgent],
        members: Sequence[PlannedAgent],
        decode_fp: str,
        limits: ImageLimits,
        *,
        refresh: bool = False,
    ):
        self.work = work
        self.members = list(members)
        self.decode_fp = decode_fp
        self.limits = limits
        self.refresh = refresh
        #: fields of member image agents that some agent of the recipe reads (sent with the shard)
        self.produce = {
            fp: names for fp, names in needed_fields(planned).items() if fp in {m.fingerprint for m in self.members}
        }
        reads = needed_fields(self.members)
        own = [m.fingerprint for m in self.members] + [decode_fp]
        self.index: dict[str, ResultIndex] = {
            fp: ResultIndex(work, fp, reads.get(fp, ())) for fp in dict.fromkeys([*own, *reads])
        }
        self._own = own
        self._refreshed: set[str] = set()
        #: agent fingerprint -> its setup running in the background (see :meth:`setup`)
        self._setups: dict[str, Future[None]] = {}
        #: fingerprints of the members set up successfully (what a WarmAgents block may keep)
        self._loaded: set[str] = set()

    def setup(self, *, background: bool = False) -> None:
        """Register the members and set them up (load their models).

        ``background=True`` sets them up one after the other in a thread, in the order they run,
        and returns at once: the first agents work on the first shard while the later ones load
        (a language model's import and load take seconds that the image agents' forwards would
        otherwise wait for). Each agent waits for its own setup before its first item, where an
        error of that setup is raised. Setups compute nothing that reaches a result.
        """
        for planned in self.members:
            self.work.register_agent(planned.fingerprint, {**planned.identity, "column": planned.column})
        for index in self.index.values():
            index.refresh()
        warm, loading = _WARM.get(), []
        for planned in self.members:
            ready = warm.take(planned.fingerprint) if warm is not None else None
            if ready is None:
                loading.append(planned)
            else:  # set up by an earlier run of this process (see WarmAgents)
                planned.bound.agent = ready
                self._loaded.add(planned.fingerprint)
        if not background:
            for planned in loading:
                planned.agent.setup()
                self._loaded.add(planned.fingerprint)
            return
        loader = ThreadPoolExecutor(1, thread_name_prefix="visa-setup")
        self._setups = {planned.fingerprint: loader.submit(planned.agent.setup) for planned in loading}
        loader.shutdown(wait=False)

    def _ready(self, planned: PlannedAgent) -> None:
        """Wait for ``planned``'s background setup; raise its error."""
        future = self._setups.pop(planned.fingerprint, None)
        if future is not None:
            future.result()
            self._loaded.add(planned.fingerprint)

    def teardown(self) -> None:
        setups, self._setups = self._setups, {}
        wait(setups.values())  # never tear down an agent while it is still loading
        self._loaded.update(fp for fp, future in setups.items() if future.exception() is None)
        warm = _WARM.get()
        for planned in self.members:
            if warm is not None and planned.fingerprint in self._loaded:
                warm.keep(planned.fingerprint, planned.agent)
            else:
                planned.agent.teardown()
        self._loaded = set()

    def run(self, prepared: PreparedShard, progress: ProgressHook | None = None) -> None:
        """Run the group's agents over one shard and store their results: image agents first, each
        after the image agents it needs (their values reach it through ``ImageItem.context``), then
        sample agents."""
        self._refreshed = set()
        if self.refresh:
            for fp in self._own:
                self.index[fp].refresh()
            self._refreshed.update(self._own)
        rows = prepared.rows
        keys = sorted({k for r in rows if r["error"] is None for k in r["image_keys"]})
        self._run_image_agents(prepared, keys, progress)
        self._run_sample_agents(prepared, progress)

    # -- internals ----------------------------------------------------------------------------------
    def _decode(self, shard: int, keys: Sequence[str], prepared: PreparedShard) -> dict[str, Any]:
        """Decode images once; record the outcome under the decoder's fingerprint."""
        images: dict[str, Any] = {}
        results: list[Result] = []
        for key in keys:
            try:
                image = decode_image(prepared.payload(key, self.limits), self.limits)
                images[key] = image
                results.append({"width": image.width, "height": image.height})
            except ImageError as err:
                results.append(err)
        index = self.index[self.decode_fp]
        fresh = [k for k in keys if k not in index]
        if fresh:
            by_key = dict(zip(keys, results, strict=True))
            table = results_table(fresh, [by_key[k] for k in fresh], DECODE_OUTPUTS)
            index.mark_seen(self.work.write_results(self.decode_fp, shard, table))
            index.add(table)
        return images

    def _score(self, planned: PlannedAgent, keys: list[str], items: list[Any], stats: ShardStats) -> pa.Table:
        self._ready(planned)
        started = time.perf_counter()
        results = run_agent_batches(planned.agent, items)
        agent_stats = stats.agents.setdefault(planned.column, AgentStats())
        agent_stats.seconds += time.perf_counter() - started
        agent_stats.items += len(items)
        table = results_table(keys, results, planned.agent.outputs)
        agent_stats.errors += table.num_rows - table.column("error").null_count
        return table

    def _remember(self, planned: PlannedAgent, table: pa.Table, prepared: PreparedShard) -> None:
        self.index[planned.fingerprint].add(table)
        names = self.produce.get(planned.fingerprint)
        if names:
            produced = prepared.produced.setdefault(planned.fingerprint, {})
            for row in table.select(["key", *names]).to_pylist():
                produced.setdefault(row.pop("key"), row)

    def _store(self, planned: PlannedAgent, shard: int, tables: list[pa.Table]) -> None:
        if tables:
            path = self.work.write_results(planned.fingerprint, shard, pa.concat_tables(tables))
            self.index[planned.fingerprint].mark_seen(path)

    def _run_image_agents(self, prepared: PreparedShard, keys: list[str], progress: ProgressHook | None) -> None:
        image_agents = [p for p in self.members if p.agent.unit == Unit.IMAGE]
        if not image_agents:
            return
        shard, stats = prepared.shard, prepared.stats
        todo = {p.fingerprint: [k for k in keys if k not in self.index[p.fingerprint]] for p in image_agents}
        need_decode = sorted({k for ks in todo.values() for k in ks})
        chunk = max([16, *(p.agent.params.batch_size for p in image_agents)])
        produced: dict[str, list[pa.Table]] = {p.fingerprint: [] for p in image_agents}
        size = prepared.decoded_sizes.get
        for part in _budget_chunks(need_decode, chunk, lambda k: size(k, 0), prepared.decode_budget):
            images = self._decode(shard, part, prepared)
            for planned in image_agents:
                wanted = [k for k in part if k in images and k not in self.index[planned.fingerprint]]
                if not wanted:
                    continue
                items = [ImageItem(key=k, image=images[k], context=self._context(planned, k, prepared)) for k in wanted]
                table = self._score(planned, wanted, items, stats)
                produced[planned.fingerprint].append(table)
                self._remember(planned, table, prepared)
                if progress:
                    progress(planned.column, len(wanted))
            del images
        for planned in image_agents:
            self._store(planned, shard, produced[planned.fingerprint])

    def _run_sample_agents(self, prepared: PreparedShard, progress: ProgressHook | None) -> None:
        sample_agents = [p for p in self.members if p.agent.unit == Unit.SAMPLE]
        if not sample_agents:
            return
        shard, samples, stats = prepared.shard, prepared.samples, prepared.stats
        good = [r for r in prepared.rows if r["error"] is None and r["row"] in samples]
        produced: dict[str, list[pa.Table]] = {p.fingerprint: [] for p in sample_agents}
        chunk = max([16, *(p.agent.params.batch_size for p in sample_agents)])
        uses_images = any(p.agent.uses_images for p in sample_agents)

        def cost(row: dict[str, Any]) -> int:
            return sum(prepared.decoded_sizes.get(k, 0) for k in row["image_keys"]) if uses_images else 0

        for part in _budget_chunks(good, chunk, cost, prepared.decode_budget):
            waiting = {
                p.fingerprint: [r for r in part if r["sample_key"] not in self.index[p.fingerprint]]
                for p in sample_agents
            }
            keys = sorted(
                {k for p in sample_agents if p.agent.uses_images for r in waiting[p.fingerprint] for k in r["image_keys"]}
            )
            images = self._decode(shard, keys, prepared) if keys else {}
            for planned in sample_agents:
                todo = waiting[planned.fingerprint]
                if planned.agent.uses_images:
                    todo = [r for r in todo if all(k in images for k in r["image_keys"])]
                if not todo:
                    continue
                items = [self._sample_item(planned, r, samples[r["row"]], images, prepared) for r in todo]
                table = self._score(planned, [r["sample_key"] for r in todo], items, stats)
                produced[planned.fingerprint].append(table)
                self._remember(planned, table, prepared)
                if progress:
                    progress(planned.column, len(todo))
        for planned in sample_agents:
            self._store(planned, shard, produced[planned.fingerprint])

    def _upstream(self, fp: str, key: str, prepared: PreparedShard) -> dict[str, Any] | None:
        """An upstream agent's values for ``key``: sent with the shard, known here, or newly stored."""
        values = prepared.produced.get(fp, {}).get(key)
        if values is not None:
            return values
        index = self.index[fp]
        if key not in index.values and fp not in self._refreshed:
            index.refresh()  # another worker may have stored it since; read only its new files
            self._refreshed.add(fp)
        return index.values.get(key)

    def _context(self, planned: PlannedAgent, key: str | None, prepared: PreparedShard) -> dict[str, Any]:
        """The values of the columns ``planned`` needs for image ``key`` (None where there is none)."""
        context: dict[str, Any] = {}
        for column, (fp, field_name) in planned.needs.items():
            values = self._upstream(fp, key, prepared) if key else None
            context[column] = values.get(field_name) if values else None
        return context

    def _sample_item(
        self, planned: PlannedAgent, row: dict[str, Any], sample: Sample, images: dict[str, Any],
        prepared: PreparedShard,
    ) -> SampleItem:
        first = row["image_keys"][0] if row["image_keys"] else None
        return SampleItem(
            key=row["sample_key"],
            sample_id=row["sample_id"],
            turns=sample.turns,
            images=tuple(images[k] for k in row["image_keys"]) if planned.agent.uses_images else (),
            image_keys=tuple(row["image_keys"]),
            context=self._context(planned, first, prepared),
        )


class ShardProcessor:
    """Scores whole shards inside one worker: prepare, all agents as one group, commit.

    Agents are set up once and reused for every shard.
    """

    def __init__(self, recipe: Recipe, image_root: Path, run_dir: Path, duplicates: frozenset[str]):
        self.recipe = recipe
        self.work = WorkDir(run_dir)
        self.source = ImageSource(Path(image_root), recipe.images)
        self.duplicates = duplicates
        self.agents, decode = plan_agents(recipe)
        self.decode_fp: str = decode["fingerprint"]
        self.fingerprints = [a.fingerprint for a in self.agents] + [self.decode_fp]
        self.group = AgentGroup(self.work, self.agents, self.agents, self.decode_fp, recipe.images)
        self._ready = False

    def setup(self) -> None:
        """Set the agents up; their models load in the background while the first agents work."""
        self.group.setup(background=True)
        self._ready = True

    def teardown(self) -> None:
        self.group.teardown()

    def is_done(self, shard: int) -> bool:
        return self.work.shard_done(shard, self.fingerprints)

    def process(self, shard: int, records: Sequence[RawRecord], progress: ProgressHook | None = None) -> ShardStats:
        if not self._ready:
            raise RuntimeError("ShardProcessor.setup() must run before process()")
        started = time.perf_counter()
        prepared = prepare_shard(shard, records, self.source, self.duplicates, self.recipe.execution)
        self.group.run(prepared, progress)
        return commit_shard(self.work, prepared, self.fingerprints, time.perf_counter() - started)
