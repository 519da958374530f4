"""Time travel: a run as it was after any one event of its log.

Invariant: the state at a position is exactly ``fold(log[:position])``, the same pure fold that built
the live state, so the past is never stored beside the log, only recomputed from it. A position is
either a **cursor** (a stream entry id, ``"1733059200000-3"``: the events up to and including that
entry) or a **count** (``N``: the first N events). Cursors are what every event read from a log carries
(``Event.cursor``), what ``client.events(run_id, after=cursor)`` resumes after, and what the console's
Server-Sent Events carry as their ``id:``; counts are what a person types (``nerv status RUN --at 5``).

The pure part (:func:`parse_cursor`, :func:`is_cursor`, :func:`up_to`, :func:`state_at`) is tested
without Redis; :func:`read_state` reads only the part of the log it needs (``XRANGE`` bounded by the
cursor, or stopped after N events).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

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


def state_at(run_id: str, entries: Iterable[Entry], at: Position) -> st.RunState:
    """The run after the events of its log up to position ``at``: the pure fold of that prefix.

    :class:`CursorError` when the prefix holds no submission of the run (a cursor before it).
    """
    run = st.fold_run(None, (ev for ev in up_to(entries, at) if ev.run_id == run_id))
    if run is None:
        raise CursorError(f"run {run_id}: nothing of it is logged at or before {at}")
    return run


def read_state(log: EventLog, run_id: str, at: Position) -> st.RunState:
    """:func:`state_at` over the run's log in Redis, reading no entry past the position.

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
        return state_at(run_id, entries, at)
    except CursorError:
        if not log.run_exists(run_id):
            raise RunNotFoundError(f"no run {run_id!r} (expired while it was read)") from None
        raise


def cursors(log: EventLog, run_id: str, after: str = "-", limit: int | None = None) -> list[str]:
    """The entry ids of a run's log after ``after`` (at most ``limit``): the positions a slider moves
    over. Malformed entries, which the fold skips, are left out."""
    out: list[str] = []
    for entry_id, _ in log.read_run(run_id, after=after):
        out.append(entry_id)
        if limit is not None and len(out) >= limit:
            break
    return out


__all__ = [
    "Position",
    "cursors",
    "is_cursor",
    "parse_cursor",
    "parse_position",
    "read_state",
    "state_at",
    "up_to",
]
