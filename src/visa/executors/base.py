"""What every executor shares: the run plan, the executor protocol, and the pending-shard loop.

An executor runs a :class:`RunPlan` (the recipe over the input's records, into a run folder) shard
by shard and reports every shard to ``on_shard`` (a finished shard as ``skipped``). Resume lives
here, in :class:`PendingShards`: a shard whose completion marker covers every agent of the recipe is
reported as skipped and never handed to the executor, so a rerun computes only what is missing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from itertools import islice
from pathlib import Path
from typing import Protocol

from visa.pipeline import ProgressHook, ShardStats, plan_agents
from visa.recipe import Recipe
from visa.samples import RawRecord
from visa.store import WorkDir

#: Called once per shard, in the order shards finish, with what the shard did (or ``skipped``).
ShardHook = Callable[[ShardStats], None]
Shard = tuple[int, list[RawRecord]]


def iter_shards(records: Iterator[RawRecord], shard_size: int) -> Iterator[Shard]:
    """Consecutive shards of ``shard_size`` records: shard i holds records [i*size, (i+1)*size)."""
    shard = 0
    while True:
        chunk = list(islice(records, shard_size))
        if not chunk:
            return
        yield shard, chunk
        shard += 1


@dataclass
class RunPlan:
    """One scoring run: ``recipe`` over ``records`` (input order), images under ``image_root``,
    results into ``run_dir``; ``duplicates`` are the sample ids that occur more than once."""

    recipe: Recipe
    records: Iterator[RawRecord]
    image_root: Path
    run_dir: Path
    duplicates: frozenset[str]

    @cached_property
    def fingerprints(self) -> list[str]:
        """What a shard's completion marker must cover: every agent's fingerprint and the decoder's."""
        planned, decode = plan_agents(self.recipe)
        return [p.fingerprint for p in planned] + [decode["fingerprint"]]

    def shards(self) -> Iterator[Shard]:
        """The input's shards, in order (each read once: ``records`` is a stream)."""
        return iter_shards(self.records, self.recipe.execution.shard_size)

    def pending(self, on_skipped: ShardHook) -> PendingShards:
        """The shards still to score; finished ones go to ``on_skipped``."""
        return PendingShards(self, on_skipped)


class PendingShards:
    """Iterates the plan's unfinished shards; each finished shard goes to :attr:`on_skipped` instead.

    :attr:`on_skipped` may be replaced while iterating (the Ray executor hands skipped shards to
    its driver thread once its feeder thread takes over the iteration).
    """

    def __init__(self, plan: RunPlan, on_skipped: ShardHook):
        self.work = WorkDir(plan.run_dir)
        self.fingerprints = plan.fingerprints
        self.on_skipped = on_skipped
        self._shards = plan.shards()

    def is_done(self, shard: int) -> bool:
        return self.work.shard_done(shard, self.fingerprints)

    def __iter__(self) -> Iterator[Shard]:
        return self

    def __next__(self) -> Shard:
        for shard, chunk in self._shards:
            if self.is_done(shard):
                self.on_skipped(ShardStats(shard=shard, records=len(chunk), skipped=True))
                continue
            return shard, chunk
        raise StopIteration


class Executor(Protocol):
    """Runs a plan's shards (somewhere) and reports each to ``on_shard``; ``on_items`` gets
    ``(agent column, items done)`` as agents progress. Every executor writes the same files."""

    def run(self, plan: RunPlan, on_shard: ShardHook, on_items: ProgressHook | None = None) -> None: ...
