"""Schedules (issue 11, part 5): workflows fired by cron or by interval, each slot exactly once.

A schedule names a *factory*: a registered task function that gets the slot's time (epoch seconds) and
the schedule's ``kwargs`` and returns a Workflow. A fire is a run of one task calling the factory, so no
user code runs in the scheduler: the workflow it returns runs as that task's child run (issue 16), and
the fire's run ends with it.

Schedules live in the cluster-wide schedules stream as SCHEDULE_* events: clients write their commands
(set, pause, resume, trigger, delete), the leader writes what it did (fired, skipped) and, now and then,
a snapshot that replaces everything before it. Everything here is pure: :func:`apply_schedule` folds one
event, :func:`decide` says what one schedule does at a time ``now``.

Invariant: each (schedule, slot) names one run id (:func:`fire_run_id`), created at most once while it is
retained (the fire script refuses an existing run, atomically with the SCHEDULE_FIRED record and fenced
by the lease), and a slot at or before a schedule's ``since`` never fires again. So a failover, a resent
write or two leaders at once never fire a slot twice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from pyrsistent import PMap, pmap

from nerv_cluster import constants
from nerv_cluster.errors import ScheduleError
from nerv_cluster.ids import is_valid_id
from nerv_cluster.model import Event, EventType, WorkflowDef

#: What a slot does while the schedule's previous run still runs.
OVERLAPS = ("skip", "buffer_one", "allow")

#: Events of the schedules stream.
SCHEDULE_EVENTS = frozenset(
    {
        EventType.SCHEDULE_SET,
        EventType.SCHEDULE_PAUSED,
        EventType.SCHEDULE_RESUMED,
        EventType.SCHEDULE_DELETED,
        EventType.SCHEDULE_TRIGGERED,
        EventType.SCHEDULE_FIRED,
        EventType.SCHEDULE_SKIPPED,
        EventType.SCHEDULES_SNAPSHOT,
    }
)
#: The commands clients write (the scheduler wakes the schedule they name).
SCHEDULE_COMMANDS = SCHEDULE_EVENTS - {
    EventType.SCHEDULE_FIRED,
    EventType.SCHEDULE_SKIPPED,
    EventType.SCHEDULES_SNAPSHOT,
}
#: The task id of a fire's one task (it calls the factory).
FIRE_TASK = "factory"


def event_run_id(name: str) -> str:
    """The ``run_id`` of a schedule's events: ':' is outside the id alphabet, so no run has it and the
    run fold ignores them (they travel in the feed only to wake the scheduler)."""
    return f"schedule:{name}"


@dataclass(frozen=True, slots=True)
class ScheduleSpec:
    """What a schedule fires and when (see :meth:`nerv_cluster.client.Client.schedule`)."""

    name: str
    factory: str
    queue: str = constants.DEFAULT_QUEUE
    cron: str | None = None
    every: float | None = None
    overlap: str = "skip"
    catchup: bool | int = False
    timezone: str = "UTC"
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "name": self.name,
            "factory": self.factory,
            "queue": self.queue,
            "cron": self.cron,
            "every": self.every,
            "overlap": self.overlap,
            "catchup": self.catchup,
            "timezone": self.timezone,
            "kwargs": dict(self.kwargs),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScheduleSpec:
        """Inverse of :meth:`to_dict`, checked: :class:`ScheduleError` for anything invalid."""
        if not isinstance(data, Mapping):
            raise ScheduleError("a schedule definition must be a JSON object")
        kwargs = data.get("kwargs") or {}
        if not isinstance(kwargs, Mapping):
            raise ScheduleError("kwargs must be a JSON object")
        return check_spec(
            cls(
                name=data.get("name"),  # type: ignore[arg-type]  # checked below
                factory=data.get("factory"),  # type: ignore[arg-type]
                queue=data.get("queue", constants.DEFAULT_QUEUE),
                cron=data.get("cron"),
                every=data.get("every"),
                overlap=data.get("overlap", "skip"),
                catchup=data.get("catchup", False),
                timezone=data.get("timezone", "UTC"),
                kwargs=dict(kwargs),
            )
        )


def check_spec(spec: ScheduleSpec) -> ScheduleSpec:
    """``spec`` if it is a valid schedule; else :class:`ScheduleError` saying what is wrong."""
    name = spec.name
    if not (isinstance(name, str) and is_valid_id(name) and len(name) <= constants.MAX_SCHEDULE_NAME_CHARS):
        raise ScheduleError(
            f"invalid schedule name {name!r:.80}: use at most {constants.MAX_SCHEDULE_NAME_CHARS} ASCII "
            "letters, digits, '_', '-' or '.', starting with a letter or digit"
        )
    where = f"schedule {name!r}"
    if not isinstance(spec.factory, str) or not spec.factory:
        raise ScheduleError(f"{where}: the factory must be a registered task function or its name")
    if spec.queue not in constants.QUEUES:
        raise ScheduleError(f"{where}: unknown queue {spec.queue!r:.80}")
    if (spec.cron is None) == (spec.every is None):
        raise ScheduleError(f"{where}: give exactly one of cron= and every=")
    if spec.cron is not None and (not isinstance(spec.cron, str) or not croniter.is_valid(spec.cron)):
        raise ScheduleError(f"{where}: invalid cron expression {spec.cron!r:.80}")
    every = spec.every
    if every is not None and (
        isinstance(every, bool)
        or not isinstance(every, int | float)
        or not math.isfinite(every)
        or every < constants.MIN_SCHEDULE_INTERVAL_S
    ):
        raise ScheduleError(
            f"{where}: every= must be a number of seconds of at least {constants.MIN_SCHEDULE_INTERVAL_S}, "
            f"got {every!r:.80}"
        )
    if spec.overlap not in OVERLAPS:
        choices = ", ".join(OVERLAPS)
        raise ScheduleError(f"{where}: overlap must be one of {choices}, got {spec.overlap!r:.80}")
    catchup = spec.catchup
    if not isinstance(catchup, bool) and not (isinstance(catchup, int) and catchup >= 1):
        raise ScheduleError(f"{where}: catchup must be True, False or a number of slots (1 or more)")
    try:
        if not isinstance(spec.timezone, str):
            raise ZoneInfoNotFoundError(spec.timezone)
        ZoneInfo(spec.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(f"{where}: unknown time zone {spec.timezone!r:.80}") from None
    return spec


def catchup_slots(spec: ScheduleSpec) -> int:
    """How many missed slots may fire at once: the latest one without catchup, else the bound."""
    if spec.catchup is True:
        return constants.SCHEDULE_MAX_CATCHUP
    if spec.catchup is False:
        return 1
    return min(int(spec.catchup), constants.SCHEDULE_MAX_CATCHUP)


def next_slot(spec: ScheduleSpec, after: float) -> float:
    """The first slot strictly after ``after`` (epoch seconds). ``every`` slots are the multiples of the
    interval since the epoch (so they do not depend on when the schedule was made); cron slots are read
    in the schedule's time zone (daylight saving included, by croniter)."""
    if spec.every is not None:
        k = math.floor(after / spec.every) + 1
        slot = _slot(k, spec.every)
        return slot if slot > after else _slot(k + 1, spec.every)
    start = datetime.fromtimestamp(after, ZoneInfo(spec.timezone))
    return float(croniter(str(spec.cron), start).get_next(float))


