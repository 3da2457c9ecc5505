"""The run's work folder: shard outputs, completion markers and the content-keyed result store.

Layout under ``RUN_DIR/work``::

    state.json                         what the folder was made for (input fingerprint, shard size)
    samples/shard-00012.parquet        one row per record of shard 12 (ids, image keys, load errors)
    samples/shard-00012.done           completion marker: the agent fingerprints the shard covers
    results/<fingerprint>/agent.json   the agent's identity (type, version, parameters, upstream)
    results/<fingerprint>/*.parquet    that agent's results: ``key``, its output fields, ``error``

Every file is written to a temporary name and renamed into place, so a crash (SIGKILL included)
leaves either the whole file or nothing. Every file can also be checked: a shard marker carries the
digest of its sample file, a result file carries its own digest in its name
(``shard-00012-<keys tag>-<digest>.parquet``). On resume :meth:`WorkDir.claim` checks them all
(:meth:`WorkDir.validate`): a damaged piece (random bytes, truncated, emptied, not the file it
claims to be) is removed, so it is recomputed, and :attr:`WorkDir.repairs` says so. Results are keyed by content (image hash or sample hash)
under the agent's fingerprint, so a result computed once is never computed again, whichever shard
or run asks for it, and changing one agent's parameters recomputes that agent only.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from visa.run_folder import RunFolder, atomic_write, atomic_write_json
from visa.samples import stable_hash

STATE_VERSION = 1


class WorkDirMismatch(RuntimeError):
    """RUN_DIR holds work for a different input or shard size."""


def content_digest(data: bytes) -> str:
    """The digest that names a result file and checks a shard's sample file (blake2b, 8 bytes, hex)."""
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def table_bytes(table: pa.Table) -> bytes:
    """``table`` as the bytes of a zstd-compressed Parquet file."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


_RESULT_NAME = re.compile(r"shard-\d{5,}-[0-9a-f]{8}(?:-(?P<digest>[0-9a-f]{16}))?\.parquet")
_MARKER_FIELDS = {"agents": list, "records": int, "errors": dict, "malformed_lines": list}


def fingerprint(identity: dict[str, Any]) -> str:
    return stable_hash(identity, size=10)


class WorkDir:
    """Access to ``RUN_DIR/work``. Safe to use from several processes (all writes are atomic)."""

    def __init__(self, run_dir: Path):
        self.root = RunFolder(run_dir).work
        self.samples_dir = self.root / "samples"
        self.results_dir = self.root / "results"
        #: what :meth:`claim` found damaged or missing and removed so that it is recomputed, in words
        self.repairs: list[str] = []

    # -- validation ------------------------------------------------------------------------------
    def validate(self) -> list[str]:
        """Check every file of the store; remove what is damaged so that it is recomputed.

        Shard markers must parse and match the digest of their sample file; result files must
        match the digest in their name (older files without one must at least open as Parquet);
        ``agent.json`` files must parse. Returns (and adds to :attr:`repairs`) one line per removal.
        """
        found: list[str] = []
        for marker in sorted(self.samples_dir.glob("shard-*.done")):
            problem = self._marker_problem(marker)
            if problem is not None:
                marker.unlink(missing_ok=True)
                found.append(f"{marker.stem}: {problem}; the shard is redone")
        for folder in sorted(p for p in self.results_dir.glob("*") if p.is_dir()):
            identity = folder / "agent.json"
            if identity.exists() and _read_sealed(identity) is None:
                identity.unlink(missing_ok=True)
                found.append(f"results/{folder.name}/agent.json was damaged; it is written again")
            for path in sorted(folder.glob("*.parquet")):
                problem = _result_problem(path)
                if problem is not None:
                    path.unlink(missing_ok=True)
                    found.append(f"results/{folder.name}/{path.name}: {problem}; its results are recomputed")
        self.repairs.extend(found)
        return found

    def _marker_problem(self, marker: Path) -> str | None:
        content = _read_sealed(marker)
        if content is None or any(
            not isinstance(content.get(k), kind) for k, kind in _MARKER_FIELDS.items()
        ):
            return "its completion marker was damaged"
        samples = marker.with_suffix(".parquet")
        try:
            data = samples.read_bytes()
        except OSError:
            return "its sample file is missing"
        digest = content.get("samples_digest")
        if digest is None:
            return None if _opens_as_parquet(data) else "its sample file was damaged"
        return None if content_digest(data) == digest else "its sample file was damaged"

    def reset_claim(self) -> None:
        """Free the folder for another input: its claim and shards go, stored agent results stay (a
        later run over new data reuses every result whose item and agent are unchanged)."""
        (self.root / "state.json").unlink(missing_ok=True)
        for path in self.samples_dir.glob("shard-*"):
            path.unlink(missing_ok=True)

    def invalidate_shard(self, shard: int) -> None:
        """Forget that ``shard`` is done (its marker goes; it is redone by the next run)."""
        (self.samples_dir / f"{self._shard_name(shard)}.done").unlink(missing_ok=True)

    def _forget_shards(self, why: str) -> None:
        for marker in self.samples_dir.glob("shard-*.done"):
            marker.unlink(missing_ok=True)
        self.repairs.append(why)

    # -- state -----------------------------------------------------------------------------------
    def claim(self, state: dict[str, Any]) -> bool:
        """Record what this folder is for; refuse a folder made for another input. True if resuming."""
        path = self.root / "state.json"
        state = {"version": STATE_VERSION, **state}
        for stale in self.root.rglob(".*.tmp"):  # left by a writer killed mid-write
            stale.unlink(missing_ok=True)
        self.repairs = []
        if path.exists() or any(self.samples_dir.glob("shard-*")):
            previous = _read_sealed(path)
            if previous is None:
                self._forget_shards(
                    f"{path.name} was damaged or missing: every shard is redone (stored agent results are reused)"
                )
                atomic_write_json(path, _sealed(state))
                self.validate()
                return True
            if previous != state:
                changed = sorted(k for k in state.keys() | previous.keys() if state.get(k) != previous.get(k))
                raise WorkDirMismatch(
                    f"{self.root.parent} holds a run over a different input or settings "
                    f"({', '.join(changed)} changed); use another --out or delete that folder"
                )
            self.validate()
            return True
        atomic_write_json(path, _sealed(state))
        return False

    # -- shards ----------------------------------------------------------------------------------
    def _shard_name(self, shard: int) -> str:
        return f"shard-{shard:05d}"

    def shard_done(self, shard: int, fingerprints: Iterable[str]) -> bool:
        marker = self.samples_dir / f"{self._shard_name(shard)}.done"
        content = _read_sealed(marker)
        if content is None or not isinstance(content.get("agents"), list):
            return False
        return set(fingerprints) <= set(content["agents"])

    def commit_shard(self, shard: int, samples: pa.Table, marker: dict[str, Any]) -> None:
        """Write the shard's sample rows, then its completion marker (the marker goes last)."""
        name = self._shard_name(shard)
        data = table_bytes(samples)
        atomic_write(self.samples_dir / f"{name}.parquet", data)
        atomic_write_json(self.samples_dir / f"{name}.done", _sealed({**marker, "samples_digest": content_digest(data)}))

    def shard_markers(self) -> list[dict[str, Any]]:
        markers = (_read_sealed(p) for p in sorted(self.samples_dir.glob("shard-*.done")))
        return [m for m in markers if isinstance(m, dict)]

    def done_shards(self) -> list[int]:
        """The shards that have a completion marker (whatever agents it covers), in order."""
        return sorted(int(p.stem.removeprefix("shard-")) for p in self.samples_dir.glob("shard-*.done"))

    def read_shard(self, shard: int) -> pa.Table:
        return pq.read_table(self.samples_dir / f"{self._shard_name(shard)}.parquet")

    def read_samples(self, shards: int) -> pa.Table:
        tables = [pq.read_table(self.samples_dir / f"{self._shard_name(i)}.parquet") for i in range(shards)]
        return pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})

    # -- agent results ---------------------------------------------------------------------------
    def register_agent(self, fp: str, identity: dict[str, Any]) -> None:
        path = self.results_dir / fp / "agent.json"
        if _read_sealed(path) is None:
            atomic_write_json(path, _sealed(identity))

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

        The file name is the shard, a tag of the keys and the digest of the content, so a retried
        write of the same results (a restarted worker) replaces the same file instead of adding a
        copy, and a damaged file is recognised (:meth:`validate`).
        """
        if table.num_rows == 0:
            return None
        tag = stable_hash(table.column("key").to_pylist(), size=4)
        data = table_bytes(table)
        path = self.results_dir / fp / f"{self._shard_name(shard)}-{tag}-{content_digest(data)}.parquet"
        atomic_write(path, data)
        return path

    def result_keys(self, fp: str, *, failed: bool = False) -> set[str]:
        """The keys that have a stored result of agent ``fp`` (with ``failed``: only those whose
        result is an error)."""
        keys: set[str] = set()
        for path in self.result_files(fp):
            table = pq.read_table(path, columns=["key", "error"])
            if failed:
                table = table.filter(pa.compute.is_valid(table.column("error")))
            keys.update(table.column("key").to_pylist())
        return keys

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


def _sealed(obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` with a ``digest`` of its own canonical JSON, so a changed byte is noticed on reading."""
    body = {k: v for k, v in obj.items() if k != "digest"}
    return {**body, "digest": content_digest(json.dumps(body, sort_keys=True, default=str).encode())}


def _read_sealed(path: Path) -> dict[str, Any] | None:
    """A JSON object written with :func:`_sealed`, without its digest; None when missing, damaged or
    changed. An object without a digest (written by an older version) is taken as it is."""
    content = _read_json(path)
    if not isinstance(content, dict):
        return None
    digest = content.get("digest")
    body = {k: v for k, v in content.items() if k != "digest"}
    if digest is not None and _sealed(body)["digest"] != digest:
        return None
    return body


def _read_json(path: Path) -> Any:
    """The parsed content of a JSON file, or None when it is missing, unreadable or not JSON."""
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None


def _opens_as_parquet(data: bytes) -> bool:
    try:
        pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError, ValueError):
        return False
    return True


def _result_problem(path: Path) -> str | None:
    """Why a result file cannot be trusted, or None."""
    match = _RESULT_NAME.fullmatch(path.name)
    if match is None:
        return "not a result file name"
    try:
        data = path.read_bytes()
    except OSError as err:
        return f"unreadable ({err.strerror or err})"
    digest = match.group("digest")
    if digest is not None:
        return None if content_digest(data) == digest else "damaged (its content does not match its digest)"
    return None if _opens_as_parquet(data) else "damaged (not a readable Parquet file)"


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
