"""Cache entries in Redis (see :mod:`nerv_cluster.caching`): the scheduler's fenced store-and-read round
trip, and deleting entries (``Client.clear_cache``, ``nerv cache clear``).

Entries are ``<prefix>:cache:<task function>:<key>`` with a Redis TTL, so Redis expires them on its own
clock; nothing else refers to them. Deleting one only costs a later recomputation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis

from nerv_cluster import constants
from nerv_cluster.errors import LeaseLostError
from nerv_cluster.scripts import CacheExchange

#: One entry to store: its Redis key, value (JSON), time to live in ms, and whether only where absent.
Store = tuple[str, str, int, bool]


class CacheStore:
    """Reads and writes cache entries. The Redis client must decode responses."""

    def __init__(self, client: redis.Redis, keys: constants.Keys) -> None:
        self.redis: Any = client
        self.keys = keys
        self._exchange = CacheExchange(client)

    def exchange(self, token: str, stores: Sequence[Store], lookups: Sequence[str]) -> list[str | None]:
        """Store entries, then read the entries ``lookups`` (Redis keys), fenced by ``token``: the
        values read, None where there is no entry. :class:`LeaseLostError` when the token no longer
        holds the lease. A few script calls of at most ``CACHE_CHUNK`` keys each (stores first)."""
        out: list[str | None] = []
        chunk = constants.CACHE_CHUNK
        stores, lookups = list(stores), list(lookups)
        while stores or lookups:
            part, stores = stores[:chunk], stores[chunk:]
            room = chunk - len(part)
            reads, lookups = lookups[:room], lookups[room:]
            args: list[Any] = []
            for _, value, ttl_ms, nx in part:
                args += [value, ttl_ms, "1" if nx else ""]
            try:
                got = self._exchange(
                    lease=self.keys.lease,
                    token=token,
                    n_store=len(part),
                    tail_keys=[key for key, *_ in part] + reads,
                    tail_args=args,
                )
            except redis.ResponseError as exc:
                if "LEASE_LOST" in str(exc):
                    raise LeaseLostError(str(exc)) from exc
                raise
            out += [None if v is None else str(v) for v in got]
        return out

    def read(self, key: str) -> str | None:
        """One entry's stored value (None when absent)."""
        value = self.redis.get(key)
        return None if value is None else str(value)

    def clear(self, fn: str | None = None) -> int:
        """Delete every cache entry, or those of task function ``fn``; how many were deleted.

        SCAN, not KEYS: Redis keeps serving while a large cache is cleared.
        """
        prefix = self.keys.cache_entry(fn, "") if fn is not None else None
        deleted = 0
        batch: list[str] = []
        for key in self.redis.scan_iter(match=self.keys.cache_pattern(fn), count=1000):
            key = str(key)
            # ``fn:*`` also matches entries of a longer name ``fn:more``: keep exactly ``fn:<key>``.
            if prefix is not None and ":" in key[len(prefix) :]:
                continue
            batch.append(key)
            if len(batch) >= constants.CACHE_CHUNK:
                deleted += int(self.redis.unlink(*batch))
                batch = []
        if batch:
            deleted += int(self.redis.unlink(*batch))
        return deleted
