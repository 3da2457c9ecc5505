"""The run's work folder: shard outputs, completion markers and the content-keyed result store.

Layout under ``RUN_DIR/work``::

    state.json                         what the folder was made for (input fingerprint, shard size)
    samples/shard-00012.parquet        one row per record of shard 12 (ids, image keys, load errors)
    samples/shard-00012.done           completion marker: the agent fingerprints the shard covers
    results/<fingerprint>/agent.json   the agent's identity (type, version, parameters, upstream)
    results/<fingerprint>/*.parquet    that agent's results: ``key``, its output fields, ``error``

Every file is written to a temporary name and renamed into place, so a crash (SIGKILL included)
leaves either the whole file or nothing. Results are keyed by content (image hash or sample hash)
under the agent's fingerprint, so a result computed once is never computed again, whichever shard
or run asks for it, and changing one agent's parameters recomputes that agent only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from visa.run_folder import RunFolder, atomic_write_json, atomic_write_table
from visa.samples import stable_hash

STATE_VERSION = 1


class WorkDirMismatch(RuntimeError):
    """RUN_DIR holds work for a different input or shard size."""


def fingerprint(identity: dict[str, Any]) -> str:
    return stable_hash(identity, size=10)


class WorkDir:
    """Access to ``RUN_DIR/work``. Safe to use from several processes (all writes are atomic)."""

    def __init__(self, run_dir: Path):
        self.root = RunFolder(run_dir).work
        self.samples_dir = self.root / "samples"
        self.results_dir = self.root / "results"

    # -- state -----------------------------------------------------------------------------------
    def claim(self, state: dict[str, Any]) -> bool:
        """Record what this folder is for; refuse a folder made for another input. True if resuming."""
        path = self.root / "state.json"
        state = {"version": STATE_VERSION, **state}
        for stale in self.root.rglob(".*.tmp"):  # left by a writer killed mid-write
            stale.unlink(missing_ok=True)
        if path.exists():
            previous = json.loads(path.read_text())
            if previous != state:
                changed = sorted(k for k in state.keys() | previous.keys() if state.get(k) != previous.get(k))
                raise WorkDirMismatch(
                    f"{self.root.parent} holds a run over a different input or settings "
                    f"({', '.join(changed)} changed); use another --out or delete that folder"
                )
            return True
        atomic_write_json(path, state)
        return False

    # -- shards ----------------------------------------------------------------------------------
    def _shard_name(self, shard: int) -> str:
        return f"shard-{shard:05d}"

    def shard_done(self, shard: int, fingerprints: Iterable[str]) -> bool:
        marker = self.samples_dir / f"{self._shard_name(shard)}.done"
        if not marker.exists():
            return False
        covered = set(json.loads(marker.read_text())["agents"])
        return set(fingerprints) <= covered

    def commit_shard(self, shard: int, samples: pa.Table, marker: dict[str, Any]) -> None:
        """Write the shard's sample rows, then its completion marker (the marker goes last)."""
        name = self._shard_name(shard)
        atomic_write_table(self.samples_dir / f"{name}.parquet", samples)
        atomic_write_json(self.samples_dir / f"{name}.done", marker)

    def shard_markers(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted(self.samples_dir.glob("shard-*.done"))]

    def read_samples(self, shards: int) -> pa.Table:
        tables = [pq.read_table(self.samples_dir / f"{self._shard_name(i)}.parquet") for i in range(shards)]
        return pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})

    # -- agent results ---------------------------------------------------------------------------
    def register_agent(self, fp: str, identity: dict[str, Any]) -> None:
        path = self.results_dir / fp / "agent.json"
        if not path.exists():
            atomic_write_json(path, identity)

    def result_files(self, fp: str) -> list[Path]:
        """The agent's result files, in name order (complete files only: temporaries end in ``.tmp``)."""
        return sorted((self.results_dir / fp).glob("*.parquet"))

    def known_keys(self, fp: str) -> set[str]:
        keys: set[str] = set()
        for path in self.result_files(fp):
            keys.update(pq.read_table(path, columns=["key"]).column("key").to_pylist())
        return keys

    def write_results(self, fp: str, shard: int, table: pa.Table) -> Path | None:
        """Store results of shard ``shard``; returns the file written (None for an empty table).

        The file name depends only on the shard and the keys, so a retried write (a restarted worker)
        replaces the same file instead of adding a copy.
        """
        if table.num_rows == 0:
            return None
        tag = stable_hash(table.column("key").to_pylist(), size=4)
        path = self.results_dir / fp / f"{self._shard_name(shard)}-{tag}.parquet"
        atomic_write_table(path, table)
        return path

    def read_results(self, fp: str, keys: Iterable[str] | None = None) -> pa.Table | None:
        """All results of one agent (first result per key wins), optionally only for ``keys``."""
        files = self.result_files(fp)
        if not files:
            return None
        table = pa.concat_tables([pq.read_table(p) for p in files], promote_options="permissive")
        if keys is not None:
            wanted = pa.array(sorted(set(keys)), type=pa.string())
            table = table.filter(pa.compute.is_in(table.column("key"), value_set=wanted))
        return _first_per_key(table)


class ResultIndex:
    """One worker's view of one agent's stored results: their keys and, optionally, some fields' values.

    :meth:`refresh` reads only the result files this index has not seen yet, so a long-lived worker
    (a Ray actor) can pick up what other workers wrote to a shared RUN_DIR at the cost of the new
    files alone. When a key has several results, the first one read wins, as in
    :meth:`WorkDir.read_results` (files are read in name order).
    """

    def __init__(self, work: WorkDir, fp: str, fields: Sequence[str] = ()):
        self.work, self.fp, self.fields = work, fp, tuple(fields)
        self.keys: set[str] = set()
        self.values: dict[str, dict[str, Any]] = {}
        self._seen: set[str] = set()

    def __contains__(self, key: object) -> bool:
        return key in self.keys

    def refresh(self) -> int:
        """Read the result files written since the last refresh; returns how many were new."""
        new = [p for p in self.work.result_files(self.fp) if p.name not in self._seen]
        for path in new:
            self.add(pq.read_table(path, columns=["key", *self.fields]))
            self._seen.add(path.name)
        return len(new)

    def add(self, table: pa.Table) -> None:
        """Take in results this worker computed (``key`` plus at least :attr:`fields`)."""
        self.keys.update(table.column("key").to_pylist())
        if self.fields:
            for row in table.select(["key", *self.fields]).to_pylist():
                self.values.setdefault(row.pop("key"), row)

    def mark_seen(self, path: Path | None) -> None:
        """A file this worker wrote itself: its content is already here, never read it back."""
        if path is not None:
            self._seen.add(path.name)


def _first_per_key(table: pa.Table) -> pa.Table:
    """Drop later duplicates of a key (two workers may compute the same image)."""
    if table.num_rows == 0:
        return table
    import numpy as np
    import pyarrow.compute as pc

    indices = pc.array_sort_indices(table.column("key"))
    keys = table.column("key").take(indices).to_numpy(zero_copy_only=False)
    first = np.ones(len(keys), dtype=bool)
    first[1:] = keys[1:] != keys[:-1]
    return table.take(indices.filter(pa.array(first)))
