"""The schedules stream in Redis (issue 11, idem): clients' commands in, the leader's fires out.

Invariant: the stream holds every schedule's history since its last snapshot, so folding it
(:func:`nerv_cluster.schedules.fold_schedules`) gives every schedule as it is. A client's command goes
to the stream and to the scheduler's feed in one transaction (the feed only wakes the scheduler); the
leader's writes go through fenced scripts (``schedule_fire.lua``, ``schedules_compact.lua``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis

from nerv_cluster import constants
from nerv_cluster.constants import Keys
from nerv_cluster.errors import LeaseLostError
from nerv_cluster.eventlog import logged_at
from nerv_cluster.model import Event
from nerv_cluster.replication import Replication
from nerv_cluster.schedules import Schedules, fold_schedules
from nerv_cluster.scripts import ScheduleFire, SchedulesCompact

#: One fire to make: its run's submission and the SCHEDULE_FIRED record.
Fire = tuple[Event, Event]


class ScheduleStore:
    """Reads and writes the schedules stream."""

    def __init__(self, client: redis.Redis, keys: Keys, replication: Replication | None = None) -> None:
        self.redis = client
        self.keys = keys
        self._fire = ScheduleFire(client, replication)
        self._compact = SchedulesCompact(client)

    def read(self) -> tuple[list[Event], str]:
        """Every event of the stream, oldest first, and the id of its last entry ("" when empty).
        Entries that are no valid event are skipped (the fold ignores what it cannot read too)."""
        entries: list[Any] = list(self.redis.xrange(self.keys.schedules) or [])
        events = []
        for eid, fields in entries:
            try:
                events.append(Event.parse(fields[constants.EVENT_FIELD], logged_at(eid)))
            except Exception:  # one bad entry never hides the others
                continue
        return events, str(entries[-1][0]) if entries else ""

    def schedules(self) -> Schedules:
        """Every schedule, folded from the stream."""
        return fold_schedules(self.read()[0])

    def command(self, event: Event) -> None:
        """Append a client's command to the stream and to the feed, in one transaction."""
        payload = event.to_json()
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(self.keys.schedules, {constants.EVENT_FIELD: payload})
        pipe.xadd(
            self.keys.feed, {constants.EVENT_FIELD: payload}, maxlen=constants.FEED_MAXLEN, approximate=True
        )
        pipe.execute()

    def fire(self, token: str, fires: Sequence[Fire], notes: Sequence[Event] = ()) -> list[bool]:
        """Fenced: create each fire's run unless it exists, record each fire, then the notes. Per fire,
        whether its run was created here."""
        if not fires and not notes:
            return []
        k = self.keys
        keys = [k.log(sub.run_id) for sub, _ in fires]
        args: list[Any] = []
        for sub, fired in fires:
            args += [sub.run_id, sub.ts, k.channel(sub.run_id), sub.to_json(), fired.to_json()]
        args += [n.to_json() for n in notes]
        try:
            out = self._fire(
                lease=k.lease,
                schedules=k.schedules,
                active=k.active,
                runs=k.runs,
                token=token,
                n_fires=len(fires),
                tail_keys=keys,
                tail_args=args,
            )
        except redis.ResponseError as exc:
            if "LEASE_LOST" in str(exc):
                raise LeaseLostError(str(exc)) from exc
            raise
        return [bool(int(v)) for v in out]

    def compact(self, token: str, last_id: str, snapshot: Event) -> bool:
        """Fenced: replace the stream by ``snapshot`` if it still ends at ``last_id``."""
        try:
            return bool(
                self._compact(
                    lease=self.keys.lease,
                    schedules=self.keys.schedules,
                    token=token,
                    last_id=last_id,
                    snapshot=snapshot.to_json(),
                )
            )
        except redis.ResponseError as exc:
            if "LEASE_LOST" in str(exc):
                raise LeaseLostError(str(exc)) from exc
            raise

    def length(self) -> int:
        """Entries in the stream."""
        return int(self.redis.xlen(self.keys.schedules))
