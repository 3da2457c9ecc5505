"""Scoring one shard: records in, sample rows and agent results out (executor-independent).

Data flow for one shard of raw records::

    RawRecord -> normalize -> Sample -> sample_id           (malformed records become error rows)
              -> ImageSource.read_bytes -> image_key         (missing/escaping/too-large: error rows)
    unique image keys not yet in the store
              -> decode (once per key) -> image agents       (results keyed by image_key)
    samples with usable images
              -> sample agents (context from image agents)   (results keyed by a sample hash)
    -> WorkDir: agent results, then sample rows, then the shard's completion marker

Executors (local, Ray) decide where shards run; they all call :class:`ShardProcessor`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from visa.agents.base import Agent, ImageItem, Result, SampleItem, Unit
from visa.images import ImageError, ImageSource, decode_image, image_key
from visa.recipe import BoundAgent, Recipe, RecipeError
from visa.samples import RawRecord, RecordError, Sample, normalize, sample_id, stable_hash
from visa.store import WorkDir, fingerprint

DECODE_VERSION = "1"
SAMPLE_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("line", pa.int64()),
        ("sample_id", pa.string()),
        ("image_key", pa.string()),
        ("image_keys", pa.list_(pa.string())),
        ("sample_key", pa.string()),
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
    """Fingerprint every agent of the recipe (upstream fingerprints included) and the image decoder."""
    planned: list[PlannedAgent] = []
    by_column: dict[str, tuple[PlannedAgent, str]] = {}
    for bound in recipe.build_agents():
        needs: dict[str, tuple[str, str]] = {}
        for column in bound.agent.needs:
            if column not in by_column:
                raise RecipeError(
                    f"agent {bound.column} needs column '{column}', which no image agent of recipe "
                    f"'{recipe.name}' produces"
                )
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
    malformed_lines: list[int] = field(default_factory=list)
    agents: dict[str, AgentStats] = field(default_factory=dict)
    seconds: float = 0.0


ProgressHook = Callable[[str, int], None]


def _chunks(seq: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


def run_agent_batches(agent: Agent, items: Sequence[Any]) -> list[Result]:
    """Call ``score_batch`` in batches; a batch that raises is retried item by item so one bad item
    never costs the others its result."""
    results: list[Result] = []
    for batch in _chunks(items, max(1, agent.params.batch_size)):
        try:
            out = agent.score_batch(batch)
            if len(out) != len(batch):
                raise RuntimeError(f"score_batch returned {len(out)} results for {len(batch)} items")
        except Exception as err:  # noqa: BLE001 - isolate the failing item
            if len(batch) == 1:
                out = [err]
            else:
                out = [r for item in batch for r in run_agent_batches_single(agent, item)]
        results.extend(out)
    return results


def run_agent_batches_single(agent: Agent, item: Any) -> list[Result]:
    try:
        out = agent.score_batch([item])
        return out if len(out) == 1 else [RuntimeError("score_batch returned a wrong number of results")]
    except Exception as err:  # noqa: BLE001
        return [err]


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
            if isinstance(value, float) and value != value:  # NaN is no score
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


class ShardProcessor:
    """Scores shards inside one worker: agents are set up once and reused for every shard."""

    def __init__(self, recipe: Recipe, image_root: Path, run_dir: Path, duplicates: frozenset[str]):
        self.recipe = recipe
        self.work = WorkDir(run_dir)
        self.source = ImageSource(Path(image_root), recipe.images)
        self.duplicates = duplicates
        self.agents, decode = plan_agents(recipe)
        self.decode_fp: str = decode["fingerprint"]
        self.fingerprints = [a.fingerprint for a in self.agents] + [self.decode_fp]
        self.known: dict[str, set[str]] = {}
        self.context_cache: dict[str, dict[str, dict[str, Any]]] = {}
        self._ready = False

    def setup(self) -> None:
        for planned in self.agents:
            self.work.register_agent(planned.fingerprint, {**planned.identity, "column": planned.column})
        for fp in self.fingerprints:
            self.known[fp] = self.work.known_keys(fp)
        upstream = {fp for planned in self.agents for fp, _ in planned.needs.values()}
        for fp in upstream:
            fields = sorted({f for p in self.agents for ufp, f in p.needs.values() if ufp == fp})
            table = self.work.read_results(fp)
            cache: dict[str, dict[str, Any]] = {}
            if table is not None:
                for row in table.select(["key", *fields]).to_pylist():
                    cache[row.pop("key")] = row
            self.context_cache[fp] = cache
        for planned in self.agents:
            planned.agent.setup()
        self._ready = True

    def teardown(self) -> None:
        for planned in self.agents:
            planned.agent.teardown()

    def is_done(self, shard: int) -> bool:
        return self.work.shard_done(shard, self.fingerprints)

    # -- one shard --------------------------------------------------------------------------------
    def process(self, shard: int, records: Sequence[RawRecord], progress: ProgressHook | None = None) -> ShardStats:
        if not self._ready:
            raise RuntimeError("ShardProcessor.setup() must run before process()")
        started = time.perf_counter()
        stats = ShardStats(shard=shard, records=len(records))
        rows, payloads, samples = self._prepare(records, stats)
        image_keys = sorted({k for r in rows if r["error"] is None for k in r["image_keys"]})
        self._run_image_agents(shard, image_keys, payloads, stats, progress)
        self._run_sample_agents(shard, rows, samples, payloads, stats, progress)
        table = pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)
        stats.seconds = time.perf_counter() - started
        marker = {
            "shard": shard,
            "records": len(records),
            "agents": self.fingerprints,
            "errors": stats.errors,
            "malformed_lines": stats.malformed_lines,
            "timings": {col: vars(s) for col, s in stats.agents.items()},
            "seconds": stats.seconds,
        }
        self.work.commit_shard(shard, table, marker)
        return stats

    def _prepare(
        self, records: Sequence[RawRecord], stats: ShardStats
    ) -> tuple[list[dict[str, Any]], dict[str, bytes], dict[int, Sample]]:
        rows: list[dict[str, Any]] = []
        payloads: dict[str, bytes] = {}
        samples: dict[int, Sample] = {}
        for raw in records:
            row: dict[str, Any] = {
                "row": raw.index, "line": raw.line, "sample_id": None, "image_key": None, "image_keys": [],
                "sample_key": None, "error_kind": None, "error": None, "meta": None,
            }
            rows.append(row)
            try:
                if raw.record is None:
                    raise RecordError(raw.error or "unreadable record")
                sample = normalize(raw)
            except RecordError as err:
                record_id = (raw.record or {}).get("id") if isinstance(raw.record, dict) else None
                row["sample_id"] = str(record_id) if record_id is not None else f"row:{raw.index}"
                self._fail(row, stats, "malformed", f"line {raw.line}: {err}")
                stats.malformed_lines.append(raw.line)
                continue
            sid = sample_id(sample, self.duplicates)
            row["sample_id"] = sid
            row["meta"] = json.dumps(sample.meta, ensure_ascii=False, sort_keys=True, default=str)
            keys: list[str] = []
            for position, ref in enumerate(sample.images):
                try:
                    data = self.source.read_bytes(ref)
                except ImageError as err:
                    where = f" (image {position + 1} of {len(sample.images)})" if len(sample.images) > 1 else ""
                    self._fail(row, stats, err.kind, f"{err.message}{where}")
                    break
                key = image_key(data)
                payloads.setdefault(key, data)
                keys.append(key)
            if row["error"] is not None:
                continue
            row["image_keys"] = keys
            row["image_key"] = keys[0] if len(keys) == 1 else (stable_hash(keys) if keys else None)
            row["sample_key"] = sample_key(sid, sample, keys)
            samples[raw.index] = sample
        return rows, payloads, samples

    @staticmethod
    def _fail(row: dict[str, Any], stats: ShardStats, kind: str, message: str) -> None:
        row["error_kind"], row["error"] = kind, f"{kind}: {message}"
        stats.errors[kind] = stats.errors.get(kind, 0) + 1

    def _decode(self, shard: int, keys: Sequence[str], payloads: dict[str, bytes]) -> dict[str, Any]:
        """Decode images once; record the outcome under the decoder's fingerprint."""
        images: dict[str, Any] = {}
        results: list[Result] = []
        for key in keys:
            try:
                image = decode_image(payloads[key], self.recipe.images)
                images[key] = image
                results.append({"width": image.width, "height": image.height})
            except ImageError as err:
                results.append(err)
        fresh = [k for k in keys if k not in self.known[self.decode_fp]]
        if fresh:
            by_key = dict(zip(keys, results, strict=True))
            self.work.write_results(
                self.decode_fp, shard, results_table(fresh, [by_key[k] for k in fresh], DECODE_OUTPUTS)
            )
            self.known[self.decode_fp].update(fresh)
        return images

    def _stats_for(self, stats: ShardStats, column: str) -> AgentStats:
        return stats.agents.setdefault(column, AgentStats())

    def _score(self, planned: PlannedAgent, keys: list[str], items: list[Any], stats: ShardStats) -> pa.Table:
        started = time.perf_counter()
        results = run_agent_batches(planned.agent, items)
        agent_stats = self._stats_for(stats, planned.column)
        agent_stats.seconds += time.perf_counter() - started
        agent_stats.items += len(items)
        table = results_table(keys, results, planned.agent.outputs)
        agent_stats.errors += table.num_rows - table.column("error").null_count
        return table

    def _remember(self, planned: PlannedAgent, table: pa.Table) -> None:
        self.known[planned.fingerprint].update(table.column("key").to_pylist())
        cache = self.context_cache.get(planned.fingerprint)
        if cache is not None:
            for row in table.to_pylist():
                cache[row.pop("key")] = row

    def _run_image_agents(
        self, shard: int, keys: list[str], payloads: dict[str, bytes], stats: ShardStats,
        progress: ProgressHook | None,
    ) -> None:
        image_agents = [p for p in self.agents if p.agent.unit == Unit.IMAGE]
        todo = {p.fingerprint: [k for k in keys if k not in self.known[p.fingerprint]] for p in image_agents}
        need_decode = sorted({k for ks in todo.values() for k in ks})
        chunk = max([16, *(p.agent.params.batch_size for p in image_agents)])
        produced: dict[str, list[pa.Table]] = {p.fingerprint: [] for p in image_agents}
        for part in _chunks(need_decode, chunk):
            images = self._decode(shard, part, payloads)
            for planned in image_agents:
                wanted = [k for k in part if k in images and k not in self.known[planned.fingerprint]]
                if not wanted:
                    continue
                items = [ImageItem(key=k, image=images[k]) for k in wanted]
                table = self._score(planned, wanted, items, stats)
                produced[planned.fingerprint].append(table)
                self._remember(planned, table)
                if progress:
                    progress(planned.column, len(wanted))
            del images
        for planned in image_agents:
            if produced[planned.fingerprint]:
                self.work.write_results(planned.fingerprint, shard, pa.concat_tables(produced[planned.fingerprint]))

    def _run_sample_agents(
        self, shard: int, rows: list[dict[str, Any]], samples: dict[int, Sample], payloads: dict[str, bytes],
        stats: ShardStats, progress: ProgressHook | None,
    ) -> None:
        sample_agents = [p for p in self.agents if p.agent.unit == Unit.SAMPLE]
        if not sample_agents:
            return
        good = [r for r in rows if r["error"] is None and r["row"] in samples]
        produced: dict[str, list[pa.Table]] = {p.fingerprint: [] for p in sample_agents}
        chunk = max([16, *(p.agent.params.batch_size for p in sample_agents)])
        for part in _chunks(good, chunk):
            waiting = {
                p.fingerprint: [r for r in part if r["sample_key"] not in self.known[p.fingerprint]]
                for p in sample_agents
            }
            keys = sorted(
                {k for p in sample_agents if p.agent.uses_images for r in waiting[p.fingerprint] for k in r["image_keys"]}
            )
            images = self._decode(shard, keys, payloads) if keys else {}
            for planned in sample_agents:
                todo = waiting[planned.fingerprint]
                if planned.agent.uses_images:
                    todo = [r for r in todo if all(k in images for k in r["image_keys"])]
                if not todo:
                    continue
                items = [self._sample_item(planned, r, samples[r["row"]], images) for r in todo]
                table = self._score(planned, [r["sample_key"] for r in todo], items, stats)
                produced[planned.fingerprint].append(table)
                self._remember(planned, table)
                if progress:
                    progress(planned.column, len(todo))
        for planned in sample_agents:
            if produced[planned.fingerprint]:
                self.work.write_results(planned.fingerprint, shard, pa.concat_tables(produced[planned.fingerprint]))

    def _sample_item(
        self, planned: PlannedAgent, row: dict[str, Any], sample: Sample, images: dict[str, Any]
    ) -> SampleItem:
        first = row["image_keys"][0] if row["image_keys"] else None
        context: dict[str, Any] = {}
        for column, (fp, field_name) in planned.needs.items():
            values = self.context_cache.get(fp, {}).get(first) if first else None
            context[column] = values.get(field_name) if values else None
        return SampleItem(
            key=row["sample_key"],
            sample_id=row["sample_id"],
            turns=sample.turns,
            images=tuple(images[k] for k in row["image_keys"]) if planned.agent.uses_images else (),
            image_keys=tuple(row["image_keys"]),
            context=context,
        )
