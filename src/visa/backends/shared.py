"""One engine per model per process, shared by every agent that names it.

The DP judge, PT and IM of one vision-language model are three agents with one backend spec. Each
of them building its own backend would load the model three times (three ``vllm.LLM`` engines, each
claiming 90% of the GPU, cannot even start). Agents therefore take their backend from this cache:

* the key is :meth:`~visa.backends.registry.BackendSpec.engine_key`: the backend type and all of its
  parameters with defaults filled in (model, revision, dtype, engine options), so specs written
  differently but meaning the same engine share it, and specs that differ in any parameter do not;
* the first :func:`acquire` builds the backend and calls its ``setup()`` (once, under a lock per key);
  later ones return the same object; a ``setup()`` that fails is not cached, the next acquire retries;
* :func:`release` counts down and calls ``teardown()`` when the last agent lets go.

This holds wherever agents run: in the local executor's process or worker processes, and inside
each Ray actor (the Ray executor puts agents that share a spec into one actor pool, so one actor
holds one engine). Backends are used by one agent at a time per process (agents of a group score
one after another), so a backend needs no locking of its own for this.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from visa.backends.base import Backend
from visa.backends.registry import BackendSpec, build_backend


@dataclass
class _Entry:
    backend: Backend
    users: int


class EngineCache:
    """Reference-counted backends keyed by their spec's engine key (see the module docstring)."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        #: engine key -> how many times a backend with that key was set up (tests, benchmarks).
        self.setups: dict[str, int] = {}

    def acquire(self, spec: BackendSpec) -> Backend:
        """The set-up backend of ``spec``, shared with every other holder of an equal spec."""
        key = spec.engine_key()
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    entry.users += 1
                    return entry.backend
            backend = build_backend(spec)
            backend.setup()
            with self._lock:
                self.setups[key] = self.setups.get(key, 0) + 1
                self._entries[key] = _Entry(backend, 1)
            return backend

    def release(self, backend: Backend) -> None:
        """Give back one hold on ``backend``; the last release tears it down."""
        with self._lock:
            key = next((k for k, e in self._entries.items() if e.backend is backend), None)
            if key is None:
                raise ValueError("release() of a backend that this cache did not hand out")
            entry = self._entries[key]
            entry.users -= 1
            if entry.users > 0:
                return
            del self._entries[key]
        backend.teardown()

    def loaded(self) -> dict[str, int]:
        """Engine key -> number of agents holding it, for the engines alive now."""
        with self._lock:
            return {key: entry.users for key, entry in self._entries.items()}


#: The process's engines. One per process by design: the point is that agents built independently
#: (from one recipe, in one worker or Ray actor) find each other's engines.
ENGINES = EngineCache()


def acquire(spec: BackendSpec) -> Backend:
    """The process-wide shared, set-up backend of ``spec`` (see :class:`EngineCache`)."""
    return ENGINES.acquire(spec)


def release(backend: Backend) -> None:
    """Give back a backend obtained from :func:`acquire`."""
    ENGINES.release(backend)
