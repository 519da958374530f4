"""Time travel (nerv_cluster/history.py): positions and the fold of a prefix of a run's log, no Redis."""

from __future__ import annotations

import pytest

from nerv_cluster import history
from nerv_cluster.errors import CursorError
from nerv_cluster.eventlog import Entry
from nerv_cluster.model import Event, EventType, RunStatus, TaskStatus
from nerv_cluster.state import fold_run
from tests.unit.helpers import RUN, completes, diamond, ev, submitted


def _log(events: list[Event]) -> list[Entry]:
    """Entries as a stream would hold them: increasing ids, two per millisecond."""
    return [(f"{1_000 + i // 2}-{i % 2}", e) for i, e in enumerate(events)]


def _diamond_log() -> list[Entry]:
    events = [submitted(diamond()), ev(EventType.WORKFLOW_STARTED)]
    for tid in "abcd":
        events += completes(tid, result=tid)
    events.append(ev(EventType.WORKFLOW_COMPLETED))
    return _log(events)


def test_cursors_parse_and_compare_as_numbers_not_text() -> None:
    assert history.parse_cursor("1733059200000-3") == (1733059200000, 3)
    # As text "999-10" < "999-9"; as entry ids 999-9 comes first.
    assert history.parse_cursor("999-9") < history.parse_cursor("999-10")
    for bad in ("", "12", "a-1", "1-", "-1", "1-2-3", "1 -2"):
        with pytest.raises(CursorError):
            history.parse_cursor(bad)


def test_positions_are_cursors_or_counts_of_one_or_more() -> None:
    assert history.parse_position("1000-0") == "1000-0"
    assert history.parse_position("7") == 7
    assert history.parse_position(3) == 3
    for bad in ("0", 0, -1, "x", "1.5", True):
        with pytest.raises(CursorError):
            history.parse_position(bad)  # type: ignore[arg-type]


def test_state_at_every_position_is_the_fold_of_that_prefix() -> None:
    log = _diamond_log()
    for n in range(1, len(log) + 1):
        want = fold_run(None, [e for _, e in log[:n]])
        by_count = history.state_at(RUN, log, n)
        by_cursor = history.state_at(RUN, log, log[n - 1][0])
        assert by_count == want
        assert by_cursor == want


def test_state_at_shows_earlier_states() -> None:
    log = _diamond_log()
    first = history.state_at(RUN, log, 1)
    assert first.status is RunStatus.PENDING
    assert first.tasks["a"].status is TaskStatus.READY  # a root is ready from the submission on
    assert first.tasks["d"].status is TaskStatus.PENDING
    # After a's three events (submit, start, 3 of a): a COMPLETED, d not.
    mid = history.state_at(RUN, log, 5)
    assert mid.tasks["a"].status is TaskStatus.COMPLETED
    assert mid.tasks["d"].status is not TaskStatus.COMPLETED
    last = history.state_at(RUN, log, len(log) + 100)  # past the end: the state now
    assert last.status is RunStatus.COMPLETED


def test_a_cursor_between_entries_takes_the_entries_before_it() -> None:
    log = _diamond_log()
    # "1002-5" is no entry of the log: entries up to 1002-1 (the first 6) count.
    assert history.state_at(RUN, log, "1002-5") == history.state_at(RUN, log, 6)


def test_a_cursor_before_the_submission_names_no_state() -> None:
    with pytest.raises(CursorError):
        history.state_at(RUN, _diamond_log(), "999-0")


def test_up_to_reads_no_further_than_the_position() -> None:
    read: list[str] = []

    def lazily() -> object:
        for entry in _diamond_log():
            read.append(entry[0])
            yield entry

    assert len(list(history.up_to(lazily(), 3))) == 3  # type: ignore[arg-type]
    assert len(read) == 3
    read.clear()
    assert len(list(history.up_to(lazily(), "1001-0"))) == 3  # type: ignore[arg-type]
    assert len(read) == 4  # the first entry past the cursor is where it stops


def test_events_read_from_a_stream_carry_their_cursor() -> None:
    from nerv_cluster.eventlog import _decode

    e = ev(EventType.WORKFLOW_STARTED)
    batch = _decode([("1700-4", {"e": e.to_json()})])
    assert batch[0][1].cursor == "1700-4"
    assert batch[0][1] == e  # the cursor is no part of the event's identity
    assert "cursor" not in e.to_json()


def test_a_point_names_its_last_event_and_its_count() -> None:
    log = _diamond_log()
    by_cursor = history.point_at(RUN, log, log[6][0])
    assert by_cursor.events == 7 and by_cursor.event is log[6][1]
    by_count = history.point_at(RUN, log, 7)
    assert by_count == by_cursor
    assert history.point_at(RUN, log, 10_000).events == len(log)
