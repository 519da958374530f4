"""The replicated write (nerv_cluster/replication.py, issue 17) against a scripted fake Redis: what it
sends, when it retries, what its caller gets."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from nerv_cluster import constants
from nerv_cluster.errors import ReplicationError
from nerv_cluster.replication import Replication


class FakePipe:
    def __init__(self, owner: FakeRedis) -> None:
        self.owner = owner
        self.commands: list[tuple[Any, ...]] = []

    def evalsha(self, sha: str, numkeys: int, *rest: Any) -> None:
        self.commands.append(("EVALSHA", sha, numkeys, *rest))

    def publish(self, channel: str, message: str) -> None:
        self.commands.append(("PUBLISH", channel, message))

    def execute_command(self, *args: Any) -> None:
        self.commands.append(args)

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        assert raise_on_error is False
        self.owner.sent.append(self.commands)
        return next(self.owner.replies)


class FakeRedis:
    """Answers each pipeline with the next scripted reply list."""

    def __init__(self, replies: list[list[Any]]) -> None:
        self.replies: Iterator[list[Any]] = iter(replies)
        self.sent: list[list[tuple[Any, ...]]] = []
        self.disconnects = 0
        self.loaded: list[str] = []
        outer = self

        class Pool:
            def disconnect(self, inuse_connections: bool = True) -> None:
                outer.disconnects += 1

        self.connection_pool = Pool()

    def pipeline(self, transaction: bool = True) -> FakePipe:
        assert transaction is False
        return FakePipe(self)

    def script_load(self, source: str) -> str:
        self.loaded.append(source)
        return "sha-2"


class FakeScript:
    def __init__(self, client: FakeRedis) -> None:
        self.registered_client = client
        self.sha = "sha-1"
        self.script = "return 1"


def test_one_round_trip_when_the_replicas_acknowledge() -> None:
    r = FakeRedis([["ok", 1]])
    assert Replication(1, 250).run(FakeScript(r), ["k"], ["a"]) == "ok"  # type: ignore[arg-type]
    (sent,) = r.sent
    assert sent == [("EVALSHA", "sha-1", 1, "k", "a"), ("WAIT", 1, 250)]
    assert r.disconnects == 0


def test_a_short_wait_reconnects_and_retries_with_a_probe_then_fails_loudly() -> None:
    r = FakeRedis([["ok", 0], ["ok", 0, 0], ["ok", 0, 0]])
    with pytest.raises(ReplicationError) as err:
        Replication(2, 100, tries=3).run(FakeScript(r), [], [])  # type: ignore[arg-type]
    assert (err.value.acked, err.value.wanted) == (0, 2)
    assert r.disconnects == 3
    assert [c[0] for c in r.sent[0]] == ["EVALSHA", "WAIT"]
    # a retry may find its first try done and write nothing: the probe makes its WAIT cover that try
    for retry in r.sent[1:]:
        assert retry[1] == ("PUBLISH", constants.REPLICATION_PROBE_CHANNEL, "")


def test_a_retry_that_finds_its_write_done_is_acknowledged_only_once_replicated() -> None:
    done = redis.ResponseError("RUN_EXISTS run x exists")
    r = FakeRedis([["ok", 0], [done, 0, 1]])
    with pytest.raises(redis.ResponseError, match="RUN_EXISTS"):
        Replication(1, 100).run(FakeScript(r), [], [])  # type: ignore[arg-type]
    # ...and a refusal with no replica behind it is a ReplicationError, not the script's answer
    r = FakeRedis([[done, 0], [done, 0, 0], [done, 0, 0]])
    with pytest.raises(ReplicationError):
        Replication(1, 100).run(FakeScript(r), [], [])  # type: ignore[arg-type]


def test_a_new_primary_without_the_script_gets_it_loaded() -> None:
    r = FakeRedis([[redis.exceptions.NoScriptError("NOSCRIPT"), 1], ["ok", 1]])
    script = FakeScript(r)
    assert Replication(1, 100).run(script, [], []) == "ok"  # type: ignore[arg-type]
    assert r.loaded == ["return 1"] and script.sha == "sha-2"
    assert r.sent[1][0][1] == "sha-2"


def test_off_by_default() -> None:
    assert not Replication().on and Replication(1).on
