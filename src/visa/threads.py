"""The CPU threads of a scoring worker: one fixed count for torch and ONNX Runtime.

Float sums run in an order that depends on the number of threads, so the same data scored with 1 and
with 2 threads differs in the last digits, which can flip near-ties at a selection cut. A worker
therefore runs every model on ``execution.threads`` threads (default 1), set before any agent loads
its models and recorded in run.json with the recipe: never a count derived from the machine's load.
More cores are used through more workers (``--workers``, or Ray actors), which on small models is
also faster than intra-op threads (threads of one forward that share a busy core wait on each other).

torch's intra-op threads are set directly; ONNX Runtime sessions (the OCR agent) take their count
from ``OMP_NUM_THREADS`` when they are created.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


def set_threads(threads: int) -> None:
    """Use ``threads`` CPU threads in this process from now on (models created later included)."""
    if threads < 1:
        raise ValueError("threads must be at least 1")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        import torch
    except ImportError:  # a recipe without torch agents
        return
    torch.set_num_threads(threads)


@contextmanager
def worker_threads(threads: int) -> Iterator[None]:
    """:func:`set_threads` for the duration of a block (an in-process run), then the previous settings."""
    before_env = os.environ.get("OMP_NUM_THREADS")
    try:
        import torch

        before = torch.get_num_threads()
    except ImportError:
        torch, before = None, 0
    set_threads(threads)
    try:
        yield
    finally:
        if before_env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = before_env
        if torch is not None:
            torch.set_num_threads(before)
