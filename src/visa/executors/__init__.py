"""Executors run the same :class:`visa.pipeline.ShardProcessor` over shards: in-process or on Ray."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice

from visa.samples import RawRecord


def iter_shards(records: Iterator[RawRecord], shard_size: int) -> Iterator[tuple[int, list[RawRecord]]]:
    """Consecutive shards of ``shard_size`` records: shard i holds records [i*size, (i+1)*size)."""
    shard = 0
    while True:
        chunk = list(islice(records, shard_size))
        if not chunk:
            return
        yield shard, chunk
        shard += 1
