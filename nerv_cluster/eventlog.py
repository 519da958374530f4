"""The durable event log in Redis: one Stream per run (the source of truth) plus the scheduler's feed.

Writers: the scheduler only, fenced by its lease: its own decisions (dispatched, skipped, run
outcomes), what clients ask for through the intake (submissions, cancels, signals, reruns: issue 13,
:mod:`nerv_cluster.requests`), and the workers' events it checked and transcribed (see
nerv_cluster/outcomes.py). Workers write their attempts' claims and outcome slots and put their events
on the feed only; clients only read logs and append requests to the intake. ``submit``, ``append`` and
``set_limit`` below write directly: tests use them to fake what an older client or a hostile writer
left in the log. Every log write also announces the event on the run's pub/sub channel, which is only a
hint for live listeners.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import redis

from nerv_cluster import constants
from nerv_cluster.errors import (
    LeaseLostError,
    NervError,
    RunMovedError,
    RunNotFoundError,
    StoreFullError,
    UnknownEventTypeError,
)
from nerv_cluster.intake import describe
from nerv_cluster.model import Event
from nerv_cluster.outcomes import credential
from nerv_cluster.replication import Replication
from nerv_cluster.scripts import FencedAppend, Scripts, Supersede

log = logging.getLogger("nerv.eventlog")

#: A stream entry id and the event stored under it.
Entry = tuple[str, Event]


#: Digests of entries already warned about (bounded): a bad entry is read again by every refold and
#: sits in both its run's log and the feed, but is worth one warning.
_WARNED: OrderedDict[str, None] = OrderedDict()
_WARNED_MAX = 10_000


def _skip(eid: str, fields: Any, exc: Exception) -> None:
    """Warn, once per entry, that a log entry was skipped."""
    raw = fields.get(constants.EVENT_FIELD) if isinstance(fields, dict) else None
    digest = hashlib.blake2b(repr(raw if raw is not None else fields).encode(), digest_size=16).hexdigest()
    if digest in _WARNED:
        return
    _WARNED[digest] = None
    if len(_WARNED) > _WARNED_MAX:
        _WARNED.popitem(last=False)
    if isinstance(exc, UnknownEventTypeError):
        log.warning("skipping log entry %s: %s (written by a newer version?)", eid, describe(exc))
    else:
        log.warning("skipping malformed log entry %s: %s", eid, describe(exc))


class Batch(list[Entry]):
    """Decoded entries of one stream read, and ``upto``: the id of the last entry read, skipped ones
    included (empty when nothing was read). A reader goes on after ``upto``, not after the last
    decoded entry, or bad entries at the end of a read would be read again and again.

    ``sealed``: for each entry that carries a claim token (a worker's feed entry), its event JSON as
    stored and the token, by entry id: the scheduler checks the token and transcribes that very JSON.

    ``intake``: the intake entries read in the same round trip (:meth:`EventLog.read_feed`), as they
    are (id, fields): requests, not events (see :mod:`nerv_cluster.requests`)."""

    upto: str = ""
    sealed: dict[str, tuple[str, str]]
    intake: Sequence[tuple[str, Any]] = ()

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.sealed = {}


def next_entry_id(entry_id: str) -> str:
    """The smallest stream entry id after ``entry_id`` (``XTRIM MINID`` of it drops ``entry_id``)."""
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


def logged_at(entry_id: str) -> float:
    """When Redis logged a stream entry, on its own clock: the milliseconds part of the entry id."""
    return int(entry_id.partition("-")[0]) / 1000


def _decode(entries: Sequence[tuple[str, dict[str, str]]]) -> Batch:
    """The events of stream entries; an entry that is no valid event is skipped (with a warning), so
    one bad entry never stops a reader."""
    out = Batch()
    if entries:
        out.upto = str(entries[-1][0])
    for eid, fields in entries:
        try:
            raw = fields[constants.EVENT_FIELD]
            out.append((eid, Event.parse(raw, logged_at(eid), eid)))
        except Exception as exc:  # a missing field, bad JSON, a wrong type: this entry only
            _skip(eid, fields, exc)
            continue
        token = fields.get(constants.TOKEN_FIELD)
        if token is not None:
            out.sealed[eid] = (raw, token)
    return out


def _fenced(call: Callable[[], list[Any]]) -> list[Any]:
    """Run a script call that checks the lease token; :class:`LeaseLostError` when it no longer holds."""
    try:
        return call()
    except redis.ResponseError as exc:
        if "LEASE_LOST" in str(exc):
            raise LeaseLostError(str(exc)) from exc
        raise


def is_full(exc: redis.ResponseError) -> bool:
    """True for Redis's refusal of a write at ``maxmemory`` (also when a script's first write is refused:
    Redis checks a script's first write, so such a script wrote nothing). A plain command's refusal
    comes as redis-py's ``OutOfMemoryError``, without the ``OOM`` prefix."""
    return isinstance(exc, redis.exceptions.OutOfMemoryError) or "OOM command not allowed" in str(exc)


_SECRET_KEYS = (constants.TOKEN_KEY, constants.NONCE_KEY)


def _sealed(ev: Event) -> tuple[str, str]:
    """A worker's event as logged (its claim token and an outcome's nonce, under ``TOKEN_KEY`` and
    ``NONCE_KEY`` in its data, taken out) and its credential (``<token>.<nonce>``, or the token alone):
    that travels in a stream field of its own and never reaches a run log."""
    data = ev.data
    tok = data.get(constants.TOKEN_KEY)
    if tok is None:
        return ev.to_json(), ""
    bare = Event(
        ev.type,
        ev.run_id,
        ev.task_id,
        ev.attempt,
        {key: v for key, v in data.items() if key not in _SECRET_KEYS},
        ev.ts,
        ev.id,
        ev.source,
    )
    return bare.to_json(), credential(str(tok), str(data.get(constants.NONCE_KEY) or ""))


def attempt_field(task_id: str, attempt: int) -> str:
    """The hash field naming one attempt of one task."""
    return f"{task_id}:{attempt}"


def _redis_time(client: Any) -> float:
    """Redis's clock, in epoch seconds."""
    secs, micros = client.time()
    return float(secs) + float(micros) / 1e6


def fresh_capacity(raws: Mapping[str, str], fresh_since: float) -> tuple[dict[str, int], list[str]]:
    """Worker slots per queue over capacity entries (node -> JSON) announced at or after
    ``fresh_since``, and the nodes whose entry is older or unreadable (to delete)."""
    out: dict[str, int] = {}
    stale: list[str] = []
    for node, raw in raws.items():
        try:
            info = json.loads(raw)
            at, queues, slots = float(info["at"]), list(info["queues"]), int(info["concurrency"])
        except (ValueError, TypeError, KeyError):
            stale.append(node)
            continue
        if at < fresh_since:
            stale.append(node)
            continue
        for q in queues:
            out[q] = out.get(q, 0) + slots
    return out, stale


def fresh_registry(
    names: Mapping[str, str], seen: Mapping[str, str], fresh_since: float
) -> tuple[dict[str, str], list[str]]:
    """Name -> queue of registry entries refreshed at or after ``fresh_since``, and the names to
    delete (older, never refreshed, or a refresh stamp without a name)."""
    live: dict[str, str] = {}
    stale: list[str] = []
    for name in {*names, *seen}:
        try:
            at = float(seen[name])
        except (KeyError, ValueError):
            at = float("-inf")
        if name in names and at >= fresh_since:
            live[name] = names[name]
        else:
            stale.append(name)
    return live, sorted(stale)


class EventLog:
    """Reads and writes the event log. The Redis client must decode responses (``decode_responses=True``)."""

    def __init__(
        self, client: redis.Redis, keys: constants.Keys, replication: Replication | None = None
    ) -> None:
        # redis-py types replies as bytes | str; this client decodes, so they are str. Any says so here
        # once instead of a cast at every call site.
        self.redis: Any = client
        self.keys = keys
        #: Which writes wait for replicas (``nerv_cluster.replication``; none by default).
        self.replication = replication or Replication()
        self.scripts = Scripts(client, self.replication)

    # -- writes ---------------------------------------------------------------------------------------

    def submit(self, event: Event, *, existing_ok: bool = False, text: str | None = None) -> bool:
        """Record a WORKFLOW_SUBMITTED event: the run exists from here on. True when this call created
        the run; with ``existing_ok`` (an idempotent submission) a run of that id already there is
        False, else an error. ``text``: the event's JSON when the caller has it already (a big
        workflow's is milliseconds to make)."""
        k = self.keys
        try:
            self.scripts.submit(
                run_log=k.log(event.run_id),
                feed=k.feed,
                active=k.active,
                runs=k.runs,
                run_id=event.run_id,
                channel=k.channel(event.run_id),
                event=event.to_json() if text is None else text,
                submitted_at=event.ts,
                feed_maxlen=constants.FEED_MAXLEN,
            )
        except redis.ResponseError as exc:
            if is_full(exc):
                raise StoreFullError(
                    f"Redis is full (maxmemory reached, policy noeviction): submission of run "
                    f"{event.run_id!r} refused, nothing written; retry once memory is freed or maxmemory "
                    "is raised"
                ) from exc
            if "RUN_EXISTS" not in str(exc):
                raise
            if existing_ok:
                return False
            # A retry after a lost reply finds its own first try: that is success, not a clash.
            first = self.redis.xrange(k.log(event.run_id), count=1)
            if not (first and Event.from_json(first[0][1][constants.EVENT_FIELD]).id == event.id):
                raise NervError(str(exc).removeprefix("RUN_EXISTS ")) from exc
        return True

    def append(self, events: Sequence[Event]) -> None:
        """Append events (of any runs) to their run logs and the feed, one script call per run, pipelined."""
        by_run: dict[str, list[str]] = defaultdict(list)
        for ev in events:
            by_run[ev.run_id].append(ev.to_json())
        k = self.keys
        pipe = self.redis.pipeline(transaction=False)
        for run_id, payloads in by_run.items():
            self.scripts.append(
                run_log=k.log(run_id),
                feed=k.feed,
                channel=k.channel(run_id),
                feed_maxlen=constants.FEED_MAXLEN,
                events=payloads,
                client=pipe,
            )
        if self.replication.on:
            # Outcomes and cancellations a client or worker appends: acknowledged once replicated.
            pipe.execute_command("WAIT", self.replication.min_replicas, self.replication.timeout_ms)
            self.replication.wait(self.redis, pipe.execute()[-1])
            return
        pipe.execute()

    def append_fenced(
        self,
        events: Sequence[Event],
        token: str,
        handoffs: Sequence[tuple[Event, str]] = (),
        transcripts: Sequence[tuple[str, str, str]] = (),
        position: str = "",
    ) -> list[bool]:
        """Append the scheduler's events; :class:`LeaseLostError` if ``token`` no longer holds the lease.

        ``transcripts``: workers' events the scheduler checked, as (run id, attempt field for an outcome
        or '' for a TASK_STARTED, event JSON), written first (an outcome once: a second transcription of
        it is skipped), and ``position``: the feed entry they cover, recorded with them (a new leader
        reads the feed after it; '' to leave it). ``handoffs``: (TASK_STARTED event naming the worker,
        signed job message) pairs, written in the same atomic step after the events: each job goes to
        its worker's hand-off list and its attempt is claimed for that worker, if the worker still
        waits. Returns, per hand-off, whether it was handed. Applied once even when redis-py resends
        the call after losing its reply.
        """
        if not events and not handoffs and not transcripts and not position:
            return []
        k = self.keys
        # The tail: the run logs (and the circuits stream) written to, then the hand-offs' keys. Events
        # name their stream by its index into KEYS, after the script's fixed keys.
        tail_keys: list[str] = []
        index: dict[str, int] = {}
        args: list[Any] = []

        def at(key: str) -> int:
            if key not in index:
                tail_keys.append(key)
                index[key] = len(tail_keys) + len(FencedAppend.keys)
            return index[key]

        for run_id, field, text in transcripts:
            outcomes = at(k.outcomes(run_id)) if field else 0
            args.extend((at(k.log(run_id)), outcomes, field, k.channel(run_id), text))
        for ev in events:
            payload = ev.to_json()
            args.extend((at(k.log(ev.run_id)), k.channel(ev.run_id), payload))
            if ev.type.value.startswith("CIRCUIT_"):
                # Also in the cluster-wide circuits stream, which a new leader refolds.
                args.extend((at(k.circuits), "", payload))
        n_events = (len(args) - 5 * len(transcripts)) // 3
        if handoffs:
            args.append(constants.HANDOFF_TTL_MS)
            for started, job in handoffs:
                assert started.task_id is not None and started.attempt is not None
                worker = str(started.data["worker"])
                rid = started.run_id
                tail_keys += [k.handoff_waiting(worker), k.handoff(worker), k.log(rid), k.claims(rid)]
                args += [attempt_field(started.task_id, started.attempt), worker, k.channel(rid)]
                # The flag must hold the claim the TASK_STARTED names: the wait it was offered for, not
                # a later one of the same worker (whose nonce is another), see fenced_append.lua.
                args += [started.to_json(), job, str(started.data.get(constants.CLAIM_KEY, ""))]
        # One script, not a pipeline of two: a pipeline of scripts costs redis-py an extra round trip
        # (SCRIPT EXISTS) every time, and this is on every hop of a chain.
        # A key of this call's own: redis-py resends a call whose reply was lost, and the script must
        # then answer from its first execution instead of writing again.
        reply = k.reply(uuid.uuid4().hex)
        handed = _fenced(
            lambda: self.scripts.fenced_append(
                lease=k.lease,
                reply=reply,
                transcribed=k.transcribed,
                token=token,
                reply_ttl_ms=constants.FENCED_REPLY_TTL_MS,
                n_transcripts=len(transcripts),
                position=position,
                n_events=n_events,
                tail_keys=tail_keys,
                tail_args=args,
            )
        )
        return [bool(x) for x in handed]

    def _outcome_tail(self, events: Sequence[Event]) -> tuple[list[str], list[Any]]:
        """The keys (outcomes hash) and arguments (field, outcome type, event JSON, claim token) by
        which ``start.lua`` and ``finish.lua`` record each of these outcome events once."""
        k = self.keys
        keys: list[str] = []
        args: list[Any] = []
        for ev in events:
            assert ev.task_id is not None and ev.attempt is not None
            text, tok = _sealed(ev)
            keys.append(k.outcomes(ev.run_id))
            args += [attempt_field(ev.task_id, ev.attempt), ev.type.value, text, tok]
        return keys, args

    def start_attempts(
        self,
        events: Sequence[Event],
        worker_id: str,
        max_takeovers: int,
        outcomes: Sequence[Event] = (),
        batch: bool = False,
    ) -> list[str]:
        """Claim the attempts named by TASK_STARTED events, in one round trip; a verdict per event:
        ``'ok'`` (run it), ``'done'``, ``'busy'`` or ``'poison'`` (``max_takeovers`` holders died).

        ``outcomes``: outcome events of earlier attempts, recorded first in the same round trip (each
        once, like :meth:`finish_attempts`). ``batch``: the attempts are a packed batch claimed as a
        whole before any of them runs; an attempt whose holder died then gets ``'strict'`` (claim it
        alone, right before running it), see ``start.lua``.
        """
        k = self.keys
        keys, args = self._outcome_tail(outcomes)
        for ev in events:
            assert ev.task_id is not None and ev.attempt is not None
            text, tok = _sealed(ev)
            keys += [k.outcomes(ev.run_id), k.claims(ev.run_id)]
            args += [attempt_field(ev.task_id, ev.attempt), text, tok]
        verdicts = self.scripts.start(
            feed=k.feed,
            worker=worker_id,
            heartbeat_prefix=k.heartbeat_prefix,
            max_takeovers=max_takeovers,
            n_outcomes=len(outcomes),
            batch=batch,
            tail_keys=keys,
            tail_args=args,
        )
        return [str(v) for v in verdicts]

    def start_attempt(self, event: Event, worker_id: str, max_takeovers: int) -> str:
        """:meth:`start_attempts` for one attempt."""
        return self.start_attempts([event], worker_id, max_takeovers)[0]

    def finish_attempts(self, events: Sequence[Event], waiting: str = "") -> list[bool]:
        """Record attempts' outcome events in one round trip; False where that attempt already had one.

        ``waiting``: the worker id that will wait for a hand-off once the last outcome is recorded; its
        waiting flag holds the claim that outcome names for the job to be handed (``HANDOFF_CLAIM_KEY``).
        """
        if not events:
            return []
        k = self.keys
        keys, args = self._outcome_tail(events)
        recorded = self.scripts.finish(
            feed=k.feed,
            waiting=k.handoff_waiting(waiting) if waiting else "",
            waiting_claim=str(events[-1].data.get(constants.HANDOFF_CLAIM_KEY, "")) if waiting else "",
            waiting_ttl_ms=constants.HANDOFF_TTL_MS,
            tail_keys=keys,
            tail_args=args,
        )
        return [bool(v) for v in recorded]

    def finish_attempt(self, event: Event) -> bool:
        """:meth:`finish_attempts` for one attempt."""
        return self.finish_attempts([event])[0]

    def supersede(self, attempts: Sequence[tuple[str, str, int]], token: str, why: str) -> list[bool]:
        """Take the outcome slot of each (run, task, attempt); True where we got it (no outcome yet).

        A worker that finishes such an attempt later finds the slot taken and records nothing; one that
        picks its job up later does not run it.
        """
        return [holder == why for holder in self.slot_holders(attempts, token, why)]

    def slot_holders(self, attempts: Sequence[tuple[str, str, int]], token: str, why: str) -> list[str]:
        """Take the outcome slot of each (run, task, attempt) where it is free (fenced), and return what
        holds each slot afterwards: ``why`` where the scheduler has it (now, or from an earlier call),
        else the outcome type a worker recorded first."""
        if not attempts:
            return []
        k = self.keys
        keys: list[str] = []
        index: dict[str, int] = {}
        args: list[Any] = []
        for run_id, task_id, attempt in attempts:
            if run_id not in index:
                keys.append(k.outcomes(run_id))
                index[run_id] = len(keys) + len(Supersede.keys)  # its index into KEYS, after the lease
            args.extend((index[run_id], attempt_field(task_id, attempt)))
        return [
            str(x)
            for x in _fenced(
                lambda: self.scripts.supersede(
                    lease=k.lease, token=token, value=why, tail_keys=keys, tail_args=args
                )
            )
        ]

    def spawn_children(self, spawns: Sequence[Any], token: str) -> list[str]:
        """Create child runs (``children.Spawn``s), fenced by ``token``; per spawn ``created``, ``done``
        (an earlier call created it) or ``taken`` (its id is another run's). See ``spawn.lua``."""
        if not spawns:
            return []
        k = self.keys
        keys: list[str] = []
        args: list[Any] = []
        for sp in spawns:
            parent, child = sp.parent, sp.child_id
            keys += [k.log(child), k.log(parent.run_id), k.outcomes(parent.run_id)]
            args += [
                f"{attempt_field(parent.task_id, parent.attempt)}#child",
                child,
                sp.submitted.ts,
                k.channel(child),
                sp.submitted.to_json(),
                k.channel(parent.run_id),
                sp.started.to_json(),
            ]
        return [
            str(v)
            for v in _fenced(
                lambda: self.scripts.spawn(
                    lease=k.lease, active=k.active, runs=k.runs, token=token, tail_keys=keys, tail_args=args
                )
            )
        ]

    def close_runs(
        self,
        run_ids: Sequence[str],
        retention_seconds: int,
        now: float | None = None,
        reruns: Mapping[str, int] | None = None,
    ) -> list[bool]:
        """Runs are over: drop them from the active set and let their keys expire after the retention
        time; the all-runs index forgets runs submitted longer than the retention time ago (their keys
        are gone or going), so it stays bounded too. Per run, whether it was closed: one that a rerun
        reopened past the rerun number ``reruns`` gives for it (default 0) stays open, atomically."""
        if not run_ids:
            return []
        reruns = reruns or {}
        keys: list[str] = []
        args: list[Any] = []
        for run_id in run_ids:
            keys += self.keys.run_keys(run_id)
            args += [run_id, reruns.get(run_id, 0)]
        horizon = (time.time() if now is None else now) - retention_seconds
        closed = self.scripts.close(
            active=self.keys.active,
            runs=self.keys.runs,
            retention=retention_seconds,
            horizon=horizon,
            tail_keys=keys,
            tail_args=args,
        )
        return [bool(x) for x in closed]

    def rerun(self, event: Event, expected: str, token: str = "") -> None:
        """Append a WORKFLOW_RERUN_REQUESTED (rerun number ``event.data['n']``) and reopen its run,
        atomically, if the run's log still ends at entry ``expected``: :class:`RunNotFoundError` when the
        log is gone, :class:`RunMovedError` when it gained entries or the run was rerun meanwhile (fold
        it again). A resent call that finds its own first execution done returns as a success.

        ``token``: the scheduler's lease token, when the scheduler itself reruns a run (a child run for
        its parent task): then fenced, :class:`LeaseLostError` once the token no longer holds the lease.
        """
        k = self.keys
        rid = event.run_id
        try:
            self.scripts.rerun(
                run_log=k.log(rid),
                outcomes=k.outcomes(rid),
                claims=k.claims(rid),
                checkpoint=k.checkpoint(rid),
                reruns=k.reruns(rid),
                feed=k.feed,
                active=k.active,
                lease=k.lease,
                run_id=rid,
                channel=k.channel(rid),
                event=event.to_json(),
                expected=expected,
                n=int(event.data["n"]),
                feed_maxlen=constants.FEED_MAXLEN,
                token=token,
            )
        except redis.ResponseError as exc:
            text = str(exc)
            if "LEASE_LOST" in text:
                raise LeaseLostError(text) from exc
            if "RUN_GONE" in text:
                raise RunNotFoundError(
                    f"no run {rid!r} (never submitted, or expired after its retention time)"
                ) from None
            if "RUN_MOVED" not in text:
                raise
            # A retry after a lost reply finds its own first execution: that is success, not a race.
            if any(ev.id == event.id for _, ev in self.read_run(rid, after=expected)):
                return
            raise RunMovedError(text.removeprefix("RUN_MOVED ")) from exc

    # -- reads ----------------------------------------------------------------------------------------

    def read_run(
        self, run_id: str, after: str = "-", count: int = 10_000, upto: str = "+"
    ) -> Iterator[Entry]:
        """Every event of a run after entry id ``after`` (exclusive; ``'-'`` for the start) up to entry
        id ``upto`` (inclusive; ``'+'`` for the end), in order."""
        key = self.keys.log(run_id)
        start = "-" if after in ("-", "0", "0-0") else f"({after}"
        while True:
            chunk = self.redis.xrange(key, min=start, max=upto, count=count)
            yield from _decode(chunk)
            if len(chunk) < count:
                return
            start = f"({chunk[-1][0]}"

    def tail_run(self, run_id: str, count: int) -> Batch:
        """The last ``count`` entries of a run's log, oldest first."""
        return _decode(list(reversed(self.redis.xrevrange(self.keys.log(run_id), count=count))))

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

    def write_checkpoint(self, run_id: str, checkpoint: Mapping[str, Any]) -> bool:
        """Store a run's checkpoint (see :mod:`nerv_cluster.checkpoint`), replacing the previous one.

        Only while the run is open, checked atomically: False (nothing written) once :meth:`close_runs`
        set its keys to expire, since a checkpoint written after that would never expire.
        """
        k = self.keys
        payload = json.dumps(checkpoint, separators=(",", ":"))
        return self.scripts.checkpoint(run_log=k.log(run_id), checkpoint=k.checkpoint(run_id), state=payload)

    def read_checkpoints(self, run_ids: Sequence[str]) -> dict[str, str]:
        """The stored checkpoints of these runs, as their JSON text (runs without one are left out):
        decoding is the reader's, which ignores one it cannot read (``scheduler.checkpointer.load``)."""
        if not run_ids:
            return {}
        raws = self.redis.mget([self.keys.checkpoint(r) for r in run_ids])
        return {rid: raw for rid, raw in zip(run_ids, raws, strict=True) if raw}

    def last_entry(self, run_id: str) -> str | None:
        """The id of the newest entry of a run's log, malformed ones included (None: no log)."""
        last = self.redis.xrevrange(self.keys.log(run_id), count=1)
        return str(last[0][0]) if last else None

    def run_exists(self, run_id: str) -> bool:
        """True when the run's log exists."""
        return bool(self.redis.exists(self.keys.log(run_id)))

    def require_run(self, run_id: str) -> None:
        """Raise :class:`RunNotFoundError` unless the run exists."""
        if not self.run_exists(run_id):
            raise RunNotFoundError(
                f"no run {run_id!r} (never submitted, or expired after its retention time)"
            )

    def follow_run(self, run_id: str, after: str, block_ms: int, count: int = 10_000) -> Batch:
        """Events of a run after ``after``, waiting up to ``block_ms`` for the first one (go on after
        the batch's ``upto``)."""
        reply = self.redis.xread({self.keys.log(run_id): after or "0-0"}, count=count, block=block_ms)
        return _decode(reply[0][1]) if reply else Batch()

    def read_feed(
        self, after: str, count: int, block_ms: int | None, intake_after: str | None = None
    ) -> Batch:
        """The next batch of feed events after ``after``, waiting up to ``block_ms`` when there are none
        (go on after the batch's ``upto``). With ``intake_after``, the intake entries after it too, in
        the same XREAD (``Batch.intake``): one blocking call wakes for either stream."""
        streams = {self.keys.feed: after}
        if intake_after is not None:
            streams[self.keys.intake] = intake_after
        reply = self.redis.xread(streams, count=count, block=block_ms)
        out = Batch()
        for key, entries in reply or ():
            if key == self.keys.feed:
                intake, out = out.intake, _decode(entries)
                out.intake = intake
            else:
                out.intake = entries
        return out

    # -- the intake (issue 13): clients' requests, applied by the leader ------------------------------

    def apply_request(
        self,
        token: str,
        request_id: str,
        entry_id: str,
        op: str = "none",
        answer: str = "",
        other_answer: str = "",
        tail_keys: Sequence[str] = (),
        tail_args: Sequence[Any] = (),
    ) -> tuple[str, str]:
        """Apply a request read from intake entry ``entry_id`` and answer it, fenced by ``token`` and once
        per ``request_id`` (see ``intake.lua``): (status, the answer given). :class:`LeaseLostError` when
        the token no longer holds the lease; :class:`StoreFullError` when Redis is full (nothing
        written: answer with op ``none``, which always gets through)."""
        k = self.keys
        try:
            status, text = _fenced(
                lambda: self.scripts.intake(
                    lease=k.lease,
                    intake=k.intake,
                    done=k.intake_done(request_id),
                    reply=k.intake_reply(request_id),
                    token=token,
                    trim_to=next_entry_id(entry_id),
                    reply_ttl_ms=constants.INTAKE_REPLY_TTL_MS,
                    done_ttl_ms=constants.INTAKE_DONE_TTL_MS,
                    op=op,
                    answer=answer,
                    other_answer=other_answer,
                    tail_keys=tail_keys,
                    tail_args=tail_args,
                )
            )
        except redis.ResponseError as exc:
            if is_full(exc):
                raise StoreFullError(
                    "Redis is full (maxmemory reached, policy noeviction): the request was refused, "
                    "nothing written; retry once memory is freed or maxmemory is raised"
                ) from exc
            raise
        return str(status), str(text)

    def trim_intake(self, token: str, upto: str) -> None:
        """Drop intake entries up to ``upto`` (inclusive), fenced: entries skipped as malformed."""
        k = self.keys
        _fenced(
            lambda: self.scripts.intake(
                lease=k.lease,
                intake=k.intake,
                done=k.intake,
                reply=k.intake,
                token=token,
                trim_to=next_entry_id(upto),
                reply_ttl_ms=0,
                done_ttl_ms=0,
                op="trim",
                answer="",
                other_answer="",
            )
        )

    def transcribed_position(self) -> str | None:
        """The feed entry up to which the leader transcribed workers' events (None: never recorded,
        a cluster whose workers wrote their events to the logs themselves)."""
        got = self.redis.get(self.keys.transcribed)
        return str(got) if got else None

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

    # -- limits (issue 11): LIMIT_SET events, in the limits stream a new leader refolds ---------------

    def set_limit(self, event: Event) -> None:
        """Record a LIMIT_SET: in the limits stream (the truth, refolded by each new leader) and the
        feed (so the leader reads the stream again now), in one MULTI."""
        payload = event.to_json()
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(self.keys.limits, {constants.EVENT_FIELD: payload}, maxlen=constants.LIMITS_MAXLEN)
        pipe.xadd(self.keys.feed, {constants.EVENT_FIELD: payload}, maxlen=constants.FEED_MAXLEN)
        pipe.publish(self.keys.channel(event.run_id), payload)
        pipe.execute()

    def limit_events(self, after: str = "0-0") -> Batch:
        """LIMIT_SET events logged after entry ``after``, oldest first (go on after ``upto``)."""
        return _decode(self.redis.xrange(self.keys.limits, min=f"({after}" if after != "0-0" else "-"))

    def trim_circuits(self) -> None:
        """Keep the circuits stream short."""
        self.redis.xtrim(self.keys.circuits, maxlen=constants.CIRCUITS_MAXLEN, approximate=True)

    def announce_capacity(
        self, node: str, queues: Sequence[str], concurrency: int, tasks: Mapping[str, str] | None = None
    ) -> None:
        """A worker node says which queues it serves with how many slots, and (``tasks``: name ->
        queue) refreshes the task names it registered. Stamped with Redis's clock, which every
        reader compares with (a worker's own clock may be off)."""
        now = _redis_time(self.redis)
        info = {"queues": list(queues), "concurrency": concurrency, "at": now}
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self.keys.capacity, node, json.dumps(info))
        if tasks:
            pipe.hset(self.keys.registry, mapping=dict(tasks))
            pipe.hset(self.keys.registry_seen, mapping=dict.fromkeys(tasks, repr(now)))
        pipe.execute()

    def register_tasks(self, tasks: Mapping[str, str]) -> None:
        """Record task names (name -> queue) a worker registered, stamped with Redis's clock."""
        now = _redis_time(self.redis)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self.keys.registry, mapping=dict(tasks))
        pipe.hset(self.keys.registry_seen, mapping=dict.fromkeys(tasks, repr(now)))
        pipe.execute()

    def withdraw_capacity(self, node: str) -> None:
        """A worker node stops serving."""
        self.redis.hdel(self.keys.capacity, node)

    def capacity(self) -> dict[str, int]:
        """Worker slots per queue, over nodes that announced themselves recently; the entries of
        nodes silent for longer (dead without withdrawing) are deleted."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.time()
        pipe.hgetall(self.keys.capacity)
        (secs, micros), raws = pipe.execute()
        out, stale = fresh_capacity(raws, secs + micros / 1e6 - constants.CAPACITY_STALE_S)
        if stale:
            self.redis.hdel(self.keys.capacity, *stale)
        return out

    def registered_tasks(self, prune: bool = False) -> dict[str, str]:
        """Task name -> queue of every name a live worker refreshed recently; with ``prune`` (the
        scheduler: clients only read), names no worker has refreshed for ``REGISTRY_STALE_S`` are
        deleted."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.time()
        pipe.hgetall(self.keys.registry)
        pipe.hgetall(self.keys.registry_seen)
        (secs, micros), names, seen = pipe.execute()
        live, stale = fresh_registry(names, seen, secs + micros / 1e6 - constants.REGISTRY_STALE_S)
        if stale and prune:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hdel(self.keys.registry, *stale)
            pipe.hdel(self.keys.registry_seen, *stale)
            pipe.execute()
        return live

    def queue_lengths(self, queues: Sequence[str]) -> list[int]:
        """Messages waiting in these Celery queues (not yet taken by any worker)."""
        pipe = self.redis.pipeline(transaction=False)
        for q in queues:
            pipe.llen(self.keys.queue(q))
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
