"""Leadership: a Redis lease with a fencing token, so exactly one scheduler dispatches at a time.

Each new holder gets a token made of the next number of a Redis counter and a random part of its own
(``lease.lua``); every scheduler write is checked against the whole token in Redis (``fenced_append.lua``),
so a paused old leader cannot write after losing the lease. The random part matters when Redis loses its
last second of writes (AOF ``everysec``): the lease key may vanish and the counter roll back, and the next
holder then draws the same number as the old one, but never the same token.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable

import redis

from nerv_cluster import constants
from nerv_cluster.eventlog import EventLog

log = logging.getLogger("nerv.scheduler")

#: A leader whose loop made no progress for this long stops renewing, so a standby can take over.
LOOP_STALL_S = 30.0


class Lease:
    """The scheduler lease. ``held`` is this process's belief, bounded by the lease's own expiry."""

    def __init__(self, log: EventLog, ttl_ms: int = constants.DEFAULT_LEASE_TTL_MS) -> None:
        self._log = log
        self.ttl_ms = ttl_ms
        self.token: str | None = None
        self._valid_until = 0.0
        self._renewed_at = 0.0
        # The loop acquires and drops, the keeper thread renews: one at a time.
        self._lock = threading.Lock()

    @property
    def held(self) -> bool:
        """True while we hold the lease and it cannot have expired on the server yet."""
        return self.token is not None and time.monotonic() < self._valid_until

    @property
    def renew_due(self) -> bool:
        """True when it is time to renew (a third of the ttl passed)."""
        return time.monotonic() - self._renewed_at >= self.ttl_ms / 1000 / constants.LEASE_RENEW_FRACTION

    def _call(self, token: str, renew_only: bool) -> bool:
        with self._lock:
            if renew_only and token != self.token:
                return False  # dropped or replaced meanwhile: never revive an old term
            sent = time.monotonic()
            k = self._log.keys
            nonce = secrets.token_hex(constants.LEASE_NONCE_BYTES)
            got = self._log.scripts.lease(
                keys=[k.lease, k.epoch], args=[token, self.ttl_ms, int(renew_only), nonce]
            )
            return self._update(got, sent)

    def _update(self, got: object, sent: float) -> bool:
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
        return self._call(self.token or "", renew_only=False)

    def renew(self) -> bool:
        """Extend our lease; False (and not held) when it was lost."""
        token = self.token
        if token is None:
            return False
        return self._call(token, renew_only=True)

    def drop(self) -> None:
        """Forget the lease without releasing it (it lapses on its own)."""
        with self._lock:
            self.token = None
            self._valid_until = 0.0

    def release(self) -> None:
        """Give the lease up so a standby takes over at once."""
        if self.token is not None:
            self._log.scripts.release(keys=[self._log.keys.lease], args=[self.token])
        self.drop()

    def holder(self) -> str | None:
        """The token of whoever holds the lease now, if anyone."""
        value = self._log.redis.get(self._log.keys.lease)
        return None if value is None else str(value)


class LeaseKeeper:
    """Renews a held lease from a thread, so a long step (a big refold, a burst) never loses it.

    It renews only while ``progress()`` (seconds since the loop last moved) stays under ``LOOP_STALL_S``:
    a wedged leader lets its lease lapse and a standby takes over.
    """

    def __init__(self, lease: Lease, progress: Callable[[], float]) -> None:
        self.lease = lease
        self.progress = progress
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="nerv-lease", daemon=True)

    def start(self) -> None:
        """Start renewing."""
        self._thread.start()

    def _loop(self) -> None:
        interval = self.lease.ttl_ms / 1000 / constants.LEASE_RENEW_FRACTION
        while not self._stop.wait(interval / 2):
            if self.lease.token is None or not self.lease.renew_due:
                continue
            if self.progress() > LOOP_STALL_S:
                log.error("scheduler loop stalled for %.0fs; letting the lease lapse", self.progress())
                continue
            try:
                if not self.lease.renew():
                    log.warning("lease lost to another scheduler")
            except redis.RedisError as exc:
                log.warning("lease renewal failed: %s", exc)

    def stop(self) -> None:
        """Stop renewing."""
        self._stop.set()
        self._thread.join(timeout=2)
