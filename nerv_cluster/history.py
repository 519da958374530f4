"""Time travel: a run as it was after any one event of its log.

Invariant: the state at a position is exactly ``fold(log[:position])``, the same pure fold that built
the live state, so the past is never stored beside the log, only recomputed from it. A position is
either a **cursor** (a stream entry id, ``"1733059200000-3"``: the events up to and including that
entry) or a **count** (``N``: the first N events). Cursors are what every event read from a log carries
(``Event.cursor``), what ``client.events(run_id, after=cursor)`` resumes after, and what the console's
Server-Sent Events carry as their ``id:``; counts are what a person types (``nerv status RUN --at 5``).

The pure part (:func:`parse_cursor`, :func:`is_cursor`, :func:`up_to`, :func:`point_at`) is tested
without Redis; :func:`read_point` and :func:`read_state` read only the part of the log they need
(``XRANGE`` bounded by the cursor, or stopped after N events).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from nerv_cluster import state as st
from nerv_cluster.errors import CursorError, RunNotFoundError
from nerv_cluster.eventlog import Entry, EventLog
from nerv_cluster.model import Event

#: A position in a run's log: a cursor (stream entry id) or a count of events (1 or more).
Position = str | int

_CURSOR = re.compile(r"^(\d{1,20})-(\d{1,20})$")


def parse_cursor(cursor: str) -> tuple[int, int]:
    """A stream entry id as its two numbers (milliseconds, sequence), for comparing entry ids in order;
    :class:`CursorError` for anything that is no entry id."""
    m = _CURSOR.match(cursor) if isinstance(cursor, str) else None
    if m is None:
        raise CursorError(f"{cursor!r:.60} is no log cursor (a stream entry id such as 1733059200000-0)")
    return int(m.group(1)), int(m.group(2))


def is_cursor(text: str) -> bool:
    """True when ``text`` is a stream entry id (a cursor) rather than, say, an event count."""
    return bool(_CURSOR.match(text))


def parse_position(text: str | int) -> Position:
    """A position typed by a person or sent in a URL: an entry id stays a cursor, digits become a count
    (``"12"`` -> 12). :class:`CursorError` for anything else or for a count below one."""
    if isinstance(text, int) and not isinstance(text, bool):
        count = text
    elif isinstance(text, str) and is_cursor(text):
        return text
    elif isinstance(text, str) and text.isdigit():
        count = int(text)
    else:
        raise CursorError(f"{text!r:.60} is neither a log cursor (an entry id) nor a number of events")
    if count < 1:
        raise CursorError(f"at {count}: a run exists from its first event on; give 1 or more")
    return count


def up_to(entries: Iterable[Entry], at: Position) -> Iterator[Event]:
    """The events of ``entries`` (a run's log, in order) up to and including entry ``at`` (a cursor),
    or the first ``at`` of them (a count). Stops reading ``entries`` as soon as it has passed the
    position, so a lazily read log is read no further than needed."""
    if isinstance(at, int):
        if at < 1:
            raise CursorError(f"at {at}: a run exists from its first event on; give 1 or more")
        for n, (_, ev) in enumerate(entries, 1):
            yield ev
            if n >= at:
                return
        return
    limit = parse_cursor(at)
    for entry_id, ev in entries:
        if parse_cursor(entry_id) > limit:
            return
        yield ev


class Point(NamedTuple):
    """A run as it was at a point of its log: its state, the last event folded into it, and how many
    events that is (the point as a count: ``status(run_id, at=events)`` is the same state)."""

    run: st.RunState
    event: Event
    events: int


def point_at(run_id: str, entries: Iterable[Entry], at: Position) -> Point:
    """The run after the events of its log up to position ``at``: the pure fold of that prefix, with
    the prefix's last event and length.

    :class:`CursorError` when the prefix holds no submission of the run (a cursor before it).
    """
    last: Event | None = None
    count = 0

    def taken() -> Iterator[Event]:
        nonlocal last, count
        for ev in up_to(entries, at):
            last, count = ev, count + 1
            if ev.run_id == run_id:
                yield ev

    run = st.fold_run(None, taken())
    if run is None or last is None:
        raise CursorError(f"run {run_id}: nothing of it is logged at or before {at}")
    return Point(run, last, count)


def state_at(run_id: str, entries: Iterable[Entry], at: Position) -> st.RunState:
    """:func:`point_at`'s state: the run after the events of its log up to position ``at``."""
    return point_at(run_id, entries, at).run


def read_point(log: EventLog, run_id: str, at: Position) -> Point:
    """:func:`point_at` over the run's log in Redis, reading no entry past the position.

    :class:`RunNotFoundError` for an unknown or expired run, :class:`CursorError` for a position that
    names no point of its log.
    """
    log.require_run(run_id)
    if isinstance(at, str):
        parse_cursor(at)  # refuse a bad cursor before Redis sees it
        entries: Iterable[Entry] = log.read_run(run_id, upto=at)
    else:
        # Read in chunks no bigger than needed: the first 5 events of a 40,000-event log cost 5 entries.
        entries = log.read_run(run_id, count=max(1, min(at, 10_000)))
    try:
        return point_at(run_id, entries, at)
    except CursorError:
        if not log.run_exists(run_id):
            raise RunNotFoundError(f"no run {run_id!r} (expired while it was read)") from None
        raise


def read_state(log: EventLog, run_id: str, at: Position) -> st.RunState:
    """:func:`read_point`'s state: the run as it was at position ``at`` of its log in Redis."""
    return read_point(log, run_id, at).run


__all__ = [
    "Point",
    "Position",
    "is_cursor",
    "parse_cursor",
    "parse_position",
    "point_at",
    "read_point",
    "read_state",
    "state_at",
    "up_to",
]
