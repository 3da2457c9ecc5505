"""The local executor: shards run in this process, or in ``workers`` processes (spawned, each with its
agents set up once), every worker on the recipe's ``execution.threads`` CPU threads. Never imports Ray."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path

from visa.executors import iter_shards
from visa.pipeline import ProgressHook, ShardProcessor, ShardStats
from visa.recipe import Recipe
from visa.samples import RawRecord
from visa.threads import set_threads, worker_threads

ShardHook = Callable[[ShardStats], None]

_worker: ShardProcessor | None = None


def _init_worker(recipe_json: str, image_root: str, run_dir: str, duplicates: frozenset[str]) -> None:
    global _worker
    recipe = Recipe.model_validate_json(recipe_json)
    set_threads(recipe.execution.threads)
    _worker = ShardProcessor(recipe, Path(image_root), Path(run_dir), duplicates)
    _worker.setup()


def _run_shard(shard: int, records: list[RawRecord]) -> ShardStats:
    assert _worker is not None
    return _worker.process(shard, records)


class LocalExecutor:
    def __init__(self, workers: int = 1):
        if workers < 1:
            raise ValueError("--workers must be at least 1")
        self.workers = workers

    def run(
        self,
        recipe: Recipe,
        records: Iterator[RawRecord],
        image_root: Path,
        run_dir: Path,
        duplicates: frozenset[str],
        on_shard: ShardHook,
        on_items: ProgressHook | None = None,
    ) -> None:
        probe = ShardProcessor(recipe, image_root, run_dir, duplicates)
        shards = iter_shards(records, recipe.execution.shard_size)
        if self.workers == 1:
            with worker_threads(recipe.execution.threads):
                probe.setup()
                try:
                    for shard, chunk in shards:
                        if probe.is_done(shard):
                            on_shard(ShardStats(shard=shard, records=len(chunk), skipped=True))
                            continue
                        on_shard(probe.process(shard, chunk, on_items))
                finally:
                    probe.teardown()
            return

        context = mp.get_context("spawn")
        args = (recipe.model_dump_json(), str(image_root), str(run_dir), duplicates)
        with ProcessPoolExecutor(self.workers, mp_context=context, initializer=_init_worker, initargs=args) as pool:
            in_flight: set[Future[ShardStats]] = set()
            for shard, chunk in shards:
                if probe.is_done(shard):
                    on_shard(ShardStats(shard=shard, records=len(chunk), skipped=True))
                    continue
                in_flight.add(pool.submit(_run_shard, shard, chunk))
                if len(in_flight) >= 2 * self.workers:  # bounded: memory stays flat
                    done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                    for future in done:
                        on_shard(future.result())
            for future in in_flight:
                on_shard(future.result())
