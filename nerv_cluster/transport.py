"""kombu's Redis transport, with one fix that keeps workers alive through a Redis restart.

kombu 5.7.0: when the broker connection drops, Celery closes the channel, but the channel is still used
afterwards (to requeue the messages the worker had reserved, or to ack a task that finishes after the
reconnect). Its connection is gone by then, so kombu raises ``AttributeError`` building a new client,
Celery takes that for an unrecoverable error, and the worker exits. We raise a connection error there
instead, which kombu and Celery already handle: the ack or requeue is skipped and logged, and the
message stays in kombu's unacked hash in Redis until the visibility timeout brings it back. Nothing
runs twice for that: the scheduler resends dispatched-but-not-started jobs as soon as it reconnects,
and a worker claims an attempt once.
"""

from __future__ import annotations

from typing import Any

import redis
from kombu.transport import redis as kombu_redis


class _ReportsClosed:
    """Reports use of a channel after its connection is gone as a connection error."""

    connection: Any

    def _connparams(self, asynchronous: bool = False) -> Any:
        if self.connection is None or self.connection.client is None:
            raise redis.ConnectionError("this broker channel was closed with its lost connection")
        return super()._connparams(asynchronous=asynchronous)  # type: ignore[misc]


class Channel(_ReportsClosed, kombu_redis.Channel):
    """Redis channel that reports use after its connection is gone as a connection error."""


#: A Redis at ``maxmemory`` (``noeviction``) refuses kombu's bookkeeping writes (the unacked index)
#: with ``OutOfMemoryError``, which Celery takes for an unrecoverable error: the worker exits. Counted as
#: a connection error instead, Celery reconnects with backoff until memory is there again, and the
#: messages stay in Redis (issue 17, the full-memory drill). kombu reads these from the transport class.
CONNECTION_ERRORS = (*kombu_redis.Transport.connection_errors, redis.exceptions.OutOfMemoryError)


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel`, riding out a full Redis."""

    Channel = Channel
    connection_errors = CONNECTION_ERRORS


class SentinelChannel(_ReportsClosed, kombu_redis.SentinelChannel):
    """kombu's Sentinel channel (it asks the Sentinels for the primary on each new connection) with the
    same fix."""


class SentinelTransport(kombu_redis.SentinelTransport):
    """kombu's Redis Sentinel transport with :class:`SentinelChannel` (``sentinel://`` brokers)."""

    Channel = SentinelChannel
    connection_errors = CONNECTION_ERRORS


class _WatcherQoS(kombu_redis.QoS):
    """kombu's QoS that never brings back other consumers' unacknowledged messages (kombu's periodic
    ``restore_visible``, which takes a mutex and pushes the messages back onto their queues): writes
    a watcher such as Flower must not make. The workers (and the scheduler's sends) still do it."""

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> None:
        return None


class WatcherChannel(Channel):
    """:class:`Channel` with :class:`_WatcherQoS`: for a process that only watches (Flower)."""

    QoS = _WatcherQoS


class WatcherTransport(Transport):
    """:class:`Transport` for watchers (``NERV_BROKER_RESTORE=0``): its Redis user (``nerv_cluster.acl``,
    the flower role) needs no write on the queues or the unacked hashes."""

    Channel = WatcherChannel


class SentinelWatcherChannel(SentinelChannel):
    """:class:`SentinelChannel` with :class:`_WatcherQoS`."""

    QoS = _WatcherQoS


class SentinelWatcherTransport(SentinelTransport):
    """:class:`SentinelTransport` for watchers."""

    Channel = SentinelWatcherChannel
