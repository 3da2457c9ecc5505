"""Executors run the same :class:`visa.pipeline.ShardProcessor` stages over shards: in-process or on
Ray. :mod:`visa.executors.base` holds what they share (the run plan, the protocol, resume)."""
