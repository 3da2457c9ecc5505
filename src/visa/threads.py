"""The CPU threads of a scoring worker: one fixed count for torch and ONNX Runtime.

Float sums run in an order that depends on the number of threads, so the same data scored with 1 and
with 2 threads differs in the last digits, which can flip near-ties at a selection cut. A worker
therefore runs every model on one count of threads, ``execution.threads``, set before any agent
loads its models and recorded in run.json with the recipe: never a count derived from the
machine's load.

``execution.threads: auto`` (the default) is resolved once, when the run starts
(:func:`resolve_threads`): the CPUs this process may run on (``os.sched_getaffinity``: the cores
of the machine, or of the container / ``taskset`` mask), divided among the workers that share
them (``--workers``), at least 1 each. The affinity mask does not change with the machine's load,
so two runs on the same machine with the same ``--workers`` use the same count and write the same
table; run.json records the resolved number, never ``auto``. A machine with other cores, or
another ``--workers``, may differ in the last digits; set a number to get the same count
everywhere. The Ray executor resolves ``auto`` to one thread per actor: its parallelism is the
actors, each reserving a share of a CPU.

torch's intra-op threads are set directly; ONNX Runtime sessions (the OCR agent) take their count
from ``OMP_NUM_THREADS`` when they are created.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

#: ``execution.threads`` value that means "the CPUs this process may use, shared among its workers"
AUTO = "auto"
Threads = int | Literal["auto"]


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), else the machine's CPU count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # a platform without affinity masks
        return os.cpu_count() or 1


def resolve_threads(threads: Threads, workers: int = 1, cpus: int | None = None) -> int:
    """The fixed count for ``threads``: a number as it is; ``auto``: ``cpus`` (default: the CPUs this
    process may use) divided among ``workers`` processes, at least 1. Never reads the load."""
    if workers < 1:
        raise ValueError("workers must be at least 1")
    if threads == AUTO:
        return max(1, (available_cpus() if cpus is None else cpus) // workers)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a number >= 1 or '{AUTO}', not {threads!r}")
    return threads


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
