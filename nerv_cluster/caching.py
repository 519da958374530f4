"""Result caching (issue 16, part "cache"): keys, entries, and who computes which key now. Pure: no I/O.

A task with ``cache=Cache(ttl=...)`` has a **key**: the sha256 of the canonical JSON of its function's
registered name, the cache version and its resolved arguments (upstream results in place of the
references, and for a context task the upstream results it is given), or of the name, the version and
what the registered ``Cache.key`` function returned for those arguments. An **entry** (Redis, under
``Keys.cache_entry``, with the TTL) holds a COMPLETED result for a key and where it was computed.

The scheduler (``scheduler/caching.py``) reads the entries of the cacheable READY tasks in one round trip
per step and hands them to ``decide`` as a :class:`CacheView`; ``decide`` then, per task:

- **hit**: completes the task with the entry's result, marked cached (no worker, no job): the hits of
  one run in one step are one CACHE_HITS event in the log (:func:`hit_events`), which readers of
  events see as one TASK_COMPLETED ``"cached": true`` per task (:func:`expand`);
- **hold**: another task (of any run) computes the same key now, so this one waits, READY and unsent,
  until that one ends (single flight): it is decided again then, and hits the entry that one stored, or
  runs itself when that one failed (the next held one waits for it in turn);
- **miss**: dispatches as usual, recording the key in its TASK_DISPATCHED (``"cache_key"``).

Invariant: the in-flight map (:class:`Flights`) is exactly {key of every non-terminal task whose
TASK_DISPATCHED recorded one} over the runs the scheduler holds, so it is derived from the fold
(``TaskState.cache_key``) and a new leader rebuilds it (:meth:`Flights.rebuild`) before deciding
anything; the waiters are only a wake-up list (a held task is an ordinary READY task that ``decide``
left unsent), rebuilt by deciding every run again. A run submitted with ``refresh_cache=True`` skips the
lookup and the hold: its cacheable tasks compute, and their results replace the entries.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from nerv_cluster import constants, jsonform
from nerv_cluster.errors import CacheKeyError
from nerv_cluster.model import Cache, Event, EventType, TaskError, TaskStatus

#: The run meta flag set by ``Client.submit(refresh_cache=True)``.
REFRESH_META = "refresh_cache"

#: (run id, task id): a task across runs.
TaskRef = tuple[str, str]


def canonical(value: Any) -> str:
    """The canonical JSON of ``value``: sorted keys, no spaces, no NaN (equal data, equal text)."""
    return jsonform.canonical(value)


def digest(parts: Any) -> str:
    """64 hex digits: the sha256 of ``parts``' canonical JSON."""
    return hashlib.sha256(canonical(parts).encode()).hexdigest()


def default_key(
    fn: str,
    cache: Cache,
    args: list[Any],
    kwargs: Mapping[str, Any],
    context: Mapping[str, Any] | None = None,
) -> str:
    """The key of a call of ``fn`` with these resolved arguments (``context``: the upstream results a
    context task is given, which it may read)."""
    parts: list[Any] = ["args", fn, cache.version, args, dict(kwargs)]
    if context is not None:
        parts.append(dict(context))
    return digest(parts)


def custom_key(fn: str, cache: Cache, value: object) -> str:
    """The key of ``fn`` from what its ``Cache.key`` function returned (namespaced by ``fn`` and the
    version, so two functions with one custom key never share entries); CacheKeyError for a non-string."""
    if not isinstance(value, str):
        raise CacheKeyError(
            f"the cache key function {cache.key_name!r} of {fn!r} returned {type(value).__name__} "
            f"{value!r:.80}; it must return a string"
        )
    return digest(["key", fn, cache.version, value])


@dataclass(frozen=True, slots=True)
class Entry:
    """A stored result and where it was computed (the JSON value of a cache entry)."""

    result: Any
    run_id: str
    task_id: str
    attempt: int
    #: When it was stored (the scheduler's clock, which follows Redis's).
    at: float
    #: Bytes of its stored JSON (0 when made in memory): what a hit adds to its CACHE_HITS event.
    size: int = field(default=0, compare=False)

    @property
    def source(self) -> str:
        """``run_id/task_id``: where the result was computed."""
        return f"{self.run_id}/{self.task_id}"

    def to_json(self) -> str:
        """The stored form."""
        body = {"r": self.result, "run": self.run_id, "task": self.task_id, "a": self.attempt, "at": self.at}
        return jsonform.compact(body)

    @classmethod
    def parse(cls, raw: str | bytes | None) -> Entry | None:
        """The entry stored as ``raw``; None when absent or unreadable (a miss: the task computes and
        its result replaces it)."""
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            entry = cls(
                data["r"], str(data["run"]), str(data["task"]), int(data["a"]), float(data["at"]), len(raw)
            )
        except (ValueError, TypeError, KeyError):
            return None
        return entry


