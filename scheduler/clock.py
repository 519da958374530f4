"""The scheduler's clock: Redis's time, so that every deadline is measured on one clock.

Workers' events are dated by Redis when they enter the log (:attr:`nerv_cluster.model.Event.logged_at`,
from the stream entry id); the scheduler compares those dates (a task's start, a retry's due time, a
circuit's cool-down) with its own ``now``. Both must come from the same clock, or a host whose clock is
off times tasks out at once or holds retries back for hours. So ``now`` is Redis ``TIME``, sampled now
and then and advanced with ``time.monotonic()`` in between (no round trip per reading).

Invariant: readings never go backwards, and stay within the sampling error (half a round trip) plus the
drift of the local monotonic clock over one sampling period of Redis's clock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import redis

from nerv_cluster import constants

log = logging.getLogger("nerv.scheduler")


class RedisClock:
    """A callable returning Redis's time in epoch seconds (a ``clock`` for the scheduler service).

    The first reading samples Redis and raises :class:`redis.RedisError` if it cannot; later samples
    that fail keep the last one, advanced locally, and are tried again one period later.
    """

    def __init__(
        self,
        client: Any,
        period_s: float = constants.CLOCK_SAMPLE_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = client
        self.period_s = period_s
        self._monotonic = monotonic
        #: Redis's time at the local monotonic instant ``_at``.
        self._base: float | None = None
        self._at = 0.0
        self._next_sample = 0.0
        self._last = 0.0

    def _sample(self, now: float) -> None:
        self._next_sample = now + self.period_s
        sent = self._monotonic()
        try:
            seconds, micros = self._redis.time()
        except redis.RedisError as exc:
            if self._base is None:
                raise
            log.debug("could not read Redis's clock (%s); going on with the last sample", exc)
            return
        got = self._monotonic()
        # Redis read its clock somewhere during the round trip: the middle is the best guess.
        self._base, self._at = int(seconds) + int(micros) / 1e6, (sent + got) / 2

    def __call__(self) -> float:
        """Redis's time now, in epoch seconds."""
        now = self._monotonic()
        if self._base is None or now >= self._next_sample:
            self._sample(now)
        assert self._base is not None
        reading = self._base + (self._monotonic() - self._at)
        # A new sample may land a little behind the extrapolation of the one before: never go back.
        self._last = max(self._last, reading)
        return self._last
