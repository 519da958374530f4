"""Acknowledged means replicated: the writes whose loss would lose work wait for replicas.

Invariant: with ``NERV_REDIS_MIN_REPLICAS=n`` (n > 0), a Lua script marked ``replicated`` (an accepted
submission, a claim or a recorded outcome, a scheduler decision, the lease) returns to its caller
only after ``WAIT n timeout`` on the same connection says ``n`` replicas hold everything that
connection wrote; otherwise the caller gets :class:`~nerv_cluster.errors.ReplicationError`, never a
success. So a failover to one of those replicas loses no write anyone was told had happened.

Why ``WAIT`` after the write, not ``min-replicas-to-write`` on the primary: ``min-replicas-to-write``
only refuses writes while fewer replicas are *connected* (with a lag under ``min-replicas-max-lag``
seconds); a write it accepts is still acknowledged before any replica has it, so the last
acknowledged writes before a crash can be lost. ``WAIT`` ties the acknowledgement to the replicas'
own offsets. The deploy files also set ``min-replicas-to-write 1`` as a second line against split
brain (a primary cut off from its replicas stops accepting writes after ``min-replicas-max-lag``).

The script and its ``WAIT`` travel in one pipeline (one round trip, one connection: ``WAIT`` counts
that connection's writes). A short ``WAIT`` is retried (``REPLICATION_TRIES``) after dropping the
pool's connections, so a process still talking to a demoted or cut-off primary asks Sentinel again;
every replicated script is idempotent (it checks before it writes, or answers a resend from its first
execution), so the retry of a write that did land changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.commands.core import Script

from nerv_cluster import constants
from nerv_cluster.errors import ReplicationError

log = logging.getLogger("nerv.replication")


@dataclass(frozen=True, slots=True)
class Replication:
    """How many replicas a replicated write needs (0: none, no ``WAIT``) and how long it waits."""

    min_replicas: int = 0
    timeout_ms: int = constants.DEFAULT_REPLICA_TIMEOUT_MS
    tries: int = constants.REPLICATION_TRIES
    #: The namespace's probe channel (``Keys.replication_probe``): its ACL users may publish there.
    probe_channel: str = constants.REPLICATION_PROBE_CHANNEL

    @classmethod
    def of(cls, settings: Any) -> Replication:
        """The policy the settings ask for."""
        return cls(
            settings.redis_min_replicas,
            settings.redis_replica_timeout_ms,
            probe_channel=constants.Keys(settings.prefix).replication_probe,
        )

    @property
    def on(self) -> bool:
        """True when writes wait for replicas."""
        return self.min_replicas > 0

    def shortfall(self, client: Any, acked: int) -> ReplicationError:
        """The error for a ``WAIT`` that saw ``acked`` replicas; drops the client's idle and in-use
        connections so the next command connects afresh (through Sentinel, to the primary in force)."""
        _reconnect(client)
        return ReplicationError(
            f"write not replicated: {acked} of {self.min_replicas} replicas acknowledged it within "
            f"{self.timeout_ms} ms (a replica down, or this primary cut off from them); not acknowledged, "
            "retry it",
            acked=acked,
            wanted=self.min_replicas,
        )

    def run(self, script: Script, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """Run ``script`` then ``WAIT`` in one pipeline; its reply once replicated, else (after
        ``tries`` tries) :class:`ReplicationError`. Errors the script raises reach the caller as they
        would without replication, once what they were decided on is replicated too."""
        client: Any = script.registered_client
        error: ReplicationError | None = None
        for attempt in range(self.tries):
            reply, acked = self._once(client, script, keys, args, probe=attempt > 0)
            if acked >= self.min_replicas:
                if isinstance(reply, redis.ResponseError):
                    raise reply  # the script refused (no lease, a clash): it wrote nothing
                return reply
            error = self.shortfall(client, acked)
            log.warning("%s; reconnecting and retrying", error)
        assert error is not None
        raise error

    def _once(
        self, client: Any, script: Script, keys: Sequence[Any], args: Sequence[Any], probe: bool
    ) -> tuple[Any, int]:
        for _ in range(2):
            pipe = client.pipeline(transaction=False)
            pipe.evalsha(script.sha, len(keys), *keys, *args)
            if probe:
                # A retry may find its first try's write done and write nothing itself ("already
                # recorded"), and WAIT counts only this connection's writes: a write of no consequence
                # (a publish is replicated) makes the WAIT cover everything the primary holds so far,
                # the first try included.
                pipe.publish(self.probe_channel, "")
            pipe.execute_command("WAIT", self.min_replicas, self.timeout_ms)
            replies = pipe.execute(raise_on_error=False)
            reply, acked = replies[0], replies[-1]
            if isinstance(reply, redis.exceptions.NoScriptError):
                # A new primary (after a failover or a restart) has not seen the script: load it there.
                script.sha = client.script_load(script.script)
                continue
            if isinstance(acked, Exception):
                raise acked
            return reply, int(acked)
        raise redis.ResponseError(f"NOSCRIPT twice for script {script.sha}")

    def confirm(self, client: Any) -> None:
        """Wait until replicas hold everything the primary holds now: a client told by the scheduler
        that its request was applied (the scheduler's script WAITs too, but its answer is visible before
        that WAIT returns). A probe publish makes this connection's offset the primary's, so the WAIT
        covers the scheduler's write; :class:`ReplicationError` when it is short."""
        pipe = client.pipeline(transaction=False)
        pipe.publish(constants.REPLICATION_PROBE_CHANNEL, "")
        pipe.execute_command("WAIT", self.min_replicas, self.timeout_ms)
        self.wait(client, pipe.execute()[-1])

    def wait(self, client: Any, acked: Any) -> None:
        """Check the reply of a ``WAIT`` queued at the end of a pipeline (writes batched by the
        caller, e.g. :meth:`EventLog.append`): :class:`ReplicationError` when it is short."""
        if int(acked) < self.min_replicas:
            raise self.shortfall(client, int(acked))


def _reconnect(client: Any) -> None:
    """Drop every connection of ``client``'s pool (in use ones are dropped when given back)."""
    try:
        client.connection_pool.disconnect(inuse_connections=True)
    except Exception as exc:  # best effort: the next command reconnects anyway on a dead socket
        log.debug("could not drop connections: %s", exc)
