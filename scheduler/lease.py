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
from nerv_cluster.errors import ReplicationError
from nerv_cluster.eventlog import EventLog

log = logging.getLogger("nerv.scheduler")

#: A leader whose loop made no progress for this long stops renewing, so a standby can take over
#: (the default of ``Settings.loop_stall_s``).
LOOP_STALL_S = constants.DEFAULT_LOOP_STALL_S


class LoopProgress:
    """How long the scheduler loop has gone without progress, for :class:`LeaseKeeper`.

    Invariant: progress is a *completed* step (or taking the lease, which starts a term), never merely
    an iteration of the loop, so a leader whose every step raises looks as stalled as a wedged one.
    A refold is slow but moving; it counts as progress while it runs (each run folded), but only the
    first refold after a completed step or a new term: a loop that refolds and fails, again and again,
    earns nothing from its refolds.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._done = clock()
        self._refold_tick: float | None = None
        self._may_refold = True

    def acquired(self) -> None:
        """A new term began: that is progress."""
        self._done = self._clock()
        self._may_refold = True

    def step_done(self) -> None:
        """A step completed."""
        self._done = self._clock()
        self._may_refold = True

    def refold_started(self) -> None:
        """A refold begins; it counts as progress only if a step completed (or a term began) since
        the last one."""
        if self._may_refold:
            self._may_refold = False
            self._refold_tick = self._clock()

    def refold_tick(self) -> None:
        """A refold moved on (one run folded)."""
        if self._refold_tick is not None:
            self._refold_tick = self._clock()

    def refold_done(self) -> None:
        """The refold ended; when it counted, the first step has a whole stall bound from now."""
        if self._refold_tick is not None:
            self._done = self._clock()
            self._refold_tick = None

    def stalled_for(self) -> float:
        """Seconds without progress."""
        last = self._refold_tick if self._refold_tick is not None else self._done
        return self._clock() - last


class Lease:
    """The scheduler lease. ``held`` is this process's belief, bounded by the lease's own expiry."""

    def __init__(self, log: EventLog, ttl_ms: int = constants.DEFAULT_LEASE_TTL_MS) -> None:
        self._log = log
        self.ttl_ms = ttl_ms
        self.token: str | None = None
        self._valid_until = 0.0
        self._renewed_at = 0.0
        #: A stalled leader that let its lease lapse stays out of the race until then (monotonic).
        self._hold_off_until = 0.0
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
            try:
                got = self._log.scripts.lease(
                    lease=k.lease,
                    epoch=k.epoch,
                    token=token,
                    ttl_ms=self.ttl_ms,
                    renew_only=renew_only,
                    nonce=nonce,
                )
            except ReplicationError as exc:
                # No replica holds this term (a cut-off old primary after a failover, or the replicas
                # gone): a lease that may not survive a failover is no lease; step down (issue 17).
                log.warning("lease not replicated, not held: %s", exc)
                got = None
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
        """Take the lease if nobody holds it; True when we hold it afterwards (never during a
        :meth:`hold_off`)."""
        if time.monotonic() < self._hold_off_until:
            return False
        return self._call(self.token or "", renew_only=False)

    def hold_off(self, seconds: float) -> None:
        """Do not take the lease again for ``seconds``: this replica let it lapse because it is stuck,
        and a standby should win it."""
        self._hold_off_until = time.monotonic() + seconds

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
            self._log.scripts.release(lease=self._log.keys.lease, token=self.token)
        self.drop()

    def holder(self) -> str | None:
        """The token of whoever holds the lease now, if anyone."""
        value = self._log.redis.get(self._log.keys.lease)
        return None if value is None else str(value)


class LeaseKeeper:
    """Renews a held lease from a thread, so a long step (a big refold, a burst) never loses it.

    It renews only while ``progress()`` (seconds without progress, see :class:`LoopProgress`) stays
    under ``stall_s``: a wedged or crash-looping leader lets its lease lapse, stays out of the race for
    a while (:meth:`Lease.hold_off`), and a standby takes over.
    """

    def __init__(self, lease: Lease, progress: Callable[[], float], stall_s: float = LOOP_STALL_S) -> None:
        self.lease = lease
        self.progress = progress
        self.stall_s = stall_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="nerv-lease", daemon=True)

    def start(self) -> None:
        """Start renewing."""
        self._thread.start()

    def _stalled(self) -> bool:
        """True (and the lease held off) when the loop made no progress for longer than allowed."""
        stalled = self.progress()
        if stalled <= self.stall_s:
            return False
        log.error("scheduler loop made no progress for %.1fs; letting the lease lapse", stalled)
        self.lease.hold_off(self.lease.ttl_ms / 1000 * constants.STALLED_HOLD_OFF_TTLS)
        return True

    def renew(self) -> bool:
        """Renew now, for the loop itself (after an error); False, as if lost, when it is stalled."""
        return not self._stalled() and self.lease.renew()

    def _loop(self) -> None:
        interval = self.lease.ttl_ms / 1000 / constants.LEASE_RENEW_FRACTION
        while not self._stop.wait(interval / 2):
            if self.lease.token is None or not self.lease.renew_due:
                continue
            if self._stalled():
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
