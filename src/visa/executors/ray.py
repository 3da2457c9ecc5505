"""The Ray executor: the same agents and the same shard stages as the local executor, on Ray Data.

Per shard, one row flows through a streaming Ray Data pipeline::

    driver: read input, skip finished shards -> bounded feed (a queue actor, read by one read task)
    prepare_shard   task (CPU: parse, read image bytes, hash)
    pool 1..n       one actor pool per agent, or per group of agents sharing a model
                    (setup() once per actor; its CPUs/GPUs/memory reserved)
    commit_shard    task (sample rows, then the completion marker)
    driver: stats -> progress, run record

Nothing here changes what is computed: every stage calls the functions of :mod:`visa.pipeline` that
the local executor calls, results go to the same content-keyed store and a shard counts as done
only when its marker exists, so a rerun after any failure (driver killed included) skips finished
shards and recomputes nothing already stored. RUN_DIR must be on storage every node sees.

Ray is imported only here, and only when a run starts; ``pip install 'visa[ray]'`` provides it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import queue
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from visa.agents.base import Unit
from visa.backends.registry import BackendSpec
from visa.deps import MissingDependency
from visa.executors.base import PendingShards, RunPlan, ShardHook
from visa.images import ImageLimits, ImageSource
from visa.pipeline import (
    AgentGroup,
    AgentStats,
    PlannedAgent,
    ProgressHook,
    ShardStats,
    commit_shard,
    plan_agents,
    prepare_shard,
)
from visa.recipe import ExecutionSpec, Recipe, RecipeError
from visa.run_folder import atomic_write
from visa.samples import RawRecord, stable_hash
from visa.store import WorkDir
from visa.threads import AUTO, set_threads

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: The last line of a Python traceback: ``package.module.ErrorName: message``.
_RAISED = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*): (\S.*)$", re.MULTILINE)

#: Raw shards waiting in the feed; Ray Data's own backpressure bounds what is in flight after it.
FEED_SLOTS = 4


# -- pools ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pool:
    """How one agent runs on Ray: in an actor pool.

    ``size`` actors (an int), or ``(min, max)`` to let Ray Data scale the pool; each actor reserves
    ``cpus``, ``gpus`` (fractional to pack several pools on one GPU) and ``memory_gb`` of host memory.
    Agents with the same ``group`` share one pool, i.e. one process per actor, so they share what the
    process loads (one copy of a model that several agents query); agents whose ``params.backend``
    specs are equal share a pool unless a group says otherwise. A group reserves the largest CPU,
    GPU and memory need of its agents and takes the first ``size`` set among them.
    A field left None takes the agent's declared :class:`~visa.agents.base.Resources` (size: 1).
    """

    size: int | tuple[int, int] | None = None
    cpus: float | None = None
    gpus: float | None = None
    memory_gb: float | None = None
    group: str | None = None

    def __post_init__(self) -> None:
        size = self.size
        if isinstance(size, list):
            object.__setattr__(self, "size", size := tuple(size))
        if size is not None:
            low, high = (size, size) if isinstance(size, int) else size
            if not (isinstance(low, int) and isinstance(high, int) and 1 <= low <= high):
                raise ValueError(f"pool size must be a count >= 1 or [min, max] with 1 <= min <= max, not {size!r}")
        for name in ("cpus", "gpus", "memory_gb"):
            value = getattr(self, name)
            if value is not None and (value < 0 or (name == "cpus" and value == 0)):
                raise ValueError(f"pool {name} must be {'> 0' if name == 'cpus' else '>= 0'}, not {value}")

    @classmethod
    def of(cls, spec: Any) -> Pool | None:
        """A Pool from a Pool, a mapping or any object with the same attributes (a recipe's ``pool:``)."""
        if spec is None or isinstance(spec, Pool):
            return spec
        names = [f.name for f in fields(cls)]
        if isinstance(spec, Mapping):
            unknown = sorted(set(spec) - set(names))
            if unknown:
                raise ValueError(f"unknown pool field(s) {unknown}; known: {names}")
            return cls(**dict(spec))
        return cls(**{name: getattr(spec, name, None) for name in names})

    def over(self, base: Pool | None) -> Pool:
        """This pool's set fields over ``base``'s."""
        if base is None:
            return self
        return replace(base, **{f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None})

    @property
    def min_size(self) -> int:
        size = self.size or 1
        return size if isinstance(size, int) else size[0]


@dataclass(frozen=True)
class Placement:
    """One actor pool of a run: the agents (columns) it runs, in order, and what each actor reserves.

    ``fixed_cpus`` / ``fixed_gpus``: the value was set by a recipe ``pool:`` or the executor's
    ``pools`` (it is never shrunk to fit a cluster); otherwise it is the agents' declared default.
    """

    columns: tuple[str, ...]
    size: int | tuple[int, int]
    cpus: float
    gpus: float
    memory_bytes: int | None
    fixed_cpus: bool = True
    fixed_gpus: bool = True

    @property
    def min_size(self) -> int:
        return self.size if isinstance(self.size, int) else self.size[0]

    def describe(self) -> str:
        parts = [f"{self.cpus:g} CPU"] + ([f"{self.gpus:g} GPU"] if self.gpus else [])
        return f"{'+'.join(self.columns)} {self.min_size} x ({', '.join(parts)})"


# -- stages (run on Ray workers; plain classes and functions, Ray-free) -------------------------------
@dataclass
class _RawShard:
    shard: int
    records: list[RawRecord]


def _objects(items: Sequence[Any]) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = list(items)
    return array


def _prepare_stage(
    batch: dict[str, np.ndarray], *, image_root: str, limits_json: str, execution_json: str,
    duplicates: frozenset[str],
) -> dict[str, np.ndarray]:
    source = ImageSource(Path(image_root), ImageLimits.model_validate_json(limits_json))
    execution = ExecutionSpec.model_validate_json(execution_json)
    out = []
    for raw in batch["item"]:
        started = time.perf_counter()
        prepared = prepare_shard(raw.shard, raw.records, source, duplicates, execution)
        prepared.stats.seconds = time.perf_counter() - started
        out.append(prepared)
    return {"item": _objects(out)}


class ExecutorError(RuntimeError):
    """The Ray run stopped; what finished is stored, and rerunning the same command resumes."""


def _attempts_dir(run_dir: Path) -> Path:
    return WorkDir(run_dir).root / "attempts"


class _AgentStage:
    """One actor of a pool: its agents are set up once, then score shard after shard.

    It re-reads (incrementally) what other actors stored before each shard, so a key computed
    anywhere is not computed again, and drops image bytes / samples once no later stage needs them.
    Ray restarts a crashed actor and retries its shard; a shard that was started ``max_attempts``
    times by this pool without finishing (an input that crashes the process) stops the run instead
    of looping forever.
    """

    def __init__(
        self, recipe_json: str, run_dir: str, columns: list[str], stage: int, keep_payloads: bool,
        keep_samples: bool, max_attempts: int,
    ):
        recipe = Recipe.model_validate_json(recipe_json)
        threads = recipe.execution.threads
        set_threads(1 if threads == AUTO else threads)  # auto: one thread per actor (RayExecutor.auto_threads)
        planned, decode = plan_agents(recipe)
        members = [p for p in planned if p.column in columns]
        self.label, self.stage = "+".join(columns), stage
        self.group = AgentGroup(
            WorkDir(Path(run_dir)), planned, members, decode["fingerprint"], recipe.images, refresh=True
        )
        self.group.setup()
        self.keep_payloads, self.keep_samples = keep_payloads, keep_samples
        self.attempts, self.max_attempts = _attempts_dir(Path(run_dir)), max_attempts

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for prepared in batch["item"]:
            started = time.perf_counter()
            marker = self.attempts / f"stage-{self.stage}.shard-{prepared.shard:05d}"
            attempt = (int(marker.read_text()) if marker.exists() else 0) + 1
            if attempt > self.max_attempts:
                raise ExecutorError(
                    f"shard {prepared.shard} was started {attempt - 1} times by {self.label} without "
                    "finishing: one of its records probably crashes the worker process (out of memory, or a "
                    "crash inside a model library); finished shards are stored, rerun to resume"
                )
            atomic_write(marker, str(attempt).encode())
            self.group.run(prepared)
            marker.unlink(missing_ok=True)
            prepared.drop_inputs(payloads=not self.keep_payloads, samples=not self.keep_samples)
            prepared.stats.seconds += time.perf_counter() - started
        return {"item": batch["item"]}


def _commit_stage(batch: dict[str, np.ndarray], *, run_dir: str, fingerprints: list[str]) -> dict[str, np.ndarray]:
    work = WorkDir(Path(run_dir))
    out = []
    for prepared in batch["item"]:
        stats = commit_shard(work, prepared, fingerprints, prepared.stats.seconds)
        out.append(_stats_to_json(stats))
    return {"stats": np.array(out, dtype=object)}


def _stats_to_json(stats: ShardStats) -> str:
    return json.dumps({**vars(stats), "agents": {c: vars(s) for c, s in stats.agents.items()}})


def _stats_from_json(text: str) -> ShardStats:
    data = json.loads(text)
    agents = {column: AgentStats(**values) for column, values in data.pop("agents").items()}
    return ShardStats(**data, agents=agents)


# -- the executor -----------------------------------------------------------------------------------
class RayExecutor:
    """Runs a recipe on a Ray cluster with Ray Data: prepare and commit as tasks, each agent as an
    actor pool. Same ``run`` contract, same files, same score table as :class:`LocalExecutor`.

    ``address``: a running cluster (``"auto"`` on a cluster node, ``"ray://head:10001"`` through Ray
    Client); None starts a local instance (or uses the one this process already started).
    ``pools`` (agent column -> :class:`Pool`, or ``"*"`` for every agent) override the recipe's
    per-agent ``pool:``; ``task_cpus`` is what each prepare/commit task reserves.
    ``gpu_memory_gb`` is the memory of one GPU of the cluster: when given, an agent that declares
    ``gpu_memory_gb`` reserves that fraction of a GPU instead of a whole one (packing).
    ``max_attempts``: how often one agent may start one shard (Ray restarts a crashed actor and
    retries its work forever; an input that crashes the process would loop).
    ``check_resources``: refuse, before any work, pools that the cluster cannot hold (a stalled
    pipeline otherwise); turn off for an autoscaling cluster that will add the nodes.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        pools: Mapping[str, Pool | Mapping[str, Any]] | None = None,
        task_cpus: float = 1.0,
        gpu_memory_gb: float | None = None,
        max_attempts: int = 4,
        check_resources: bool = True,
        runtime_env: Mapping[str, Any] | None = None,
    ):
        if importlib.util.find_spec("ray") is None:  # fail when the run is set up, not when it starts
            raise MissingDependency("ray", "ray", "the Ray executor")
        if task_cpus <= 0:
            raise ValueError("task_cpus must be > 0")
        self.address = address
        self.pools = {column: Pool.of(spec) for column, spec in (pools or {}).items()}
        self.task_cpus = task_cpus
        self.gpu_memory_gb = gpu_memory_gb
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.max_attempts = max_attempts
        self.check_resources = check_resources
        self.runtime_env = dict(runtime_env) if runtime_env else None
        #: Ray Data's statistics of the last run (operators, tasks, times): what to read when tuning pools.
        self.last_stats: str | None = None

    # -- planning -------------------------------------------------------------------------------------
    def placements(
        self, recipe: Recipe, planned: Sequence[PlannedAgent] | None = None, *, group_light: bool = False
    ) -> list[Placement]:
        """The run's actor pools, in pipeline order, with what each actor reserves: the executor's
        ``pools`` over the recipe's ``pool:`` over the agent's declared resources.

        ``group_light``: agents that need no GPU and have no pool settings of their own run in one
        shared pool (what :meth:`fit` does when the cluster has few CPUs).
        Raises RecipeError when a sample agent needs an agent that would run in a later pool.
        """
        planned = list(planned) if planned is not None else plan_agents(recipe)[0]
        groups: dict[str, list[tuple[PlannedAgent, Pool]]] = {}
        for p in planned:
            pool = self._pool_of(recipe, p)
            key = _group_key(p, pool)
            if group_light and pool == Pool() and p.agent.resources().gpus == 0:
                key = "light"
            groups.setdefault(key, []).append((p, pool))
        out = [self._placement(members) for members in groups.values()]
        where = {p.fingerprint: position for position, members in enumerate(groups.values()) for p, _ in members}
        for position, members in enumerate(groups.values()):
            for p, _ in members:
                for column, (fp, _field) in p.needs.items():
                    if where[fp] > position:
                        raise RecipeError(
                            f"agent {p.column} needs '{column}', which is computed in a later actor pool "
                            f"({'+'.join(out[where[fp]].columns)}); put both agents in one pool group, or "
                            f"{p.column} in a group of its own"
                        )
        return out

    def _pool_of(self, recipe: Recipe, planned: PlannedAgent) -> Pool:
        """The executor's ``"*"`` pool, under the recipe's ``pool:``, under the executor's pool of the column."""
        spec = next(a for a in recipe.scores[planned.bound.score].agents if a.name == planned.bound.name)
        pool = Pool()
        for layer in (self.pools.get("*"), Pool.of(getattr(spec, "pool", None)), self.pools.get(planned.column)):
            if layer is not None:
                pool = layer.over(pool)
        return pool

    def _placement(self, members: list[tuple[PlannedAgent, Pool]]) -> Placement:
        """One pool: the largest CPU, GPU and memory need of its agents, the first size set among them."""
        cpus, gpus, memory = 0.0, 0.0, 0.0
        for p, pool in members:
            declared = p.agent.resources()
            agent_gpus = pool.gpus
            if agent_gpus is None:
                agent_gpus = declared.gpus
                if self.gpu_memory_gb and declared.gpu_memory_gb > 0 and 0 < agent_gpus <= 1:
                    agent_gpus = min(agent_gpus, math.ceil(100 * declared.gpu_memory_gb / self.gpu_memory_gb) / 100)
            cpus = max(cpus, pool.cpus or declared.cpus)
            gpus = max(gpus, agent_gpus)
            memory = max(memory, pool.memory_gb or 0.0)
        size = next((pool.size for _, pool in members if pool.size is not None), 1)
        return Placement(
            tuple(p.column for p, _ in members), size, cpus, gpus, int(memory * 2**30) if memory else None,
            fixed_cpus=any(pool.cpus is not None for _, pool in members),
            fixed_gpus=any(pool.gpus is not None for _, pool in members),
        )

    def fit(
        self, recipe: Recipe, planned: Sequence[PlannedAgent], placements: list[Placement],
        nodes: Sequence[Mapping[str, float]],
    ) -> list[Placement]:
        """Default pools shrunk to the cluster found; pools set by a recipe or the executor unchanged.

        When the pools' minimum sizes ask for more CPUs than the cluster has (after the prepare/commit
        tasks' share), the agents without pool settings are first grouped into one pool (one process
        for all CPU-only agents: a laptop runs the recipe like the local executor does), then their
        CPU reservations are scaled down (fractional CPUs). Default GPU reservations of at most one
        GPU are scaled the same way when GPUs are short (agents then share a GPU). What still does not
        fit is refused by :meth:`check_fits`, naming the pools.
        """
        cpus = sum(n.get("CPU", 0.0) for n in nodes) - self.task_cpus
        gpus = sum(n.get("GPU", 0.0) for n in nodes)
        if _want(placements, "cpus") > cpus + 1e-9:
            try:
                grouped = self.placements(recipe, planned, group_light=True)
            except RecipeError:  # grouping would put a need behind its producer: keep the pools
                grouped = placements
            placements = _scaled(grouped, "cpus", cpus, floor=0.01)
        if _want(placements, "gpus") > gpus + 1e-9:
            placements = _scaled(placements, "gpus", gpus, floor=0.01)
        return placements

    def check_fits(self, placements: Sequence[Placement], nodes: Sequence[Mapping[str, float]]) -> None:
        """Refuse pools the cluster cannot hold while keeping CPU for the prepare/commit tasks.

        ``nodes``: the resources of each alive node (``{"CPU": 8, "GPU": 1, ...}``).
        """
        cpus = sum(n.get("CPU", 0.0) for n in nodes)
        gpus = sum(n.get("GPU", 0.0) for n in nodes)
        want_cpus = sum(p.min_size * p.cpus for p in placements)
        want_gpus = sum(p.min_size * p.gpus for p in placements)
        pools = "; ".join(p.describe() for p in placements)
        if want_cpus + self.task_cpus > cpus + 1e-9:
            raise RecipeError(
                f"the agents' actor pools need {want_cpus:g} CPUs and the prepare/commit tasks "
                f"{self.task_cpus:g} more, but the Ray cluster has {cpus:g} ({pools}); lower pool size or "
                "cpus (recipe 'pool:' or the executor's pools), or add nodes"
            )
        if want_gpus > gpus + 1e-9:
            raise RecipeError(
                f"the agents' actor pools need {want_gpus:g} GPUs but the Ray cluster has {gpus:g} ({pools}); "
                "use fractional pool gpus to share a GPU, or add GPU nodes"
            )
        for p in placements:
            if not any(n.get("CPU", 0.0) >= p.cpus and n.get("GPU", 0.0) >= p.gpus for n in nodes):
                raise RecipeError(f"no node of the Ray cluster can hold one actor of {p.describe()}")

    # -- running --------------------------------------------------------------------------------------
    def auto_threads(self) -> int:
        """What ``execution.threads: auto`` means on Ray: one thread per actor (the actors are the
        parallelism, each reserving a share of a CPU), the same on every node."""
        return 1

    def run(self, plan: RunPlan, on_shard: ShardHook, on_items: ProgressHook | None = None) -> None:
        ray = _import_ray()
        recipe, run_dir = plan.recipe, plan.run_dir
        planned, _ = plan_agents(recipe)
        work = WorkDir(run_dir)
        pending = plan.pending(on_shard)
        first = next(pending, None)  # a finished run starts nothing on the cluster
        if first is None:
            return
        placements = self.placements(recipe, planned)
        started_ray = self._connect(ray)
        try:
            if self.check_resources:
                nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
                placements = self.fit(recipe, planned, placements, nodes)
                self.check_fits(placements, nodes)
            for p in planned:
                work.register_agent(p.fingerprint, {**p.identity, "column": p.column})
            for stale in _attempts_dir(run_dir).glob("*.shard-*"):  # counts are per run
                stale.unlink(missing_ok=True)
            self._stream(ray, plan, planned, placements, first, pending, on_shard, on_items)
        finally:
            if started_ray:
                ray.shutdown()

    def _connect(self, ray: Any) -> bool:
        """Connect to (or start) Ray unless this process already did; True when we started it here."""
        if ray.is_initialized():
            return False
        kwargs: dict[str, Any] = {"logging_level": logging.WARNING}
        if self.address is None:
            kwargs["include_dashboard"] = False
        if self.runtime_env:
            kwargs["runtime_env"] = self.runtime_env
        ray.init(address=self.address, **kwargs)
        return True

    def _stream(
        self, ray: Any, plan: RunPlan, planned: list[PlannedAgent], placements: list[Placement],
        first: tuple[int, list[RawRecord]], pending: PendingShards, on_shard: ShardHook,
        on_items: ProgressHook | None,
    ) -> None:
        feeder = _Feeder(first, pending)
        with _quiet_ray_data(ray):
            dataset = self._dataset(ray, feeder.feed, plan, planned, placements)
            feeder.start()
            try:
                for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                    feeder.drain(on_shard)
                    for text in batch["stats"]:
                        _report(_stats_from_json(text), on_shard, on_items)
            except Exception as err:
                raise _stopped(err) from err
            finally:
                feeder.stop()
                self.last_stats = dataset.stats()
        feeder.drain(on_shard)
        if feeder.failure:
            raise feeder.failure[0]

    def _dataset(
        self, ray: Any, feed: Any, plan: RunPlan, planned: list[PlannedAgent], placements: list[Placement]
    ) -> Any:
        recipe, run_dir, fingerprints = plan.recipe, plan.run_dir, plan.fingerprints
        ray_data = ray.data
        # Each stage stays its own operator. Ray Data fuses consecutive maps whose remote arguments
        # are equal; the read reserves no CPU and prepare sets max_calls (0, the default for CPU
        # tasks, which actors do not carry), so prepare is fused neither into the single read task
        # (it would run serially) nor into the first agent's actors (reading files on a GPU's time).
        dataset = ray_data.read_datasource(_feed_datasource(feed), override_num_blocks=1, num_cpus=0)
        dataset = dataset.map_batches(
            _prepare_stage, batch_size=1, batch_format="numpy", zero_copy_batch=False, num_cpus=self.task_cpus,
            max_calls=0, fn_kwargs={"image_root": str(plan.image_root), "limits_json": recipe.images.model_dump_json(),
                       "execution_json": recipe.execution.model_dump_json(), "duplicates": plan.duplicates},
        )
        recipe_json = recipe.model_dump_json()
        by_column = {p.column: p for p in planned}
        for i, place in enumerate(placements):
            later = [by_column[c] for later_place in placements[i + 1 :] for c in later_place.columns]
            options: dict[str, Any] = {"num_cpus": place.cpus}
            if place.gpus:
                options["num_gpus"] = place.gpus
            if place.memory_bytes:
                options["memory"] = place.memory_bytes
            size = place.size
            pool = (
                ray_data.ActorPoolStrategy(size=size) if isinstance(size, int)
                else ray_data.ActorPoolStrategy(min_size=size[0], max_size=size[1])
            )
            dataset = dataset.map_batches(
                _AgentStage,
                fn_constructor_kwargs={
                    "recipe_json": recipe_json, "run_dir": str(run_dir), "columns": list(place.columns), "stage": i,
                    "keep_payloads": any(q.agent.unit == Unit.IMAGE or q.agent.uses_images for q in later),
                    "keep_samples": any(q.agent.unit == Unit.SAMPLE for q in later),
                    "max_attempts": self.max_attempts,
                },
                batch_size=1, batch_format="numpy", zero_copy_batch=False, compute=pool, **options,
            )
        return dataset.map_batches(
            _commit_stage, batch_size=1, batch_format="numpy", zero_copy_batch=False, num_cpus=self.task_cpus,
            fn_kwargs={"run_dir": str(run_dir), "fingerprints": fingerprints},
        )


def _want(placements: Sequence[Placement], resource: str) -> float:
    """CPUs or GPUs that the pools' minimum sizes reserve."""
    return sum(p.min_size * getattr(p, resource) for p in placements)


def _scaled(placements: Sequence[Placement], resource: str, available: float, *, floor: float) -> list[Placement]:
    """Shrink the default (not fixed) reservations of ``resource`` so that all pools fit ``available``.

    GPU reservations above one GPU (a tensor-parallel engine) are never split. Reservations are
    rounded down to hundredths and never go below ``floor``; when the fixed ones alone do not fit,
    nothing changes (the refusal then names the pools as configured).
    """

    def flexible(p: Placement) -> bool:
        fixed = p.fixed_cpus if resource == "cpus" else p.fixed_gpus
        value = getattr(p, resource)
        return not fixed and value > 0 and (resource == "cpus" or value <= 1)

    fixed = sum(p.min_size * getattr(p, resource) for p in placements if not flexible(p))
    wanted = sum(p.min_size * getattr(p, resource) for p in placements if flexible(p))
    room = available - fixed
    if wanted <= 0 or room <= 0 or wanted <= room:
        return list(placements)
    factor = room / wanted
    return [
        replace(p, **{resource: max(floor, math.floor(100 * getattr(p, resource) * factor) / 100)})
        if flexible(p) else p
        for p in placements
    ]


class _Feeder:
    """Puts the pending shards into a bounded Ray queue from a thread of the driver.

    Shards found finished on the way are queued here for the driver thread (:meth:`drain`), which
    alone calls the executor's hooks; an error in the thread is kept in :attr:`failure`.
    """

    def __init__(self, first: tuple[int, list[RawRecord]], pending: PendingShards):
        from ray.util.queue import Queue

        self.feed = Queue(maxsize=FEED_SLOTS, actor_options={"num_cpus": 0})
        self.first, self.pending = first, pending
        self.skipped: queue.SimpleQueue[ShardStats] = queue.SimpleQueue()
        pending.on_skipped = self.skipped.put  # the feeder thread iterates from here on
        self.stopping = threading.Event()
        self.failure: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, name="visa-ray-feed", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _put(self, item: Any) -> bool:
        from ray.util.queue import Full

        while not self.stopping.is_set():
            try:
                self.feed.put(item, timeout=0.5)
                return True
            except Full:
                continue
        return False

    def _run(self) -> None:
        try:
            if not self._put(_RawShard(*self.first)):
                return
            for shard, chunk in self.pending:
                if not self._put(_RawShard(shard, chunk)):
                    return
        except BaseException as err:  # noqa: BLE001 - re-raised by the driver thread
            self.failure.append(err)
        finally:
            self._put(None)

    def drain(self, on_shard: ShardHook) -> None:
        """Report the shards found finished so far (driver thread)."""
        while True:
            try:
                on_shard(self.skipped.get_nowait())
            except queue.Empty:
                return

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)
        self.feed.shutdown()


