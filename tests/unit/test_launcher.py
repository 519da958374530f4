"""The launcher's pure parts: reading a process's state, parent and group from ``/proc/<pid>/stat``."""

from __future__ import annotations

from nerv_cluster.launcher import parse_stat


def test_parse_stat_reads_state_parent_and_group() -> None:
    raw = "4242 (python3.11) S 4200 4242 4242 0 -1 4194560 1234 0 0 0 5 1 0 0 20 0 3 0 99 0 0\n"
    assert parse_stat(raw) == ("S", 4200, 4242)


def test_parse_stat_survives_a_command_name_with_spaces_and_parentheses() -> None:
    # A process may name itself anything (prctl PR_SET_NAME): ``celery (pool) x`` must not shift fields.
    raw = "77 (celery (pool) x) Z 1 70 70 0 -1 4227084 0 0 0 0 0 0 0 0 20 0 1 0 5 0 0\n"
    assert parse_stat(raw) == ("Z", 1, 70)