class Flights:
    """Who computes each cache key now (the owners), and which held tasks wait for each key.

    Owners are derived from the fold (see the module's invariant); a key may have several owners only
    when refreshing runs compute it beside another. Waiters are a wake-up list: when an owner is
    released, the runs of the key's waiters are decided again.
    """

    __slots__ = ("_by_run", "_owned", "_owners", "_waiters")

    def __init__(self) -> None:
        self._owners: dict[str, set[TaskRef]] = {}
        self._owned: dict[TaskRef, str] = {}
        self._by_run: dict[str, set[str]] = {}
        self._waiters: dict[str, set[TaskRef]] = {}

    def __len__(self) -> int:
        return len(self._owned)

    def key_of(self, run_id: str, task_id: str) -> str | None:
        """The key this task computes now, if it is an owner."""
        return self._owned.get((run_id, task_id))

    def busy(self, key: str, run_id: str, task_id: str) -> bool:
        """True when a task other than this one computes ``key`` now."""
        owners = self._owners.get(key)
        if not owners:
            return False
        return len(owners) > 1 or (run_id, task_id) not in owners

    def claim(self, key: str, run_id: str, task_id: str) -> None:
        """This task computes ``key`` (it was dispatched with it); idempotent."""
        ref = (run_id, task_id)
        old = self._owned.get(ref)
        if old == key:
            return
        if old is not None:
            self._drop(ref, old)
        self._owned[ref] = key
        self._owners.setdefault(key, set()).add(ref)
        self._by_run.setdefault(run_id, set()).add(task_id)

    def hold(self, key: str, run_id: str, task_id: str) -> None:
        """This task waits for ``key``'s owners."""
        self._waiters.setdefault(key, set()).add((run_id, task_id))

    def release(self, run_id: str, task_id: str) -> tuple[str | None, set[str]]:
        """This task no longer computes its key (it ended): the key, and the runs of the tasks that
        waited for it (to decide again)."""
        ref = (run_id, task_id)
        key = self._owned.get(ref)
        if key is None:
            return None, set()
        self._drop(ref, key)
        return key, {rid for rid, _ in self._waiters.pop(key, ())}

    def _drop(self, ref: TaskRef, key: str) -> None:
        del self._owned[ref]
        owners = self._owners[key]
        owners.discard(ref)
        if not owners:
            del self._owners[key]
        tids = self._by_run[ref[0]]
        tids.discard(ref[1])
        if not tids:
            del self._by_run[ref[0]]

    def release_run(self, run_id: str) -> set[str]:
        """Every owner of a run the scheduler forgets: the runs to decide again."""
        woken: set[str] = set()
        for tid in list(self._by_run.get(run_id, ())):
            woken |= self.release(run_id, tid)[1]
        return woken

    def clear(self) -> None:
        """Forget everything (stepping down)."""
        self._owners.clear()
        self._owned.clear()
        self._by_run.clear()
        self._waiters.clear()

    def rebuild(self, runs: Iterable[Any]) -> None:
        """The owners of these runs' (``RunState``) folded state: every non-terminal task whose dispatch
        recorded a key. Waiters are not rebuilt: every run is decided again after a takeover."""
        self.clear()
        for run in runs:
            for tid, ts in run.tasks.items():
                if ts.cache_key is not None and not ts.status.terminal:
                    self.claim(ts.cache_key, run.run_id, tid)


class Kind(Enum):
    """What ``decide`` does with a cacheable READY task."""

    HIT = "hit"
    HOLD = "hold"
    MISS = "miss"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class Verdict:
    """The cache's answer for one task: its kind, the key (hit, miss) and the entry (hit) or the error
    (fail)."""

    kind: Kind
    key: str | None = None
    entry: Entry | None = None
    error: TaskError | None = None

    def failure(self, run_id: str, task_id: str, attempt: int, now: float, source: str) -> Event | None:
        """The TASK_FAILED a task with no key gets (None for any other verdict)."""
        if self.kind is Kind.FAIL and self.error is not None:
            data = {"error": self.error.to_dict(), "reason": "cache key"}
            return Event(EventType.TASK_FAILED, run_id, task_id, attempt, data, ts=now, source=source)
        return None


_HOLD = Verdict(Kind.HOLD)


