"""The durable event log in Redis: one Stream per run (the source of truth) plus the scheduler's feed.

Writers: the client (submit, cancel), workers (started, completed, failed, retrying) and the scheduler
(dispatched, skipped, run outcomes, fenced by its lease). Every write also announces the event on the
run's pub/sub channel, which is only a hint for live listeners.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from functools import cache
from importlib import resources
from typing import Any

import redis

from nerv_cluster import constants
from nerv_cluster.errors import LeaseLostError, NervError, RunNotFoundError
from nerv_cluster.model import Event

#: A stream entry id and the event stored under it.
Entry = tuple[str, Event]


@cache
def lua_source(name: str) -> str:
    """The text of ``nerv_cluster/lua/<name>.lua``."""
    return resources.files("nerv_cluster").joinpath("lua").joinpath(f"{name}.lua").read_text()


class Scripts:
    """The Lua scripts, registered on one Redis client (EVALSHA, reloaded on NOSCRIPT by redis-py)."""

    def __init__(self, client: redis.Redis) -> None:
        self.submit = client.register_script(lua_source("submit"))
        self.append = client.register_script(lua_source("append"))
        self.fenced_append = client.register_script(lua_source("fenced_append"))
        self.start = client.register_script(lua_source("start"))
        self.finish = client.register_script(lua_source("finish"))
        self.lease = client.register_script(lua_source("lease"))
        self.release = client.register_script(lua_source("release"))
        self.supersede = client.register_script(lua_source("supersede"))


def _decode(entries: Sequence[tuple[str, dict[str, str]]]) -> list[Entry]:
    return [(eid, Event.from_json(fields[constants.EVENT_FIELD])) for eid, fields in entries]


def _fenced(script: Any, keys: list[str], args: list[Any]) -> list[Any]:
    """Run a script that checks the lease token; :class:`LeaseLostError` when it no longer holds."""
    try:
        return list(script(keys=keys, args=args))
    except redis.ResponseError as exc:
        if "LEASE_LOST" in str(exc):
            raise LeaseLostError(str(exc)) from exc
        raise


def attempt_field(task_id: str, attempt: int) -> str:
    """The hash field naming one attempt of one task."""
    return f"{task_id}:{attempt}"


class EventLog:
    """Reads and writes the event log. The Redis client must decode responses (``decode_responses=True``)."""

    def __init__(self, client: redis.Redis, keys: constants.Keys) -> None:
        # redis-py types replies as bytes | str; this client decodes, so they are str. Any says so here
        # once instead of a cast at every call site.
        self.redis: Any = client
        self.keys = keys
        self.scripts = Scripts(client)

    # -- writes ---------------------------------------------------------------------------------------

    def submit(self, event: Event) -> None:
        """Record a WORKFLOW_SUBMITTED event: the run exists from here on."""
        k = self.keys
        try:
            self.scripts.submit(
                keys=[k.log(event.run_id), k.feed, k.active, k.runs],
                args=[
                    event.run_id,
                    k.channel(event.run_id),
                    event.to_json(),
                    event.ts,
                    constants.FEED_MAXLEN,
                ],
            )
        except redis.ResponseError as exc:
            if "RUN_EXISTS" not in str(exc):
                raise
            # A retry after a lost reply finds its own first try: that is success, not a clash.
            first = self.redis.xrange(k.log(event.run_id), count=1)
            if not (first and Event.from_json(first[0][1][constants.EVENT_FIELD]).id == event.id):
                raise NervError(str(exc).removeprefix("RUN_EXISTS ")) from exc

    def append(self, events: Sequence[Event]) -> None:
        """Append events (of any runs) to their run logs and the feed, one script call per run, pipelined."""
        by_run: dict[str, list[str]] = defaultdict(list)
        for ev in events:
            by_run[ev.run_id].append(ev.to_json())
        k = self.keys
        pipe = self.redis.pipeline(transaction=False)
        for run_id, payloads in by_run.items():
            self.scripts.append(
                keys=[k.log(run_id), k.feed],
                args=[k.channel(run_id), constants.FEED_MAXLEN, *payloads],
                client=pipe,
            )
        pipe.execute()

    def append_fenced(
        self, events: Sequence[Event], token: str, handoffs: Sequence[tuple[Event, str]] = ()
    ) -> list[bool]:
        """Append the scheduler's events; :class:`LeaseLostError` if ``token`` no longer holds the lease.

        ``handoffs``: (TASK_STARTED event naming the worker, job JSON) pairs, written in the same atomic
        step after the events: each job goes to its worker's hand-off list and its attempt is claimed
        for that worker, if the worker still waits. Returns, per hand-off, whether it was handed.
        """
        if not events and not handoffs:
            return []
        k = self.keys
        keys = [k.lease]
        index: dict[str, int] = {}
        args: list[Any] = [token]
        for ev in events:
            if ev.run_id not in index:
                keys.append(k.log(ev.run_id))
                index[ev.run_id] = len(keys)
            payload = ev.to_json()
            args.extend((index[ev.run_id], k.channel(ev.run_id), payload))
            if ev.type.value.startswith("CIRCUIT_"):
                # Also in the cluster-wide circuits stream, which a new leader refolds.
                if k.circuits not in index:
                    keys.append(k.circuits)
                    index[k.circuits] = len(keys)
                args.extend((index[k.circuits], "", payload))
        args.insert(1, (len(args) - 1) // 3)  # the number of (key, channel, event) triples
        if handoffs:
            args.append(constants.HANDOFF_TTL_MS)
            for started, job in handoffs:
                assert started.task_id is not None and started.attempt is not None
                worker = str(started.data["worker"])
                rid = started.run_id
                keys += [k.handoff_waiting(worker), k.handoff(worker), k.log(rid), k.claims(rid)]
                args += [attempt_field(started.task_id, started.attempt), worker, k.channel(rid)]
                args += [started.to_json(), job]
        # One script, not a pipeline of two: a pipeline of scripts costs redis-py an extra round trip
        # (SCRIPT EXISTS) every time, and this is on every hop of a chain.
        return [bool(x) for x in _fenced(self.scripts.fenced_append, keys, args)]

    def start_attempts(
        self,
        events: Sequence[Event],
        worker_id: str,
        max_takeovers: int,
        outcomes: Sequence[Event] = (),
    ) -> list[str]:
        """Claim the attempts named by TASK_STARTED events, in one round trip; a verdict per event:
        ``'ok'`` (run it), ``'done'``, ``'busy'`` or ``'poison'`` (``max_takeovers`` holders died).

        ``outcomes``: outcome events of earlier attempts, recorded first in the same round trip (each
        once, like :meth:`finish_attempts`).
        """
        k = self.keys
        keys: list[str] = [k.feed]
        args: list[Any] = [worker_id, k.heartbeat_prefix, constants.FEED_MAXLEN, max_takeovers, len(outcomes)]
        for ev in outcomes:
            assert ev.task_id is not None and ev.attempt is not None
            keys += [k.log(ev.run_id), k.outcomes(ev.run_id)]
            args += [attempt_field(ev.task_id, ev.attempt), ev.type.value, k.channel(ev.run_id), ev.to_json()]
        for ev in events:
            assert ev.task_id is not None and ev.attempt is not None
            keys += [k.log(ev.run_id), k.outcomes(ev.run_id), k.claims(ev.run_id)]
            args += [attempt_field(ev.task_id, ev.attempt), k.channel(ev.run_id), ev.to_json()]
        return [str(v) for v in self.scripts.start(keys=keys, args=args)]

    def start_attempt(self, event: Event, worker_id: str, max_takeovers: int) -> str:
        """:meth:`start_attempts` for one attempt."""
        return self.start_attempts([event], worker_id, max_takeovers)[0]

    def finish_attempts(self, events: Sequence[Event], waiting: str = "") -> list[bool]:
        """Record attempts' outcome events in one round trip; False where that attempt already had one.

        ``waiting``: the worker id that will wait for a hand-off once the last outcome is recorded.
        """
        if not events:
            return []
        k = self.keys
        keys: list[str] = [k.feed]
        args: list[Any] = [
            constants.FEED_MAXLEN,
            k.handoff_waiting(waiting) if waiting else "",
            constants.HANDOFF_TTL_MS,
        ]
        for ev in events:
            assert ev.task_id is not None and ev.attempt is not None
            keys += [k.log(ev.run_id), k.outcomes(ev.run_id)]
            args += [attempt_field(ev.task_id, ev.attempt), ev.type.value, k.channel(ev.run_id), ev.to_json()]
        return [bool(v) for v in self.scripts.finish(keys=keys, args=args)]

    def finish_attempt(self, event: Event) -> bool:
        """:meth:`finish_attempts` for one attempt."""
        return self.finish_attempts([event])[0]

    def supersede(self, attempts: Sequence[tuple[str, str, int]], token: str, why: str) -> list[bool]:
        """Take the outcome slot of each (run, task, attempt); True where we got it (no outcome yet).

        A worker that finishes such an attempt later finds the slot taken and records nothing; one that
        picks its job up later does not run it.
        """
        if not attempts:
            return []
        k = self.keys
        keys = [k.lease]
        index: dict[str, int] = {}
        args: list[Any] = [token, why]
        for run_id, task_id, attempt in attempts:
            if run_id not in index:
                keys.append(k.outcomes(run_id))
                index[run_id] = len(keys)
            args.extend((index[run_id], attempt_field(task_id, attempt)))
        return [bool(x) for x in _fenced(self.scripts.supersede, keys, args)]

    def close_runs(self, run_ids: Sequence[str], retention_seconds: int) -> None:
        """Runs are over: drop them from the active set and let their keys expire after the retention time."""
        if not run_ids:
            return
        pipe = self.redis.pipeline(transaction=False)
        pipe.srem(self.keys.active, *run_ids)
        for run_id in run_ids:
            for key in self.keys.run_keys(run_id):
                pipe.expire(key, retention_seconds)
        pipe.execute()

    # -- reads ----------------------------------------------------------------------------------------

    def read_run(self, run_id: str, after: str = "-", count: int = 10_000) -> Iterator[Entry]:
        """Every event of a run after entry id ``after`` (exclusive; ``'-'`` for the start), in order."""
        key = self.keys.log(run_id)
        start = "-" if after in ("-", "0", "0-0") else f"({after}"
        while True:
            chunk = self.redis.xrange(key, min=start, max="+", count=count)
            yield from _decode(chunk)
            if len(chunk) < count:
                return
            start = f"({chunk[-1][0]}"

    def read_runs(
        self, run_ids: Sequence[str], after: Mapping[str, str] | None = None, per_trip: int = 200
    ) -> Iterator[tuple[str, list[Entry]]]:
        """The entries of each run after ``after[run_id]`` (exclusive; default: all of them), reading
        many runs per round trip (the scheduler's refold)."""
        after = after or {}
        for i in range(0, len(run_ids), per_trip):
            chunk = run_ids[i : i + per_trip]
            pipe = self.redis.pipeline(transaction=False)
            for run_id in chunk:
                since = after.get(run_id)
                pipe.xrange(self.keys.log(run_id), min=f"({since}" if since else "-", count=10_000)
            for run_id, raw in zip(chunk, pipe.execute(), strict=True):
                entries = _decode(raw)
                if len(raw) == 10_000:  # a big run: read the rest of it
                    entries.extend(self.read_run(run_id, after=raw[-1][0]))
                yield run_id, entries

    def log_lengths(self, run_ids: Sequence[str]) -> list[int]:
        """Number of entries in each run's log."""
        pipe = self.redis.pipeline(transaction=False)
        for run_id in run_ids:
            pipe.xlen(self.keys.log(run_id))
        return [int(n) for n in pipe.execute()]

    def write_checkpoint(self, run_id: str, checkpoint: Mapping[str, Any]) -> None:
        """Store a run's checkpoint (see :mod:`nerv_cluster.checkpoint`), replacing the previous one."""
        self.redis.set(self.keys.checkpoint(run_id), json.dumps(checkpoint, separators=(",", ":")))

    def read_checkpoints(self, run_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The stored checkpoints of these runs (runs without one are left out)."""
        if not run_ids:
            return {}
        raws = self.redis.mget([self.keys.checkpoint(r) for r in run_ids])
        return {rid: json.loads(raw) for rid, raw in zip(run_ids, raws, strict=True) if raw}

    def run_exists(self, run_id: str) -> bool:
        """True when the run's log exists."""
        return bool(self.redis.exists(self.keys.log(run_id)))

    def require_run(self, run_id: str) -> None:
        """Raise :class:`RunNotFoundError` unless the run exists."""
        if not self.run_exists(run_id):
            raise RunNotFoundError(
                f"no run {run_id!r} (never submitted, or expired after its retention time)"
            )

    def follow_run(self, run_id: str, after: str, block_ms: int, count: int = 10_000) -> list[Entry]:
        """Events of a run after ``after``, waiting up to ``block_ms`` for the first one."""
        reply = self.redis.xread({self.keys.log(run_id): after or "0-0"}, count=count, block=block_ms)
        return _decode(reply[0][1]) if reply else []

    def read_feed(self, after: str, count: int, block_ms: int | None) -> list[Entry]:
        """The next batch of feed events after ``after``, waiting up to ``block_ms`` when there are none."""
        reply = self.redis.xread({self.keys.feed: after}, count=count, block=block_ms)
        return _decode(reply[0][1]) if reply else []

    def feed_tail(self) -> str:
        """The id of the newest feed entry (``'0-0'`` when empty)."""
        last = self.redis.xrevrange(self.keys.feed, count=1)
        return str(last[0][0]) if last else "0-0"

    def trim_feed(self, upto: str) -> None:
        """Drop feed entries older than ``upto`` (which the leader has processed)."""
        self.redis.xtrim(self.keys.feed, minid=upto, approximate=False)

    def circuit_events(self) -> list[Event]:
        """Every logged circuit transition, oldest first."""
        return [ev for _, ev in _decode(self.redis.xrange(self.keys.circuits))]

    def trim_circuits(self) -> None:
        """Keep the circuits stream short."""
        self.redis.xtrim(self.keys.circuits, maxlen=constants.CIRCUITS_MAXLEN, approximate=True)

    def announce_capacity(self, node: str, queues: Sequence[str], concurrency: int) -> None:
        """A worker node says which queues it serves with how many slots."""
        info = {"queues": list(queues), "concurrency": concurrency, "at": time.time()}
        self.redis.hset(self.keys.capacity, node, json.dumps(info))

    def withdraw_capacity(self, node: str) -> None:
        """A worker node stops serving."""
        self.redis.hdel(self.keys.capacity, node)

    def capacity(self) -> dict[str, int]:
        """Worker slots per queue, over nodes that announced themselves recently."""
        out: dict[str, int] = {}
        fresh = time.time() - constants.CAPACITY_STALE_S
        for raw in self.redis.hvals(self.keys.capacity):
            info = json.loads(raw)
            if info["at"] < fresh:
                continue
            for q in info["queues"]:
                out[q] = out.get(q, 0) + int(info["concurrency"])
        return out

    def queue_lengths(self, queues: Sequence[str]) -> list[int]:
        """Messages waiting in these Celery queues (not yet taken by any worker)."""
        pipe = self.redis.pipeline(transaction=False)
        for q in queues:
            pipe.llen(q)
        return [int(n) for n in pipe.execute()]

    def active_runs(self) -> set[str]:
        """Ids of runs that are not finished."""
        return set(self.redis.smembers(self.keys.active))

    def recent_runs(self, limit: int = 20) -> list[tuple[str, float]]:
        """The newest runs with their submit times, newest first."""
        return [
            (rid, float(score))
            for rid, score in self.redis.zrevrange(self.keys.runs, 0, limit - 1, withscores=True)
        ]
