"""kombu's Redis transport, with fixes that keep workers alive: through a Redis restart, at a full
Redis, and whatever is pushed into a queue's list.

kombu 5.7.0: when the broker connection drops, Celery closes the channel, but the channel is still used
afterwards (to requeue the messages the worker had reserved, or to ack a task that finishes after the
reconnect). Its connection is gone by then, so kombu raises ``AttributeError`` building a new client,
Celery takes that for an unrecoverable error, and the worker exits. We raise a connection error there
instead, which kombu and Celery already handle: the ack or requeue is skipped and logged, and the
message stays in kombu's unacked hash in Redis until the visibility timeout brings it back. Nothing
runs twice for that: the scheduler resends dispatched-but-not-started jobs as soon as it reconnects,
and a worker claims an attempt once.

Anything can be LPUSHed into a queue's list by whoever reaches Redis. kombu 5.7.0 decodes an entry
while it reads it and hands it on: bytes that are no JSON, nesting too deep, an envelope of another
shape or a body Celery's strategy cannot read raise out of the consumer loop, which Celery takes for an
unrecoverable error: the worker exits (and an entry that got as far as the unacked hash comes back to
the next worker after the visibility timeout). So every entry is checked first (:func:`check_message`)
and one that is not a message nerv's scheduler could have sent is dropped with a warning.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import Empty
from kombu.utils.encoding import bytes_to_str

from nerv_cluster import constants
from nerv_cluster.errors import MalformedJobError

log = logging.getLogger("nerv.worker")

#: Celery's protocol 2 headers (5.7) and what each may hold; another header may hold a JSON scalar.
_TEXT_OR_NONE = (str, type(None))
_HEADERS: dict[str, tuple[type, ...]] = {
    "lang": (str,),
    "shadow": _TEXT_OR_NONE,
    "group": _TEXT_OR_NONE,
    "group_index": (int, type(None)),
    "root_id": _TEXT_OR_NONE,
    "parent_id": _TEXT_OR_NONE,
    "argsrepr": _TEXT_OR_NONE,
    "kwargsrepr": _TEXT_OR_NONE,
    "origin": _TEXT_OR_NONE,
    "ignore_result": (bool, type(None)),
    "replaced_task_nesting": (int,),
    "stamped_headers": (list, type(None)),
    "stamps": (dict,),
}
_SCALARS = (str, int, float, bool, type(None))
#: The embedded options of a body: nerv sends none (a callback would make Celery call another task).
_EMBED = ("callbacks", "errbacks", "chain", "chord")


def _need(ok: bool, why: str) -> None:
    if not ok:
        raise MalformedJobError(why)


def _number_or_none(value: Any) -> bool:
    return value is None or (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    )


def check_envelope(item: Any) -> dict[str, Any]:
    """The kombu message of an entry of a queue other than nerv's job queues (Celery's event and reply
    queues): a JSON object with properties, whatever its body; :class:`MalformedJobError` otherwise,
    so an entry kombu could not deliver is dropped instead of stopping the consumer."""
    try:
        msg = json.loads(bytes_to_str(item))
    except (ValueError, TypeError, RecursionError) as exc:
        raise MalformedJobError(f"not a kombu message: {type(exc).__name__}") from None
    _need(isinstance(msg, dict) and isinstance(msg.get("properties"), dict), "not a kombu message")
    _need(isinstance(msg["properties"].get("delivery_tag", ""), str), "a kombu message without a tag")
    return msg


def check_message(item: Any) -> dict[str, Any]:
    """The kombu message of a queue list entry, checked to be one nerv's scheduler could have sent
    (Celery protocol 2, a JSON body ``[args, {}, embed]`` with nothing embedded, no ETA or expiry);
    :class:`MalformedJobError` saying why not. The jobs themselves are checked by the worker's task
    (``Job.from_wire``: signed, then ``jobs.parse_job``)."""
    try:
        msg = json.loads(bytes_to_str(item))
    except (ValueError, TypeError, RecursionError) as exc:  # not UTF-8, not JSON, nested too deep
        raise MalformedJobError(f"not a kombu message: {type(exc).__name__}") from None
    _need(isinstance(msg, dict), "not a kombu message: no JSON object")
    headers, props = msg.get("headers"), msg.get("properties")
    _need(
        isinstance(headers, dict) and isinstance(props, dict), "a kombu message without headers or properties"
    )
    task, mid = headers.get("task"), headers.get("id")
    _need(isinstance(task, str) and bool(task) and isinstance(mid, str) and bool(mid), "no task name or id")
    where = f"message {mid!r:.80} for {task!r:.80}"
    for key, value in headers.items():
        kinds = _HEADERS.get(key)
        if key in ("task", "id"):
            continue
        if key in ("eta", "expires"):
            _need(value is None, f"{where}: {key} set (nerv keeps delays in the scheduler)")
        elif key == "retries":
            _need(type(value) is int and value >= 0, f"{where}: retries {value!r:.40}")
        elif key == "timelimit":
            _need(
                isinstance(value, list) and len(value) == 2 and all(_number_or_none(v) for v in value),
                f"{where}: timelimit {value!r:.40}",
            )
        elif kinds is not None:
            _need(isinstance(value, kinds), f"{where}: header {key!r} holds {value!r:.40}")
        else:
            _need(isinstance(value, _SCALARS), f"{where}: header {key!r:.40} holds {value!r:.40}")
    info, tag, priority = props.get("delivery_info"), props.get("delivery_tag"), props.get("priority", 0)
    _need(
        props.get("body_encoding") == "base64", f"{where}: body encoding {props.get('body_encoding')!r:.40}"
    )
    _need(isinstance(tag, str) and bool(tag), f"{where}: no delivery tag")
    _need(
        isinstance(info, dict) and all(isinstance(info.get(k), str) for k in ("exchange", "routing_key")),
        f"{where}: no delivery info",
    )
    _need(type(priority) is int and 0 <= priority <= 255, f"{where}: priority {priority!r:.40}")
    ctype, encoding, body = msg.get("content-type"), msg.get("content-encoding"), msg.get("body")
    _need(
        ctype == "application/json",
        f"{where}: content type {ctype!r:.60} is not JSON (pickle and the like never run)",
    )
    _need(encoding == "utf-8" and isinstance(body, str), f"{where}: body not utf-8 text")
    try:
        decoded = json.loads(base64.b64decode(body, validate=True).decode("utf-8"))
    except (ValueError, binascii.Error, RecursionError) as exc:
        raise MalformedJobError(f"{where}: the body is no JSON ({type(exc).__name__})") from None
    _need(
        isinstance(decoded, list)
        and len(decoded) == 3
        and isinstance(decoded[0], list)
        and isinstance(decoded[1], dict)
        and isinstance(decoded[2], dict),
        f"{where}: the body is not Celery's [args, kwargs, embed]",
    )
    _need(all(decoded[2].get(k) is None for k in _EMBED), f"{where}: the body embeds callbacks")
    return msg


class _RefusesGarbage:
    """Checks each entry a BRPOP took before kombu hands it on (kombu 5.7.0's ``_brpop_read`` with
    :func:`check_message` in the middle): an entry that is no message is dropped with a warning."""

    client: Any
    connection: Any
    connection_errors: Any
    sep: str
    _queue_cycle: Any
    _in_poll: Any

    def _brpop_read(self, **options: Any) -> bool:
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                # As kombu: a lost connection is dropped, so the next iteration reconnects.
                self.client.connection.disconnect()
                raise
            if not dest__item:
                raise Empty()
            dest, item = dest__item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            try:
                # nerv's job queues hold only the scheduler's messages; the others (Flower's event
                # queues, control replies) hold Celery's own, which need only be kombu messages.
                strict = dest.rsplit(":", 1)[-1] in constants.QUEUES
                message = check_message(item) if strict else check_envelope(item)
            except MalformedJobError as exc:
                log.warning("refused an entry of queue %.40r that is no job message: %s", dest, exc)
                return True
            self.connection._deliver(message, dest)
            return True
        finally:
            self._in_poll = None
            flush = getattr(self, "_flush_brpop_reauth", None)
            if flush is not None:
                flush()


class _ReportsClosed:
    """Reports use of a channel after its connection is gone as a connection error."""

    connection: Any

    def _connparams(self, asynchronous: bool = False) -> Any:
        if self.connection is None or self.connection.client is None:
            raise redis.ConnectionError("this broker channel was closed with its lost connection")
        return super()._connparams(asynchronous=asynchronous)  # type: ignore[misc]


class Channel(_RefusesGarbage, _ReportsClosed, kombu_redis.Channel):
    """Redis channel that reports use after its connection is gone as a connection error and drops
    queue entries that are no job messages."""


#: A Redis at ``maxmemory`` (``noeviction``) refuses kombu's bookkeeping writes (the unacked index)
#: with ``OutOfMemoryError``, which Celery takes for an unrecoverable error: the worker exits. Counted as
#: a connection error instead, Celery reconnects with backoff until memory is there again, and the
#: messages stay in Redis (issue 17, the full-memory drill). kombu reads these from the transport class.
CONNECTION_ERRORS = (*kombu_redis.Transport.connection_errors, redis.exceptions.OutOfMemoryError)


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel`, riding out a full Redis."""

    Channel = Channel
    connection_errors = CONNECTION_ERRORS


class SentinelChannel(_RefusesGarbage, _ReportsClosed, kombu_redis.SentinelChannel):
    """kombu's Sentinel channel (it asks the Sentinels for the primary on each new connection) with the
    same fixes."""


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