@dataclass(slots=True)
class CacheView:
    """What the scheduler read of the cache for one step, for ``decide``.

    ``keys``: (run, task) -> key, or the TaskError of a key that could not be computed, for every
    cacheable READY task of the runs decided this step; ``entries``: key -> entry found; ``refresh``: runs
    submitted with ``refresh_cache``; ``flights``: the scheduler's in-flight map, which ``decide`` updates
    through :meth:`verdict` (holds) and :meth:`claim` (dispatches) so that two tasks decided in one step
    never both compute a key. ``missing``: runs with a task that was not prepared (decided again).
    """

    keys: Mapping[TaskRef, str | TaskError]
    entries: Mapping[str, Entry]
    refresh: frozenset[str]
    flights: Flights
    missing: set[str]

    def verdict(self, run_id: str, task_id: str) -> Verdict:
        """Hit, hold, miss or fail for a cacheable READY task about to be dispatched."""
        prepared = self.keys.get((run_id, task_id))
        if prepared is None:  # not read this step (cannot happen for a run prepared as decided)
            self.missing.add(run_id)
            return _HOLD
        if isinstance(prepared, TaskError):
            return Verdict(Kind.FAIL, error=prepared)
        if run_id in self.refresh:
            return Verdict(Kind.MISS, prepared)
        entry = self.entries.get(prepared)
        if entry is not None:
            return Verdict(Kind.HIT, prepared, entry)
        if self.flights.busy(prepared, run_id, task_id):
            self.flights.hold(prepared, run_id, task_id)
            return _HOLD
        return Verdict(Kind.MISS, prepared)

    def claim(self, key: str, run_id: str, task_id: str) -> None:
        """The task is dispatched with ``key``: it computes it now."""
        self.flights.claim(key, run_id, task_id)


#: A hit as its CACHE_HITS event carries it: [task id, attempt, result, where it was computed].
Hit = tuple[str, int, Entry]


def hit_events(
    run_id: str,
    hits: Sequence[Hit],
    now: float,
    source: str,
    per_event: int = constants.CACHE_HITS_PER_EVENT,
    max_bytes: int = constants.CACHE_HITS_EVENT_BYTES,
) -> list[Event]:
    """The CACHE_HITS events of one run's hits in one step: at most ``per_event`` hits and about
    ``max_bytes`` of results each (a hit bigger than that goes alone).

    Why one event for many hits: a run of hits is nearly all such events, and each event costs its
    writer, the log and every reader that follows the run (parsing, folding) far more than one more
    row of a list; a 2,000-task run from the cache spent most of its time on 2,000 TASK_COMPLETEDs.
    """
    events: list[Event] = []
    rows: list[list[Any]] = []
    size = 0
    for tid, attempt, entry in hits:
        if rows and (len(rows) >= per_event or size + entry.size > max_bytes):
            events.append(_hits_event(run_id, rows, now, source))
            rows, size = [], 0
        rows.append([tid, attempt, entry.result, entry.source])
        size += entry.size
    if rows:
        events.append(_hits_event(run_id, rows, now, source))
    return events


def _hits_event(run_id: str, rows: list[list[Any]], now: float, source: str) -> Event:
    return Event(EventType.CACHE_HITS, run_id, data={"hits": rows}, ts=now, source=source)


def hit_rows(ev: Event) -> list[tuple[str, int, Any, str]]:
    """The hits of a CACHE_HITS event as (task id, attempt, result, cached from); ValueError for a
    malformed one (the fold then rejects the run, as for any event it cannot apply)."""
    rows = ev.data.get("hits")
    if not isinstance(rows, list):
        raise ValueError("CACHE_HITS without a list of hits")
    out = []
    for row in rows:
        if not (isinstance(row, list) and len(row) == 4):
            raise ValueError(f"a malformed cache hit {row!r:.80}")
        tid, attempt, result, source = row
        if not isinstance(tid, str) or isinstance(attempt, bool) or not isinstance(attempt, int):
            raise ValueError(f"a malformed cache hit {row!r:.80}")
        out.append((tid, attempt, result, str(source)))
    return out


def expand(ev: Event) -> list[Event]:
    """``ev`` as readers of events see it: a CACHE_HITS as one TASK_COMPLETED (``"cached": true``,
    ``"cached_from"``) per hit, in order, with ids derived from its own; any other event as itself.
    A malformed CACHE_HITS expands to nothing (the fold rejects its run)."""
    if ev.type is not EventType.CACHE_HITS:
        return [ev]
    try:
        rows = hit_rows(ev)
    except ValueError:
        return []
    return [
        Event(
            EventType.TASK_COMPLETED,
            ev.run_id,
            tid,
            attempt,
            {"result": result, "cached": True, "cached_from": source},
            ts=ev.ts,
            id=f"{ev.id}.{i}",
            source=ev.source,
            logged_at=ev.logged_at,
        )
        for i, (tid, attempt, result, source) in enumerate(rows)
    ]


def is_refresh(meta: Mapping[str, Any]) -> bool:
    """Whether a run's definition meta asks to recompute every cached task."""
    return meta.get(REFRESH_META) is True


def completed_uncached(status: TaskStatus, cached_from: str | None) -> bool:
    """Whether a task's end is a computed result worth storing (not one taken from the cache)."""
    return status is TaskStatus.COMPLETED and cached_from is None