def _report(stats: ShardStats, on_shard: ShardHook, on_items: ProgressHook | None) -> None:
    if on_items is not None:
        for column, agent_stats in stats.agents.items():
            on_items(column, agent_stats.items)
    on_shard(stats)


def _group_key(planned: PlannedAgent, pool: Pool) -> str:
    """Which pool an agent runs in: its explicit group, else one pool per model backend spec, else its own."""
    if pool.group:
        return f"group:{pool.group}"
    backend = getattr(planned.agent.params, "backend", None)
    if isinstance(backend, BackendSpec):
        return "backend:" + backend.engine_key()  # the engine the agents share in the actor
    if isinstance(backend, BaseModel):
        return "backend:" + stable_hash(backend.model_dump(mode="json"))
    return f"agent:{planned.column}"


def _import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError:
        raise MissingDependency("ray", "ray", "the Ray executor") from None
    return ray


def _feed_datasource(feed: Any) -> Any:
    """A Ray Data source with one read task that streams the shards the driver puts in ``feed``."""
    import pandas as pd
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class ShardFeed(Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[ReadTask]:
            def read() -> Iterator[pd.DataFrame]:
                while (item := feed.get()) is not None:
                    yield pd.DataFrame({"item": _objects([item])})

            metadata = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
            return [ReadTask(read, metadata)]

    return ShardFeed()


@contextlib.contextmanager
def _quiet_ray_data(ray: Any) -> Iterator[None]:
    """Ray Data settings for a visa run (visa draws its own progress), restored afterwards."""
    context = ray.data.DataContext.get_current()
    saved = {name: getattr(context, name) for name in
             ("enable_progress_bars", "print_on_execution_start", "enable_fallback_to_arrow_object_ext_type")}
    # Ray Data logs each run's start and end at INFO, and a warning that its bars are off.
    loggers = {logging.getLogger("ray.data"): logging.WARNING, logging.getLogger("ray.data._internal.progress"): logging.ERROR}
    levels = {logger: logger.level for logger in loggers}
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.enable_fallback_to_arrow_object_ext_type = True  # shards travel as Python objects, quietly
    for logger, level in loggers.items():
        logger.setLevel(level)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(context, name, value)
        for logger, level in levels.items():
            logger.setLevel(level)


def _stopped(err: Exception) -> ExecutorError:
    """One clear error for a failed pipeline: the error a stage raised, without Ray's wrapping.

    Ray passes a worker's exception on as text (its traceback inside Ray's own error), so the stage's
    error is the last traceback line naming an exception that is not one of Ray's.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    text: list[str] = []
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ExecutorError):
            return current
        if not type(current).__module__.startswith("ray") and not isinstance(current, StopIteration):
            lines = str(current).strip().splitlines()
            return _stop_message(type(current).__qualname__, lines[0] if lines else "")
        text.append(_ANSI.sub("", str(current)))
        todo += [getattr(current, "cause", None), current.__cause__, current.__context__]
    found = [m for m in _RAISED.finditer("\n".join(text)) if not m.group(1).startswith("ray.")]
    if not found:
        first = next((line for chunk in text for line in chunk.splitlines() if line.strip()), type(err).__name__)
        return _stop_message(type(err).__name__, first.strip())
    name, message = found[-1].group(1), found[-1].group(2)
    if name.endswith(f".{ExecutorError.__name__}"):
        return ExecutorError(message)
    return _stop_message(name.rpartition(".")[2], message)


def _stop_message(name: str, message: str) -> ExecutorError:
    detail = f"{name}: {message}" if message else name
    return ExecutorError(f"the Ray run stopped: {detail}; finished shards are stored, rerun to resume")
