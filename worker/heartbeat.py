"""A worker process's liveness: a Redis key it keeps refreshing, which expires when the process dies."""

from __future__ import annotations

import logging
import threading

import redis

from nerv_cluster import constants

log = logging.getLogger(__name__)


class Heartbeat:
    """Refreshes ``key`` every ``interval`` seconds with a ``ttl_ms`` expiry, from a daemon thread."""

    def __init__(
        self,
        client: redis.Redis,
        key: str,
        interval: float = constants.WORKER_HEARTBEAT_INTERVAL_S,
        ttl_ms: int = constants.WORKER_HEARTBEAT_TTL_MS,
    ) -> None:
        self._client = client
        self.key = key
        self._interval = interval
        self._ttl_ms = ttl_ms
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        """Refresh the key once (also done before the thread starts, so liveness holds at once)."""
        self._client.set(self.key, "1", px=self._ttl_ms)

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
        """Stop beating and drop the key so others see this process gone at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        try:
            self._client.delete(self.key)
        except redis.RedisError:
            log.debug("could not delete heartbeat key %s", self.key)
