"""The local executor: shards run in this process, or in ``workers`` processes (spawned, each with its
agents set up once), every worker on the recipe's ``execution.threads`` CPU threads (``auto``: this
process's CPUs divided among the workers, see :mod:`visa.threads`). Never imports Ray."""

from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path

from visa.executors.base import RunPlan, ShardHook
from visa.pipeline import ProgressHook, ShardProcessor, ShardStats
from visa.recipe import Recipe
from visa.samples import RawRecord
from visa.threads import AUTO, resolve_threads, set_threads, worker_threads

_worker: ShardProcessor | None = None


def _init_worker(recipe_json: str, image_root: str, run_dir: str, duplicates: frozenset[str]) -> None:
    global _worker
    recipe = Recipe.model_validate_json(recipe_json)
    set_threads(resolve_threads(recipe.execution.threads))  # resolved by the driver: a number here
    _worker = ShardProcessor(recipe, Path(image_root), Path(run_dir), duplicates)
    _worker.setup()


def _run_shard(shard: int, records: list[RawRecord]) -> ShardStats:
    assert _worker is not None
    return _worker.process(shard, records)


class LocalExecutor:
    """Runs shards in this process (``workers=1``) or in ``workers`` spawned processes, each with
    its agents set up once; at most two shards per worker are in flight, so memory stays flat."""

    def __init__(self, workers: int = 1):
        if workers < 1:
            raise ValueError("--workers must be at least 1")
        self.workers = workers

    def auto_threads(self) -> int:
        """What ``execution.threads: auto`` means here: this process's CPUs divided among the workers."""
        return resolve_threads(AUTO, self.workers)

    def _threads(self, recipe: Recipe) -> int:
        return resolve_threads(recipe.execution.threads, self.workers)

    def run(self, plan: RunPlan, on_shard: ShardHook, on_items: ProgressHook | None = None) -> None:
        if self.workers == 1:
            self._run_here(plan, on_shard, on_items)
        else:
            self._run_pool(plan, on_shard)

    def _run_here(self, plan: RunPlan, on_shard: ShardHook, on_items: ProgressHook | None) -> None:
        processor = ShardProcessor(plan.recipe, plan.image_root, plan.run_dir, plan.duplicates)
        with worker_threads(self._threads(plan.recipe)):
            processor.setup()
            try:
                for shard, chunk in plan.pending(on_shard):
                    on_shard(processor.process(shard, chunk, on_items))
            finally:
                processor.teardown()

    def _run_pool(self, plan: RunPlan, on_shard: ShardHook) -> None:
        context = mp.get_context("spawn")
        execution = plan.recipe.execution.model_copy(update={"threads": self._threads(plan.recipe)})
        recipe = plan.recipe.model_copy(update={"execution": execution})
        args = (recipe.model_dump_json(), str(plan.image_root), str(plan.run_dir), plan.duplicates)
        with ProcessPoolExecutor(self.workers, mp_context=context, initializer=_init_worker, initargs=args) as pool:
            in_flight: set[Future[ShardStats]] = set()
            for shard, chunk in plan.pending(on_shard):
                in_flight.add(pool.submit(_run_shard, shard, chunk))
                if len(in_flight) >= 2 * self.workers:  # bounded: memory stays flat
                    done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                    for future in done:
                        on_shard(future.result())
            for future in in_flight:
                on_shard(future.result())
