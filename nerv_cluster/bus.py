"""The EventBus (Blinker signals, middleware, bounded history) and its bridge from Redis pub/sub.

Pub/sub is at-most-once: the bridge is for live listeners. Anything that must not miss an event reads
the event log instead (``Client.wait``, ``Client.events``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import redis
from blinker import ANY, Namespace, Signal

from nerv_cluster import caching, constants
from nerv_cluster.model import Event, EventType

log = logging.getLogger(__name__)

Handler = Callable[[Event], Any]
Middleware = Callable[[Event], Event | None]

#: Subscribe to this instead of an event type to receive every event.
ALL = "*"


class EventBus:
    """Event dispatch over Blinker signals, one signal per event type (plus ``"*"`` for all).

    Handlers are called as ``handler(event)``; the signal's sender is the run id, so
    ``subscribe(..., sender=run_id)`` narrows to one run. Handlers are held by weak reference unless
    ``weak=False``. Middleware runs in order before dispatch and may return a changed event, or None to
    drop it. A failing handler or middleware is logged and skipped; it never stops the others.
    """

    def __init__(
        self,
        history_limit: int = constants.DEFAULT_HISTORY_LIMIT,
        history_bytes: int = constants.DEFAULT_HISTORY_BYTES,
    ) -> None:
        self._signals = Namespace()
        self._middleware: list[Middleware] = []
        # Bounded by count and by bytes (of the events' JSON): a few events with big results must not
        # hold a client's memory hostage. Invariant: _history_size is the sum of the sizes in _history.
        self._history: deque[tuple[Event, int]] = deque()
        self._history_limit = history_limit
        self._history_bytes = history_bytes
        self._history_size = 0
        self._lock = threading.RLock()

    def signal(self, event_type: EventType | str) -> Signal:
        """The Blinker signal of an event type (``"*"`` for the catch-all signal)."""
        name = ALL if event_type == ALL else EventType.parse(event_type).value
        return self._signals.signal(name)

    def subscribe(
        self, event_type: EventType | str, handler: Handler, *, sender: str | None = None, weak: bool = True
    ) -> Callable[[], None]:
        """Call ``handler(event)`` for each event of this type (from run ``sender`` only, if given).

        Returns a function that unsubscribes. With ``weak=True`` (the default) the bus does not keep the
        handler alive: keep a reference to it for as long as it should receive events.
        """
        sig = self.signal(event_type)
        sig.connect(handler, sender=ANY if sender is None else sender, weak=weak)

        def unsubscribe() -> None:
            sig.disconnect(handler, sender=ANY if sender is None else sender)

        return unsubscribe

    def use(self, middleware: Middleware) -> Callable[[], None]:
        """Add a middleware; returns a function that removes it."""
        with self._lock:
            self._middleware.append(middleware)

        def remove() -> None:
            with self._lock:
                if middleware in self._middleware:
                    self._middleware.remove(middleware)

        return remove

    def publish(self, event: Event) -> Event | None:
        """Run middleware, record history, and dispatch; returns the event dispatched (None if dropped)."""
        with self._lock:
            chain = list(self._middleware)
        current = event
        for mw in chain:
            try:
                changed = mw(current)
            except Exception:
                log.exception("event bus middleware %r failed; event passed on unchanged", mw)
                continue
            if changed is None:
                return None
            current = changed
        self._remember(current)
        for name in (current.type.value, ALL):
            sig = self._signals.get(name)
            if sig is None:
                continue
            for receiver in sig.receivers_for(current.run_id):
                try:
                    receiver(current)
                except Exception:
                    log.exception("event handler %r failed on %s", receiver, current.type.value)
        return current

    def _remember(self, event: Event) -> None:
        """Add ``event`` to the history, dropping the oldest ones past the count or byte bound (an
        event bigger than the byte bound on its own is not kept)."""
        size = len(event.to_json())
        with self._lock:
            history = self._history
            history.append((event, size))
            self._history_size += size
            while history and (
                len(history) > self._history_limit or self._history_size > self._history_bytes
            ):
                self._history_size -= history.popleft()[1]

    @property
    def history_size(self) -> int:
        """Bytes (of JSON) of the events in the history."""
        return self._history_size

    def history(self, run_id: str | None = None, event_type: EventType | str | None = None) -> list[Event]:
        """The most recent events dispatched (bounded by count and by bytes), optionally of one run
        and/or one type."""
        kind = EventType.parse(event_type) if event_type is not None else None
        with self._lock:
            items = [e for e, _ in self._history]
        return [
            e for e in items if (run_id is None or e.run_id == run_id) and (kind is None or e.type is kind)
        ]


class RedisBridge:
    """Feeds every event announced on the runs' pub/sub channels into an :class:`EventBus`.

    One daemon thread per bridge; redis-py reconnects and resubscribes after connection errors.
    """

    def __init__(self, client: redis.Redis, keys: constants.Keys, bus: EventBus) -> None:
        self._client = client
        self._keys = keys
        self._bus = bus
        self._thread: Any = None
        self._pubsub: Any = None
        self._lock = threading.Lock()
        self.ready = threading.Event()

    @property
    def running(self) -> bool:
        """True while the listener thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start listening (idempotent); returns once the subscription is active."""
        with self._lock:
            if self.running:
                return
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            pubsub.psubscribe(**{self._keys.channel_pattern: self._on_message})
            # The first get_message completes the subscription handshake before we report ready.
            pubsub.get_message(timeout=1.0)
            self._pubsub = pubsub
            self._thread = pubsub.run_in_thread(sleep_time=0.5, daemon=True, exception_handler=self._on_error)
            self.ready.set()

    def _on_message(self, message: dict[str, Any]) -> None:
        try:
            event = Event.from_json(message["data"])
        except Exception:
            log.warning("ignoring malformed message on %s", message.get("channel"))
            return
        for ev in caching.expand(event):  # a CACHE_HITS: one TASK_COMPLETED per hit, as in the log's readers
            self._bus.publish(ev)

    def _on_error(self, exc: BaseException, pubsub: Any, thread: Any) -> None:
        # redis-py reconnects and resubscribes on the next read; pause so a Redis outage is not a busy loop.
        log.warning("pub/sub bridge: %s; reconnecting", exc)
        time.sleep(0.5)

    def stop(self) -> None:
        """Stop listening and close the subscription."""
        with self._lock:
            if self._thread is not None:
                self._thread.stop()
                self._thread.join(timeout=2)
                self._thread = None
            if self._pubsub is not None:
                self._pubsub.close()
                self._pubsub = None
            self.ready.clear()
