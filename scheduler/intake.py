"""The intake room (issue 13): clients' requests checked, applied (fenced) and answered by the leader.

Clients ask; the scheduler decides. A request read from the intake (in the same XREAD as the feed) is
parsed (:mod:`nerv_cluster.requests`), checked again here as the client checked it (a client may be
hostile: :func:`nerv_cluster.intake.accept` and the bounds for a submission, the run's folded state for
a signal or a rerun), then written by ``intake.lua`` together with its answer, in one fenced step.

Invariant: every intake entry this leader reads is answered at most once with a write and never applied
twice. Why the intake is trimmed in the same script as each write, and applications are also idempotent
by request id (both, not one): the trim leaves the intake holding only unanswered requests, so a new
leader reads it from its start and finds exactly the requests the old one read but did not answer
(nothing lost; an accepted request is applied and answered by whoever applies it); the done record
(``Keys.intake_done``) catches what the trim cannot: a second copy of one request, which a client's
XADD resent after a lost reply leaves beside the first. A stored cursor would need the same done record
for those copies, and it would leave the applied entries in the stream.

A request is decided against the state folded so far, its own events folded before the next request is
decided (two signals of one name in one batch: the first is the one the node receives).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from nerv_cluster import constants, idempotency, intake, limits, waits
from nerv_cluster import rerun as reruns
from nerv_cluster import state as st
from nerv_cluster.cachestore import CacheStore
from nerv_cluster.errors import (
    IdempotencyKeyError,
    LeaseLostError,
    NervError,
    ReplicationError,
    RunNotFinishedError,
    RunNotFoundError,
    ScheduleError,
    ScheduleNotFoundError,
    StoreFullError,
)
from nerv_cluster.eventlog import EventLog
from nerv_cluster.fairshare import PRIORITY_META, TENANT_META, run_meta
from nerv_cluster.ids import check_id
from nerv_cluster.jsonform import compact
from nerv_cluster.model import Event, EventType
from nerv_cluster.requests import Bounds, Request, decode_workflow, ok, refusal, request_id, submitted_json
from nerv_cluster.schedules import ScheduleSpec, check_spec, event_run_id, trigger_run_id
from nerv_cluster.settings import Settings
from nerv_cluster.workflow import check_bounds
from scheduler import reruns as takeback
from scheduler.checkpointer import Position
from scheduler.limit_watch import LimitWatch
from scheduler.schedules import ScheduleRoom
from scheduler.takeover import load_runs

log = logging.getLogger("nerv.scheduler")

#: Times a rerun request folds a run's log again after finding it moved (a late outcome after its end).
_RERUN_TRIES = 5
#: The events a request makes carry this source: who asked (the scheduler wrote them).
_SOURCE = "client"
#: The schedule commands, by request op.
_SCHEDULE_OPS = {
    "schedule_pause": EventType.SCHEDULE_PAUSED,
    "schedule_resume": EventType.SCHEDULE_RESUMED,
    "schedule_trigger": EventType.SCHEDULE_TRIGGERED,
    "schedule_delete": EventType.SCHEDULE_DELETED,
}


@dataclass(slots=True)
class Taken:
    """What one batch of requests did: the state with their events folded, those events (for the
    tracing and the runs to decide for), and the checkpoint positions of runs a rerun reopened."""

    state: st.State
    events: list[Event] = field(default_factory=list)
    positions: dict[str, Position] = field(default_factory=dict)


class IntakeRoom:
    """Reads nothing itself (the service's XREAD brings the entries); checks, writes and answers."""

    def __init__(
        self,
        eventlog: EventLog,
        settings: Settings,
        schedules: ScheduleRoom,
        limit_watch: LimitWatch,
        cache: CacheStore,
    ) -> None:
        self.log = eventlog
        self.keys = eventlog.keys
        self.settings = settings
        self.bounds = Bounds.of(settings)
        self.schedules = schedules
        self.limit_watch = limit_watch
        self.cache = cache
        #: The last intake entry read; a new leader (and a refold after an error) reads from the start:
        #: the intake holds only what no leader answered.
        self.cursor = "0-0"

    def reset(self) -> None:
        """Read the intake from its start again (a new leader, or a refold)."""
        self.cursor = "0-0"

    def take(
        self, entries: Sequence[tuple[str, Any]], state: st.State, token: Callable[[], str], now: float
    ) -> Taken:
        """Check, apply and answer each request of ``entries`` (intake entries, in order). Malformed
        ones are skipped with a warning (and answered when they name a request id to answer)."""
        out = Taken(state)
        trimmed = True
        for entry_id, fields in entries:
            self.cursor = entry_id
            rid = request_id(fields)
            try:
                req = Request.parse(fields, self.bounds)
            except Exception as exc:  # whatever a hostile writer left: this entry only
                log.warning("intake entry %s refused: %s", entry_id, intake.describe(exc))
                if rid is None:
                    trimmed = False  # no one to answer: trimmed with the next answer, or below
                    continue
                self._answer(token(), rid, entry_id, refusal(exc))
                trimmed = True
                continue
            try:
                self._apply(req, entry_id, out, token, now)
            except (LeaseLostError, ReplicationError, redis.RedisError):
                raise  # the service steps down, or refolds and reads the intake again
            except StoreFullError as exc:
                about = f" of run {req.run_id!r}" if req.run_id else ""
                full = StoreFullError(
                    f"Redis is full (maxmemory reached, policy noeviction): the {req.op} request{about} was "
                    "refused, nothing written; retry once memory is freed or maxmemory is raised"
                )
                log.warning("request %s: %s (%s)", req.id, full, exc)
                self._answer(token(), req.id, entry_id, refusal(full))
            except Exception as exc:  # a refusal: its clear error is the answer, nothing was written
                if not isinstance(exc, NervError):
                    log.warning("request %s (%s) refused: %s", req.id, req.op, intake.describe(exc))
                self._answer(token(), req.id, entry_id, refusal(exc))
            trimmed = True
        if not trimmed:
            self.log.trim_intake(token(), self.cursor)
        return out

    def _answer(self, token: str, rid: str, entry_id: str, answer: str) -> None:
        """Answer without writing anything else (a refusal, or an answer of the scheduler's own)."""
        self.log.apply_request(token, rid, entry_id, "none", answer)

    def _apply(self, req: Request, entry_id: str, out: Taken, token: Callable[[], str], now: float) -> None:
        op, body, k = req.op, req.body, self.keys

        def write(kind: str, answer: str, other: str, keys: list[str], args: list[Any]) -> str:
            return self.log.apply_request(token(), req.id, entry_id, kind, answer, other, keys, args)[0]

        if op == "submit":
            self._submit(req, out, write, now)
        elif op == "cancel":
            rid = check_id(body["run_id"], "run id")
            ev = Event(
                EventType.WORKFLOW_CANCEL_REQUESTED,
                rid,
                data={"reason": body["reason"]},
                ts=now,
                source=_SOURCE,
            )
            if (
                write(
                    "append",
                    ok(),
                    refusal(_no_run(rid)),
                    [k.log(rid)],
                    [k.channel(rid), ev.to_json(), "1", ""],
                )
                == "applied"
            ):
                self._fold(out, ev)
        elif op == "signal":
            rid = check_id(body["run_id"], "run id")
            run = out.state.runs.get(rid) or self._load(rid)
            name = body["name"]
            ev = waits.signal_event(run, name, body["payload"], self.settings.max_signal_bytes)
            first = name not in run.signals
            if (
                write(
                    "append",
                    ok(first=first),
                    refusal(_no_run(rid)),
                    [k.log(rid)],
                    [k.channel(rid), ev.to_json(), "1", ""],
                )
                == "applied"
            ):
                self._fold(out, ev)
        elif op == "rerun":
            self._rerun(req, out, write, now)
        elif op == "set_limit":
            key, limit = body["key"], body["limit"]
            limits.check_limit(key, limit)
            ev = Event(
                EventType.LIMIT_SET,
                constants.LIMITS_RUN_ID,
                data={"key": key, "limit": limit},
                ts=now,
                source=_SOURCE,
            )
            args = [k.channel(constants.LIMITS_RUN_ID), ev.to_json(), "", constants.LIMITS_MAXLEN]
            if write("append", ok(), "", [k.limits], args) == "applied":
                out.events.append(ev)
                self.limit_watch.observe(self.log, [("", ev)])  # reads the stream again, from its cursor
        elif op == "schedule_set":
            spec = _spec(body["spec"], self.settings.max_payload_bytes)
            data = {"name": spec.name, "at": now, "spec": spec.to_dict()}
            self._schedule(EventType.SCHEDULE_SET, spec.name, data, ok(name=spec.name), out, write, now)
        elif op in _SCHEDULE_OPS:
            name = body["name"]
            if name not in self.schedules.schedules:
                raise ScheduleNotFoundError(f"no schedule {name!r:.80}")
            kind = _SCHEDULE_OPS[op]
            ev = Event(kind, event_run_id(name), data={"name": name, "at": now}, ts=now, source=_SOURCE)
            answer = ok(run_id=trigger_run_id(name, ev.id)) if kind is EventType.SCHEDULE_TRIGGERED else ok()
            self._schedule(kind, name, dict(ev.data), answer, out, write, now, ev)
        elif op == "clear_cache":
            task = body["task"]
            # Not fenced itself: deleting cache entries only costs a recomputation, whoever does it.
            self._answer(token(), req.id, entry_id, ok(deleted=self.cache.clear(task)))
        else:  # Request.parse knows every op
            raise AssertionError(op)

    def _fold(self, out: Taken, ev: Event) -> None:
        out.state = st.apply(out.state, ev)
        out.events.append(ev)

    def _load(self, run_id: str) -> st.RunState:
        """A run the state does not hold (finished, or none), folded from its checkpoint and log."""
        run = load_runs(self.log, [run_id]).runs.get(run_id)
        if run is None:
            raise _no_run(run_id)
        return run

    def _submit(self, req: Request, out: Taken, write: Callable[..., str], now: float) -> None:
        body, k = req.body, self.keys
        rid, key = body["run_id"], body["idempotency_key"]
        if key is not None and rid != idempotency.run_id_for_key(key):
            raise IdempotencyKeyError(f"run id {rid!r:.140} is not the one idempotency key {key!r:.80} names")
        text = req.workflow
        assert text is not None  # Request.parse: a submit has one
        raw = decode_workflow(text)  # the one decoding: checked, folded and written from this
        accepted = intake.accept(rid, raw, size=len(text))
        definition = accepted[0]
        s = self.settings
        check_bounds(
            definition, max_payload_bytes=s.max_payload_bytes, max_tasks=s.max_tasks, total_bytes=len(text)
        )
        run_meta(definition.meta.get(PRIORITY_META), definition.meta.get(TENANT_META))
        ev = Event(EventType.WORKFLOW_SUBMITTED, rid, data={"workflow": raw}, ts=now, source=_SOURCE)
        head = {"i": ev.id, "t": ev.type.value, "r": rid, "ts": ev.ts}
        # Under a key the script's existence check is the claim: the second of two racing submitters
        # finds the first one's run and gets its id.
        existing = (
            ok(run_id=rid, created=False)
            if key is not None
            else refusal(NervError(f"run {rid} was already submitted"))
        )
        status = write(
            "submit",
            ok(run_id=rid, created=True),
            existing,
            [k.log(rid), k.active, k.runs],
            [rid, k.channel(rid), submitted_json(head, text, _SOURCE), now],
        )
        if status == "applied":
            out.state = st.apply_submitted(out.state, ev, accepted)
            out.events.append(ev)

    def _rerun(self, req: Request, out: Taken, write: Callable[..., str], now: float) -> None:
        k = self.keys
        rid = check_id(req.body["run_id"], "run id")
        tasks = req.body["tasks"]
        held = out.state.runs.get(rid)
        if held is not None:  # the scheduler holds only runs not finished (or finishing now)
            reruns.check(held, tasks)
        for _ in range(_RERUN_TRIES):
            # The log's raw end first, then the fold: the fold covers at least up to it (and the script
            # refuses if the log grew past it), skipped malformed entries included.
            last = self.log.last_entry(rid)
            if last is None:
                raise _no_run(rid)
            run = self._load(rid)
            named = reruns.check(run, tasks)
            data = reruns.event_data(run, named)
            ev = Event(EventType.WORKFLOW_RERUN_REQUESTED, rid, data=data, ts=now, source=_SOURCE)
            keys = [*k.run_keys(rid), k.active]
            status = write(
                "rerun",
                ok(run_id=rid),
                refusal(_no_run(rid)),
                keys,
                [rid, k.channel(rid), ev.to_json(), last, data["n"]],
            )
            if status == "moved":
                continue  # the log moved under us (a late outcome): judge it again
            if status == "applied":
                # Taken back from its log, which holds the request now (as a rerun read from the feed).
                out.state, positions = takeback.take_back(self.log, out.state, [ev])
                out.positions.update(positions)
                out.events.append(ev)
            return
        raise RunNotFinishedError(f"run {rid}: its log kept moving; it is not finished, try again")

    def _schedule(
        self,
        kind: EventType,
        name: str,
        data: dict[str, Any],
        answer: str,
        out: Taken,
        write: Callable[..., str],
        now: float,
        ev: Event | None = None,
    ) -> None:
        ev = ev or Event(kind, event_run_id(name), data=data, ts=now, source=_SOURCE)
        if write("append", answer, "", [self.keys.schedules], ["", ev.to_json(), "", ""]) == "applied":
            self.schedules.observe([ev], now)
            out.events.append(ev)


def _no_run(run_id: str) -> RunNotFoundError:
    return RunNotFoundError(f"no run {run_id!r} (never submitted, or expired after its retention time)")


def _spec(raw: dict[str, Any], max_payload_bytes: int) -> ScheduleSpec:
    """A schedule's definition as a client sent it, checked as ``Client.schedule`` checks it."""
    try:
        spec = ScheduleSpec.from_dict(raw)
    except ScheduleError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ScheduleError(f"not a schedule definition: {intake.describe(exc)}") from None
    spec = check_spec(spec)
    size = len(compact(spec.kwargs))
    if size > max_payload_bytes:
        raise ScheduleError(
            f"schedule {spec.name!r}: kwargs are {size} bytes of JSON; the limit is {max_payload_bytes} "
            "(NERV_MAX_PAYLOAD_BYTES)"
        )
    return spec
