"""Leadership: a Redis lease with a fencing token, so exactly one scheduler dispatches at a time.

Each new holder gets the next number of a Redis counter as its token; every scheduler write is checked
against it in Redis (``fenced_append.lua``), so a paused old leader cannot write after losing the lease.
"""

from __future__ import annotations

import time

from nerv_cluster import constants
from nerv_cluster.eventlog import EventLog


class Lease:
    """The scheduler lease. ``held`` is this process's belief, bounded by the lease's own expiry."""

    def __init__(self, log: EventLog, ttl_ms: int = constants.DEFAULT_LEASE_TTL_MS) -> None:
        self._log = log
        self.ttl_ms = ttl_ms
        self.token: str | None = None
        self._valid_until = 0.0
        self._renewed_at = 0.0

    @property
    def held(self) -> bool:
        """True while we hold the lease and it cannot have expired on the server yet."""
        return self.token is not None and time.monotonic() < self._valid_until

    @property
    def renew_due(self) -> bool:
        """True when it is time to renew (a third of the ttl passed)."""
        return time.monotonic() - self._renewed_at >= self.ttl_ms / 1000 / constants.LEASE_RENEW_FRACTION

    def _call(self, token: str) -> bool:
        sent = time.monotonic()
        k = self._log.keys
        got = self._log.scripts.lease(keys=[k.lease, k.epoch], args=[token, self.ttl_ms])
        if got is None:
            self.token = None
            self._valid_until = 0.0
            return False
        self.token = str(got)
        self._renewed_at = sent
        # Count from before the call: the server's expiry can only be later than this.
        self._valid_until = sent + self.ttl_ms / 1000
        return True

    def acquire(self) -> bool:
        """Take the lease if nobody holds it; True when we hold it afterwards."""
        return self._call(self.token or "")

    def renew(self) -> bool:
        """Extend our lease; False (and not held) when it was lost."""
        if self.token is None:
            return False
        return self._call(self.token)

    def release(self) -> None:
        """Give the lease up so a standby takes over at once."""
        if self.token is not None:
            self._log.scripts.release(keys=[self._log.keys.lease], args=[self.token])
        self.token = None
        self._valid_until = 0.0

    def holder(self) -> str | None:
        """The token of whoever holds the lease now, if anyone."""
        value = self._log.redis.get(self._log.keys.lease)
        return None if value is None else str(value)
