"""One typed Python wrapper per Lua script in ``nerv_cluster/lua/``, naming its keys and arguments.

A script's fixed keys and arguments are declared once, here (``keys`` and ``args``); the wrapper's call
takes them by those names, and the script is registered with a prelude that binds each to a Lua local
of the same name (``local lease = KEYS[1]``). So the ``.lua`` body uses names, never the fixed
positions: a name the body uses that the wrapper does not declare is a Lua error on the first call
(Redis refuses undeclared globals), and ``tests/unit/test_scripts.py`` checks that every declared name
is used, that no fixed position is read by number, and that each call's parameters are the declared
names in order. Only the variable-length tail (per-event, per-attempt groups) is read by index, after
``NKEYS`` keys and ``NARGV`` arguments, which the prelude also defines.

All scripts run with EVALSHA (redis-py's ``Script`` reloads a script Redis forgot, after a restart or
a failover). A script marked ``replicated`` (its write must survive a failover) waits for replicas
after it runs when the :class:`~nerv_cluster.replication.Replication` policy asks for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from importlib import resources
from typing import Any, ClassVar

import redis

from nerv_cluster.replication import Replication


@cache
def lua_source(name: str) -> str:
    """The text of ``nerv_cluster/lua/<name>.lua`` as stored (without the prelude)."""
    return resources.files("nerv_cluster").joinpath("lua").joinpath(f"{name}.lua").read_text()


def prelude(keys: Sequence[str], args: Sequence[str]) -> str:
    """The Lua lines that bind the fixed keys and arguments to locals of their names (one line, so
    line numbers in Redis's error messages stay those of the file plus one)."""
    parts = [f"local {k} = KEYS[{i}]" for i, k in enumerate(keys, 1)]
    parts += [f"local {a} = ARGV[{i}]" for i, a in enumerate(args, 1)]
    parts.append(f"local NKEYS, NARGV = {len(keys)}, {len(args)}")
    return "; ".join(parts) + "\n"


class LuaScript:
    """A Lua script registered on one Redis client. Subclasses name the script file and its fixed keys
    and arguments, and define a typed ``__call__`` whose keyword parameters are those names in order."""

    name: ClassVar[str]
    keys: ClassVar[tuple[str, ...]] = ()
    args: ClassVar[tuple[str, ...]] = ()
    #: Its write is one whose loss would lose work: it waits for replicas when the policy says so.
    replicated: ClassVar[bool] = False

    def __init__(self, client: redis.Redis, replication: Replication | None = None) -> None:
        self.source = prelude(self.keys, self.args) + lua_source(self.name)
        self._script = client.register_script(self.source)
        self.replication = replication or Replication()

    def _run(
        self,
        keys: Sequence[Any],
        args: Sequence[Any],
        more_keys: Sequence[Any] = (),
        more_args: Sequence[Any] = (),
        client: Any = None,
    ) -> Any:
        """Run with the fixed ``keys`` and ``args`` (in declared order), then the variable tail."""
        if len(keys) != len(self.keys) or len(args) != len(self.args):
            got = f"got {len(keys)} and {len(args)}"
            raise TypeError(f"{self.name}.lua takes keys {self.keys} and args {self.args}, {got}")
        if client is None and self.replicated and self.replication.on:
            return self.replication.run(self._script, [*keys, *more_keys], [*args, *more_args])
        return self._script(keys=[*keys, *more_keys], args=[*args, *more_args], client=client)


class Submit(LuaScript):
    """Accept a new run atomically: register it, write its first event to its log and the feed,
    announce it. Raises ``RUN_EXISTS`` (a ResponseError) when the run's log already exists."""

    name = "submit"
    replicated = True
    keys = ("run_log", "feed", "active", "runs")
    args = ("run_id", "channel", "event", "submitted_at", "feed_maxlen")

    def __call__(
        self,
        *,
        run_log: str,
        feed: str,
        active: str,
        runs: str,
        run_id: str,
        channel: str,
        event: str,
        submitted_at: float,
        feed_maxlen: int,
    ) -> None:
        self._run([run_log, feed, active, runs], [run_id, channel, event, submitted_at, feed_maxlen])


class Append(LuaScript):
    """Append events of one run to its log and to the feed, and announce them; returns how many.

    Called in a pipeline (``EventLog.append``), which ends with the ``WAIT`` itself and is not retried on
    a short one: an append is not idempotent in the log (readers drop a repeated event by its id)."""

    name = "append"
    replicated = True
    keys = ("run_log", "feed")
    args = ("channel", "feed_maxlen")

    def __call__(
        self,
        *,
        run_log: str,
        feed: str,
        channel: str,
        feed_maxlen: int,
        events: Sequence[str],
        client: Any = None,
    ) -> Any:
        return self._run([run_log, feed], [channel, feed_maxlen], more_args=events, client=client)


class FencedAppend(LuaScript):
    """The scheduler's writes, only while ``token`` holds the lease: workers' events it transcribes
    (each outcome once) and the feed ``position`` they cover, then its own events to run logs, then the
    hand-offs (see ``EventLog.append_fenced``). ``LEASE_LOST`` (a ResponseError) otherwise; else one
    1/0 per hand-off. Applied once per call: the reply is kept under ``reply`` (a key of this call's
    own) for ``reply_ttl_ms``, and a resent call returns it without writing again."""

    name = "fenced_append"
    replicated = True
    keys = ("lease", "reply", "transcribed")
    args = ("token", "reply_ttl_ms", "n_transcripts", "position", "n_events")

    def __call__(
        self,
        *,
        lease: str,
        reply: str,
        transcribed: str,
        token: str,
        reply_ttl_ms: int,
        n_transcripts: int,
        position: str,
        n_events: int,
        tail_keys: Sequence[str],
        tail_args: Sequence[Any],
    ) -> list[Any]:
        fixed = [token, reply_ttl_ms, n_transcripts, position, n_events]
        return list(self._run([lease, reply, transcribed], fixed, tail_keys, tail_args))


class Start(LuaScript):
    """Record the outcomes of earlier attempts (each once), then claim attempts before running them,
    putting TASK_STARTED on the feed (never a run log: the scheduler transcribes it) for each this
    worker may run; one verdict per attempt: ``ok``, ``done``,
    ``busy``, ``poison``, or with ``batch`` (a packed batch claimed as a whole) ``strict``: claim this
    one alone before it runs."""

    name = "start"
    replicated = True
    keys = ("feed",)
    args = ("worker", "heartbeat_prefix", "max_takeovers", "n_outcomes", "batch")

    def __call__(
        self,
        *,
        feed: str,
        worker: str,
        heartbeat_prefix: str,
        max_takeovers: int,
        n_outcomes: int,
        batch: bool,
        tail_keys: Sequence[str],
        tail_args: Sequence[Any],
    ) -> list[Any]:
        fixed = [worker, heartbeat_prefix, max_takeovers, n_outcomes, "1" if batch else ""]
        return list(self._run([feed], fixed, tail_keys, tail_args))


class Finish(LuaScript):
    """Record attempts' outcomes, each once (the outcome slot, and the event on the feed with its claim
    token: the scheduler transcribes it); one 1/0 per attempt. With ``waiting`` (a flag key), set
    that flag to ``waiting_claim`` when the last outcome was recorded (the worker then waits for a
    hand-off with that claim)."""

    name = "finish"
    replicated = True
    keys = ("feed",)
    args = ("waiting", "waiting_claim", "waiting_ttl_ms")

    def __call__(
        self,
        *,
        feed: str,
        waiting: str,
        waiting_claim: str,
        waiting_ttl_ms: int,
        tail_keys: Sequence[str],
        tail_args: Sequence[Any],
    ) -> list[Any]:
        return list(self._run([feed], [waiting, waiting_claim, waiting_ttl_ms], tail_keys, tail_args))


class Lease(LuaScript):
    """Acquire or renew the scheduler lease; the token held afterwards, or None when not held. A new
    token is the epoch counter's next value and ``nonce``, a random part the caller made."""

    name = "lease"
    replicated = True
    keys = ("lease", "epoch")
    args = ("token", "ttl_ms", "renew_only", "nonce")

    def __call__(
        self, *, lease: str, epoch: str, token: str, ttl_ms: int, renew_only: bool, nonce: str
    ) -> Any:
        return self._run([lease, epoch], [token, ttl_ms, int(renew_only), nonce])


class Release(LuaScript):
    """Give the lease up, only if ``token`` holds it."""

    name = "release"
    keys = ("lease",)
    args = ("token",)

    def __call__(self, *, lease: str, token: str) -> None:
        self._run([lease], [token])


class Supersede(LuaScript):
    """Take the outcome slots of attempts the scheduler gives up on where they are free, fenced by the
    lease; per (key index, field) pair of the tail, what holds the slot afterwards (``value`` where the
    scheduler has it, else the outcome a worker recorded first)."""

    name = "supersede"
    replicated = True
    keys = ("lease",)
    args = ("token", "value")

    def __call__(
        self, *, lease: str, token: str, value: str, tail_keys: Sequence[str], tail_args: Sequence[Any]
    ) -> list[Any]:
        return list(self._run([lease], [token, value], tail_keys, tail_args))


class Checkpoint(LuaScript):
    """Store a run's checkpoint only while the run is open (its log exists without an expiry); True
    when stored."""

    name = "checkpoint"
    keys = ("run_log", "checkpoint")
    args = ("state",)

    def __call__(self, *, run_log: str, checkpoint: str, state: str) -> bool:
        return bool(self._run([run_log, checkpoint], [state]))


class Rerun(LuaScript):
    """Reopen a finished run and append its WORKFLOW_RERUN_REQUESTED (rerun number ``n``), only if its
    log still ends at entry ``expected`` and its rerun counter is ``n - 1``: ``RUN_GONE`` or
    ``RUN_MOVED`` (ResponseErrors) otherwise. With a ``token`` (the scheduler's), fenced by the lease:
    ``LEASE_LOST`` when it no longer holds it."""

    name = "rerun"
    replicated = True
    keys = ("run_log", "outcomes", "claims", "checkpoint", "reruns", "feed", "active", "lease")
    args = ("run_id", "channel", "event", "expected", "n", "feed_maxlen", "token")

    def __call__(
        self,
        *,
        run_log: str,
        outcomes: str,
        claims: str,
        checkpoint: str,
        reruns: str,
        feed: str,
        active: str,
        lease: str,
        run_id: str,
        channel: str,
        event: str,
        expected: str,
        n: int,
        feed_maxlen: int,
        token: str,
    ) -> None:
        self._run(
            [run_log, outcomes, claims, checkpoint, reruns, feed, active, lease],
            [run_id, channel, event, expected, n, feed_maxlen, token],
        )


class Close(LuaScript):
    """Close finished runs (out of the active set, keys expiring after ``retention`` seconds), each
    only if no rerun reopened it past the rerun number the caller folded; then trim the all-runs index
    below ``horizon``. One 1/0 per run: 1 when closed."""

    name = "close"
    keys = ("active", "runs")
    args = ("retention", "horizon")

    def __call__(
        self,
        *,
        active: str,
        runs: str,
        retention: int,
        horizon: float,
        tail_keys: Sequence[str],
        tail_args: Sequence[Any],
    ) -> list[Any]:
        return list(self._run([active, runs], [retention, horizon], tail_keys, tail_args))


class Resign(LuaScript):
    """A worker process stops waiting for a hand-off: None when nothing was handed, else the handed job
    (claimed for it already)."""

    name = "resign"
    keys = ("waiting", "handoff_list")

    def __call__(self, *, waiting: str, handoff_list: str) -> str | None:
        got = self._run([waiting, handoff_list], [])
        return None if got is None else str(got)


class CacheExchange(LuaScript):
    """The scheduler's cache round trip, fenced by the lease: store ``n_store`` entries (the first keys
    of the tail; per entry the value, its TTL in ms and an NX flag), then read the rest of the tail's
    keys; their values (None where absent). ``LEASE_LOST`` (a ResponseError) when ``token`` does not hold
    the lease."""

    name = "cache"
    keys = ("lease",)
    args = ("token", "n_store")

    def __call__(
        self, *, lease: str, token: str, n_store: int, tail_keys: Sequence[str], tail_args: Sequence[Any]
    ) -> list[Any]:
        return list(self._run([lease], [token, n_store], tail_keys, tail_args))


class Spawn(LuaScript):
    """Create child runs (fenced by the lease), each at most once per parent attempt, with CHILD_STARTED
    in the parent's log in the same step; per spawn ``created``, ``done`` (by an earlier call) or
    ``taken`` (the child's run id is another run's). ``LEASE_LOST`` (a ResponseError) when not leader."""

    name = "spawn"
    replicated = True
    keys = ("lease", "active", "runs")
    args = ("token",)

    def __call__(
        self,
        *,
        lease: str,
        active: str,
        runs: str,
        token: str,
        tail_keys: Sequence[str],
        tail_args: Sequence[Any],
    ) -> list[Any]:
        return list(self._run([lease, active, runs], [token], tail_keys, tail_args))


class ScheduleFire(LuaScript):
    """Fire schedule slots (fenced by the lease): per fire the run's submission unless a run of that id
    exists, with SCHEDULE_FIRED in the schedules stream in the same step, then the notes; per fire 1
    (created) or 0 (existed). ``LEASE_LOST`` (a ResponseError) when not leader."""

    name = "schedule_fire"
    replicated = True
    keys = ("lease", "schedules", "active", "runs")
    args = ("token", "n_fires")

    def __call__(
        self,
        *,
        lease: str,
        schedules: str,
        active: str,
        runs: str,
        token: str,
        n_fires: int,
        tail_keys: Sequence[str],
        tail_args: Sequence[Any],
    ) -> list[Any]:
        return list(self._run([lease, schedules, active, runs], [token, n_fires], tail_keys, tail_args))


class SchedulesCompact(LuaScript):
    """Replace the schedules stream by a snapshot (fenced), only if it still ends at ``last_id``;
    1 when compacted, 0 when the stream moved. ``LEASE_LOST`` (a ResponseError) when not leader."""

    name = "schedules_compact"
    keys = ("lease", "schedules")
    args = ("token", "last_id", "snapshot")

    def __call__(self, *, lease: str, schedules: str, token: str, last_id: str, snapshot: str) -> Any:
        return self._run([lease, schedules], [token, last_id, snapshot])


class Intake(LuaScript):
    """Apply one client request (issue 13), fenced by the lease and once per request id, and answer it
    in the same step: ``op`` ``none``, ``submit``, ``append`` or ``rerun`` with its keys and arguments in
    the tail (see ``intake.lua``), then the answer pushed onto ``reply``, kept under ``done``, and the
    intake trimmed below ``trim_to``. Returns ``[status, answer]``; ``LEASE_LOST`` (a ResponseError)
    when ``token`` does not hold the lease."""

    name = "intake"
    replicated = True
    keys = ("lease", "intake", "done", "reply")
    args = ("token", "trim_to", "reply_ttl_ms", "done_ttl_ms", "op", "answer", "other_answer")

    def __call__(
        self,
        *,
        lease: str,
        intake: str,
        done: str,
        reply: str,
        token: str,
        trim_to: str,
        reply_ttl_ms: int,
        done_ttl_ms: int,
        op: str,
        answer: str,
        other_answer: str,
        tail_keys: Sequence[str] = (),
        tail_args: Sequence[Any] = (),
    ) -> list[Any]:
        fixed = [token, trim_to, reply_ttl_ms, done_ttl_ms, op, answer, other_answer]
        return list(self._run([lease, intake, done, reply], fixed, tail_keys, tail_args))


#: Every wrapper, one per ``.lua`` file.
ALL: tuple[type[LuaScript], ...] = (
    Submit,
    Append,
    FencedAppend,
    Start,
    Finish,
    Lease,
    Release,
    Supersede,
    Checkpoint,
    Resign,
    # rerun (issue 16)
    Rerun,
    Close,
    CacheExchange,
    Spawn,
    # idem (issue 11): schedules
    ScheduleFire,
    SchedulesCompact,
    # issue 13: the intake
    Intake,
)


class Scripts:
    """Every script, registered on one Redis client (the event log's)."""

    def __init__(self, client: redis.Redis, replication: Replication | None = None) -> None:
        self.replication = r = replication or Replication()
        self.submit = Submit(client, r)
        self.append = Append(client, r)
        self.fenced_append = FencedAppend(client, r)
        self.start = Start(client, r)
        self.finish = Finish(client, r)
        self.lease = Lease(client, r)
        self.release = Release(client, r)
        self.supersede = Supersede(client, r)
        self.checkpoint = Checkpoint(client, r)
        # rerun (issue 16)
        self.rerun = Rerun(client, r)
        self.close = Close(client, r)
        self.spawn = Spawn(client, r)
        # idem (issue 11): schedules
        self.schedule_fire = ScheduleFire(client, r)
        self.schedules_compact = SchedulesCompact(client, r)
        # issue 13: the intake
        self.intake = Intake(client, r)
