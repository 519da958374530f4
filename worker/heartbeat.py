"""A worker process's liveness: a Redis key it keeps refreshing, which expires when the process dies.

The key's value says what the process holds (JSON, see :func:`beat_value`): the attempts it runs, so
the scheduler can tell "the process lives" from "the process still runs this attempt", and its queues.
A process that consumes messages (and so may hold prefetched ones) also registers itself in the
workers hash (``Keys.workers``) on every beat and deregisters on a clean stop: a registered process
whose heartbeat lapsed died holding whatever it had prefetched, and the scheduler resends the queued
jobs of its queues (``scheduler.liveness``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Sequence

import redis

from nerv_cluster import constants

log = logging.getLogger(__name__)


def beat_value(held: Sequence[str], queues: Sequence[str]) -> str:
    """The heartbeat's JSON value: ``{"held": [job ids], "queues": [names]}``."""
    return json.dumps({"held": list(held), "queues": list(queues)}, separators=(",", ":"))


class Heartbeat:
    """Refreshes ``key`` every ``interval`` seconds with a ``ttl_ms`` expiry, from a daemon thread.

    ``held``: returns the job ids this process holds now (published with each beat).
    """

    def __init__(
        self,
        client: redis.Redis,
        key: str,
        interval: float = constants.WORKER_HEARTBEAT_INTERVAL_S,
        ttl_ms: int = constants.WORKER_HEARTBEAT_TTL_MS,
        held: Callable[[], Sequence[str]] = list,
        workers_key: str = "",
        worker_id: str = "",
    ) -> None:
        self._client = client
        self.key = key
        self._interval = interval
        self._ttl_ms = ttl_ms
        self._held = held
        self._workers_key = workers_key
        self._worker_id = worker_id
        self._queues: list[str] = []
        #: Set by :meth:`register`: this process consumes messages (registered on every beat).
        self._registration = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def register(self, queues: Sequence[str], node: str) -> None:
        """From now on, register this process in the workers hash with ``queues`` on every beat (it
        consumes messages from them), and beat at once."""
        self._queues = list(queues)
        self._registration = json.dumps({"queues": self._queues, "node": node, "pid": os.getpid()})
        self.beat()

    def beat(self) -> None:
        """Refresh the key once (also done before the thread starts, so liveness holds at once)."""
        value = beat_value(self._held(), self._queues)
        if self._registration and self._workers_key:
            pipe = self._client.pipeline(transaction=False)
            pipe.set(self.key, value, px=self._ttl_ms)
            pipe.hset(self._workers_key, self._worker_id, self._registration)
            pipe.execute()
        else:
            self._client.set(self.key, value, px=self._ttl_ms)

    def start(self) -> None:
        """Beat now and keep beating until :meth:`stop`."""
        self.beat()
        self._thread = threading.Thread(target=self._loop, name="nerv-heartbeat", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.beat()
            except redis.RedisError as exc:  # Redis down: keep trying, liveness resumes with it
                log.warning("heartbeat %s failed: %s", self.key, exc)

    def stop(self) -> None:
        """Stop beating, deregister, and drop the key so others see this process gone at once (a clean
        stop: whatever it had prefetched went back to the queue)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        try:
            if self._registration and self._workers_key:
                self._client.hdel(self._workers_key, self._worker_id)
            self._client.delete(self.key)
        except redis.RedisError:
            log.debug("could not delete heartbeat key %s", self.key)