def _slot(k: int, every: float) -> float:
    # Rounded to the microsecond: the same k gives the same float (and run id) on every host.
    return round(k * every, 6)


def _every_range(every: float, since: float, upto: float) -> tuple[int, int]:
    """The first and last k with slot ``k * every`` in ``(since, upto]`` (first > last: none)."""
    first = math.floor(since / every) + 1
    last = math.floor(upto / every)
    while last >= first and _slot(last, every) > upto:  # rounding to the microsecond may cross a bound
        last -= 1
    while first <= last and _slot(first, every) <= since:
        first += 1
    return first, last


def due_slots(spec: ScheduleSpec, since: float, now: float, keep: int) -> list[float]:
    """The latest ``keep`` slots in ``(since, now]``, oldest first: O(keep), however many were missed."""
    if now <= since or keep <= 0:
        return []
    if spec.every is not None:
        first, last = _every_range(spec.every, since, now)
        return [_slot(k, spec.every) for k in range(max(first, last - keep + 1), last + 1)]
    # A second past now, then back: croniter's get_prev is strict, and now may be a slot itself.
    it = croniter(str(spec.cron), datetime.fromtimestamp(now + 1.0, ZoneInfo(spec.timezone)))
    out: list[float] = []
    while len(out) < keep:
        slot = float(it.get_prev(float))
        if slot <= since:
            break
        if slot <= now:
            out.append(slot)
    out.reverse()
    return out


