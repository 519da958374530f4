"""The scheduler's schedules room (issue 11, idem): fire each schedule's slots, once each.

Invariant: ``schedules`` is the fold of the schedules stream (refolded by each new leader) plus the
clients' commands seen in the feed since and the fires this leader wrote (each written, fenced, before
it is folded). The heap holds, per schedule, the next time to look at it (its next slot, or now after a
command); nothing is polled. Whether a slot fires is decided at that time by
:func:`nerv_cluster.schedules.decide` from the folded schedule and whether its last run still runs, so
an extra or a lost reminder changes when a schedule is looked at, never what it does; and a fire's run
id derives from its slot, so no slot fires twice (see :mod:`nerv_cluster.schedules`).
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Iterable

from nerv_cluster import constants
from nerv_cluster import state as st
from nerv_cluster.model import Event, EventType
from nerv_cluster.schedules import (
    EMPTY,
    SCHEDULE_COMMANDS,
    Schedule,
    Schedules,
    apply_schedule,
    decide,
    event_run_id,
    fire_definition,
    fire_run_id,
    fold_schedules,
    trigger_run_id,
)
from nerv_cluster.schedulestore import Fire, ScheduleStore

log = logging.getLogger("nerv.scheduler")

#: Entries the schedules stream may hold beyond its per-schedule allowance before it is compacted.
_COMPACT_SLACK = 64


class ScheduleRoom:
    """Every schedule, the reminders of when to look at each, and the fires."""

    def __init__(self, store: ScheduleStore) -> None:
        self.store = store
        self.schedules: Schedules = EMPTY
        self._heap: list[tuple[float, str]] = []
        #: The one reminder per schedule that counts (older heap entries for it are skipped).
        self._at: dict[str, float] = {}
        #: Each schedule's last run -> the schedule (its end may let a buffered slot fire).
        self._by_run: dict[str, str] = {}
        #: Entries in the schedules stream (as far as this leader knows), for compaction.
        self._length = 0

    def reload(self, now: float) -> None:
        """Refold the schedules stream (a new leader) and look at every schedule now."""
        self.clear()
        events, _ = self.store.read()
        self.schedules = fold_schedules(events)
        self._length = len(events)
        for name, sched in self.schedules.items():
            self._remember(sched)
            self._wake(name, now)

    def clear(self) -> None:
        """Forget everything (stepping down)."""
        self.schedules, self._heap, self._at, self._by_run, self._length = EMPTY, [], {}, {}, 0

    def _remember(self, sched: Schedule) -> None:
        if sched.last_run is not None:
            self._by_run[sched.last_run] = sched.spec.name

    def _wake(self, name: str, at: float) -> None:
        old = self._at.get(name)
        if old is None or at < old:
            self._at[name] = at
            heapq.heappush(self._heap, (at, name))

    def observe(self, events: Iterable[Event], now: float) -> None:
        """Fold the clients' schedule commands read from the feed; look at each schedule named now."""
        for ev in events:
            if ev.type in SCHEDULE_COMMANDS:
                self.schedules = apply_schedule(self.schedules, ev)
                self._length += 1
                name = ev.run_id.removeprefix("schedule:")
                if name in self.schedules:
                    self._wake(name, now)

    def run_ended(self, run_ids: Iterable[str], now: float) -> None:
        """Runs finished: a schedule whose last run it was is looked at now (a buffered slot fires)."""
        for rid in run_ids:
            name = self._by_run.pop(rid, None)
            if name is not None:
                self._wake(name, now)

    def next_due(self) -> float | None:
        """When the earliest reminder is due, if any."""
        return self._heap[0][0] if self._heap else None

    def _pop_due(self, now: float) -> list[str]:
        names = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            at, name = heapq.heappop(heap)
            if self._at.get(name) == at:
                del self._at[name]
                names.append(name)
        return names

    def act(self, now: float, state: st.State, token: Callable[[], str], source: str) -> list[Event]:
        """Decide for every schedule due by ``now``; write the fires and skips (fenced by ``token()``, read
        only when there is something to write), fold them; the submissions of the runs created, for the
        scheduler to fold into its state."""
        fires: list[Fire] = []
        notes: list[Event] = []
        for name in self._pop_due(now):
            sched = self.schedules.get(name)
            if sched is None:
                continue  # deleted
            spec = sched.spec
            try:
                turn = decide(sched, now, _running(state, sched.last_run))
                mine = [
                    _fire(name, fire_run_id(name, slot), slot, None, now, source, sched) for slot in turn.fire
                ]
                for trigger, at in turn.triggers:
                    mine.append(_fire(name, trigger_run_id(name, trigger), at, trigger, now, source, sched))
            except Exception:
                # The fold checked the definition, so this is a bug; it must stay this schedule's alone
                # (every run shares the loop): logged, and tried again at its next slot.
                log.exception("schedule %r: could not decide or build its fire; skipped for now", name)
                self._wake(name, now + (spec.every or 60.0))
                continue
            fires += mine
            if turn.skip_upto is not None:
                data = {"name": name, "upto": turn.skip_upto, "n": turn.skip_count}
                notes.append(
                    Event(EventType.SCHEDULE_SKIPPED, event_run_id(name), data=data, ts=now, source=source)
                )
                log.info("schedule %r: slot %.3f skipped (%s runs)", name, turn.skip_upto, sched.last_run)
            if turn.next_at is not None:
                self._wake(name, turn.next_at)
        if not fires and not notes:
            return []
        fence = token()
        created = self.store.fire(fence, fires, notes)
        for _, fired in fires:
            self.schedules = apply_schedule(self.schedules, fired)
        for note in notes:
            self.schedules = apply_schedule(self.schedules, note)
        self._length += len(fires) + len(notes)
        out = []
        for (sub, fired), made in zip(fires, created, strict=True):
            sched = self.schedules.get(str(fired.data["name"]))
            if sched is not None:
                self._remember(sched)
            log.info("schedule %r fired %s%s", fired.data["name"], sub.run_id, "" if made else " (existed)")
            if made:
                out.append(sub)
        self._maybe_compact(fence, source, now)
        return out

    def _maybe_compact(self, token: str, source: str, now: float) -> None:
        """Keep the stream bounded: once it holds more than its allowance, replace it by a snapshot
        (a fresh fold of it: a client's command appended meanwhile makes the script refuse, and the next
        fire tries again). Amortized O(1) per entry written."""
        allowance = constants.SCHEDULES_COMPACT_PER_SCHEDULE * len(self.schedules) + _COMPACT_SLACK
        if self._length <= allowance:
            return
        events, last_id = self.store.read()
        folded = fold_schedules(events)
        snapshot = Event(
            EventType.SCHEDULES_SNAPSHOT,
            event_run_id("*"),
            data={"schedules": [s.to_dict() for s in folded.values()]},
            ts=now,
            source=source,
        )
        if last_id and self.store.compact(token, last_id, snapshot):
            self.schedules = folded
            self._length = 1
        else:
            self._length = len(events)


def _running(state: st.State, run_id: str | None) -> bool:
    run = state.runs.get(run_id) if run_id is not None else None
    return run is not None and not run.status.terminal


def _fire(
    name: str, run_id: str, slot: float, trigger: str | None, now: float, source: str, sched: Schedule
) -> Fire:
    definition = fire_definition(sched.spec, slot, trigger)
    submitted = Event(
        EventType.WORKFLOW_SUBMITTED, run_id, data={"workflow": definition.to_dict()}, ts=now, source=source
    )
    data: dict[str, object] = {"name": name, "slot": slot, "run": run_id}
    if trigger is not None:
        data["trigger"] = trigger
    fired = Event(EventType.SCHEDULE_FIRED, event_run_id(name), data=data, ts=now, source=source)
    return submitted, fired
