"""Failure isolation for batched backends: one bad request never costs the others of its batch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def run_isolated(items: list[Any], run_batch: Callable[[list[Any]], list[Any]]) -> list[Any]:
    """Run a batch; when it fails, run its halves, down to the single failing item.

    Returns one result per item, with the exception in place of the result of an item that fails
    alone. A batch with one bad request costs about log2(batch) extra runs, not a lost batch.
    """
    try:
        return run_batch(items)
    except Exception as error:  # noqa: BLE001 - one request's failure must not cost the others
        release_cuda_cache()
        if len(items) == 1:
            return [error]
        middle = len(items) // 2
        return run_isolated(items[:middle], run_batch) + run_isolated(items[middle:], run_batch)


def release_cuda_cache() -> None:
    """Return cached CUDA memory (after an out-of-memory batch, before its halves run)."""
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