def count_slots(
    spec: ScheduleSpec, since: float, upto: float, cap: int = constants.SCHEDULE_MAX_SKIP_COUNT
) -> int:
    """How many slots lie in ``(since, upto]`` (at most ``cap``): O(1) for ``every``, O(count) for cron."""
    if upto <= since:
        return 0
    if spec.every is not None:
        first, last = _every_range(spec.every, since, upto)
        return min(cap, max(0, last - first + 1))
    it = croniter(str(spec.cron), datetime.fromtimestamp(since, ZoneInfo(spec.timezone)))
    n = 0
    while n < cap and float(it.get_next(float)) <= upto:  # get_next is strict: slots after since
        n += 1
    return n


@dataclass(frozen=True, slots=True)
class Schedule:
    """A schedule's definition and where it is.

    ``since``: slots at or before it never fire (they fired, were skipped, or came before the schedule
    was set or resumed). ``triggers``: manual fires asked for and not yet made (event id, time asked).
    """

    spec: ScheduleSpec
    since: float
    paused: bool = False
    last_slot: float | None = None
    last_run: str | None = None
    fired: int = 0
    skipped: int = 0
    triggers: tuple[tuple[str, float], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (in a snapshot)."""
        return {
            "spec": self.spec.to_dict(),
            "since": self.since,
            "paused": self.paused,
            "last_slot": self.last_slot,
            "last_run": self.last_run,
            "fired": self.fired,
            "skipped": self.skipped,
            "triggers": [list(t) for t in self.triggers],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Schedule:
        """Inverse of :meth:`to_dict`."""
        last_slot, last_run = data.get("last_slot"), data.get("last_run")
        return cls(
            spec=ScheduleSpec.from_dict(data["spec"]),
            since=float(data["since"]),
            paused=bool(data.get("paused", False)),
            last_slot=None if last_slot is None else float(last_slot),
            last_run=None if last_run is None else str(last_run),
            fired=int(data.get("fired", 0)),
            skipped=int(data.get("skipped", 0)),
            triggers=tuple((str(t[0]), float(t[1])) for t in data.get("triggers", ())),
        )


Schedules = PMap[str, Schedule]
EMPTY: Schedules = pmap()


def apply_schedule(schedules: Schedules, ev: Event) -> Schedules:
    """Fold one schedules-stream event (others change nothing). Pure and idempotent: every handler
    sets, or moves forward, what it touches; an event that cannot be read changes nothing."""
    if ev.type not in SCHEDULE_EVENTS:
        return schedules
    try:
        return _apply(schedules, ev)
    except (ScheduleError, KeyError, TypeError, ValueError, IndexError):
        return schedules  # a malformed entry (an old or buggy writer) must not break the others


def _apply(schedules: Schedules, ev: Event) -> Schedules:
    d = ev.data
    if ev.type is EventType.SCHEDULES_SNAPSHOT:
        return pmap({s["spec"]["name"]: Schedule.from_dict(s) for s in d["schedules"]})
    if ev.type is EventType.SCHEDULE_SET:
        spec = ScheduleSpec.from_dict(d["spec"])
        at = float(d["at"])
        old = schedules.get(spec.name)
        if old is None:
            return schedules.set(spec.name, Schedule(spec, since=at))
        # A changed definition takes effect from when it was set: no slot of the old one fires late.
        return schedules.set(spec.name, replace(old, spec=spec, since=max(old.since, at)))
    name = str(d["name"])
    old = schedules.get(name)
    if old is None:
        return schedules
    if ev.type is EventType.SCHEDULE_DELETED:
        return schedules.discard(name)
    if ev.type is EventType.SCHEDULE_PAUSED:
        return schedules.set(name, replace(old, paused=True))
    if ev.type is EventType.SCHEDULE_RESUMED:
        # Slots that passed while paused stay unfired: a resume is not a catch-up.
        return schedules.set(name, replace(old, paused=False, since=max(old.since, float(d["at"]))))
    if ev.type is EventType.SCHEDULE_TRIGGERED:
        if any(tid == ev.id for tid, _ in old.triggers):
            return schedules
        return schedules.set(name, replace(old, triggers=(*old.triggers, (ev.id, float(d["at"])))))
    if ev.type is EventType.SCHEDULE_FIRED:
        run, slot = str(d["run"]), float(d["slot"])
        trigger = d.get("trigger")
        if trigger is not None:
            left = tuple(t for t in old.triggers if t[0] != trigger)
            if len(left) == len(old.triggers):
                return schedules  # already folded
            return schedules.set(
                name, replace(old, triggers=left, last_run=run, last_slot=slot, fired=old.fired + 1)
            )
        if slot <= old.since:
            return schedules  # already folded (or a deposed leader's late write: nothing moves back)
        return schedules.set(
            name, replace(old, since=slot, last_run=run, last_slot=slot, fired=old.fired + 1)
        )
    if ev.type is EventType.SCHEDULE_SKIPPED:
        upto = float(d["upto"])
        if upto <= old.since:
            return schedules
        return schedules.set(name, replace(old, since=upto, skipped=old.skipped + int(d.get("n", 1))))
    return schedules


def fold_schedules(events: Any, schedules: Schedules = EMPTY) -> Schedules:
    """Apply events in order."""
    for ev in events:
        schedules = apply_schedule(schedules, ev)
    return schedules


@dataclass(frozen=True, slots=True)
class Turn:
    """What one schedule does now: slots to fire (in order), manual triggers to fire, a skip up to a
    slot, and when to look at it again (None: only when something happens to it)."""

    fire: tuple[float, ...] = ()
    triggers: tuple[tuple[str, float], ...] = ()
    skip_upto: float | None = None
    skip_count: int = 0
    next_at: float | None = None


def decide(sched: Schedule, now: float, running: bool) -> Turn:
    """What ``sched`` does at ``now``, ``running`` saying whether its last run still runs. Pure, and
    O(catchup) however many slots were missed.

    Due slots are those in ``(since, now]``. ``overlap="allow"`` fires the latest of them (all of them,
    up to the bound, with ``catchup``). ``skip`` and ``buffer_one`` never run two at once: with the
    previous run over they fire the latest due slot; while it runs, ``skip`` records the due slots as
    skipped and ``buffer_one`` leaves them due, so the latest fires when the run ends. Manual triggers
    fire whatever the overlap and while paused.
    """
    spec = sched.spec
    if sched.paused:
        return Turn(triggers=sched.triggers)
    keep = catchup_slots(spec) if spec.overlap == "allow" else 1
    due = due_slots(spec, sched.since, now, keep)
    fire: tuple[float, ...] = ()
    skip_upto: float | None = None
    skip_count = 0
    if due:
        if spec.overlap == "allow" or not running:
            fire = tuple(due)
        elif spec.overlap == "skip":
            # Every slot passed over counts, not only the latest (``due`` keeps just that one).
            skip_upto, skip_count = due[-1], max(1, count_slots(spec, sched.since, due[-1]))
    since = max(sched.since, due[-1]) if due and (fire or skip_upto is not None) else sched.since
    return Turn(fire, sched.triggers, skip_upto, skip_count, next_slot(spec, max(since, now)))


def fire_run_id(name: str, slot: float) -> str:
    """The run id of a schedule's slot: the name and the slot in milliseconds."""
    return f"{name}.{round(slot * 1000)}"


def trigger_run_id(name: str, trigger_id: str) -> str:
    """The run id of a manual trigger: the name and the trigger event's id."""
    return f"{name}.t{trigger_id[:24]}"


def fire_definition(spec: ScheduleSpec, slot: float, trigger: str | None = None) -> WorkflowDef:
    """A fire's workflow: one task calling the factory with the slot's time and the kwargs."""
    from nerv_cluster.workflow import Workflow  # workflow imports the model this module also uses

    wf = Workflow(f"schedule-{spec.name}")
    wf.add(spec.factory, slot, kwargs=dict(spec.kwargs), id=FIRE_TASK, queue=spec.queue)
    meta: dict[str, Any] = {"schedule": spec.name, "slot": slot}
    if trigger is not None:
        meta["trigger"] = trigger
    definition = wf.definition()
    return replace(definition, meta={**definition.meta, **meta})
