"""Workers' events into run logs: check each one the feed brings, fold the valid ones, and transcribe
them into their runs' logs in the scheduler's next fenced write (see :mod:`nerv_cluster.outcomes`).

Invariants:

- only valid worker events are folded and logged; an invalid one (a type no worker writes, an unknown
  run, a bad claim token, an attempt never dispatched, a second outcome) is dropped with one warning;
- transcripts go first in the fenced write that follows their read, before any decision made since,
  so a log reads cause before effect, and a decision is never logged without the events it follows;
- every fenced write that carries transcripts also records the feed position they cover (``position``)
  and carries *all* transcripts pending, so every worker event up to the recorded position is in its
  log, and a new leader that reads the feed after it (:mod:`scheduler.takeover`) finds every
  outcome not yet transcribed: an acknowledged outcome survives a leader's death;
- the feed is trimmed only up to the recorded position (:attr:`Transcriber.written`).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

from nerv_cluster import outcomes
from nerv_cluster import state as st
from nerv_cluster.eventlog import Batch, attempt_field
from nerv_cluster.model import Event, EventType

log = logging.getLogger("nerv.scheduler")

#: Feed entries already warned about (bounded): one warning per entry, even when read again.
_WARNED_MAX = 10_000

#: One transcript: run id, attempt field of an outcome ('' for a TASK_STARTED), event JSON as stored.
Transcript = tuple[str, str, str]


class Transcriber:
    """The feed's worker events checked against the fold, and the transcripts not yet written."""

    def __init__(self) -> None:
        self.tokens: outcomes.AttemptTokens | None = None
        self._pending: list[Transcript] = []
        #: The feed entry every event up to which has been dealt with (transcribed, passed or dropped).
        self.position = ""
        #: The position last recorded in Redis (by a fenced write), or found there by a takeover.
        self.written = ""
        self._warned: OrderedDict[str, None] = OrderedDict()
        self._alive: Callable[[str], bool] = outcomes.no_heartbeats

    def begin(
        self,
        tokens: outcomes.AttemptTokens,
        position: str,
        alive: Callable[[str], bool] = outcomes.no_heartbeats,
    ) -> None:
        """A term starts: tokens under the cluster's claim secret, the feed read after ``position``;
        ``alive(worker)`` tells whether a worker process's heartbeat is there (for takeovers)."""
        self.tokens = tokens
        self._alive = alive
        self._pending.clear()
        self.position = self.written = position

    def clear(self) -> None:
        """The term ended: forget what is pending (the next leader reads the feed again)."""
        self.tokens = None
        self._pending.clear()

    def admit(self, entry_id: str, ev: Event, batch: Batch, state: st.State) -> bool:
        """Whether to fold feed entry ``ev``; a valid worker event is also queued for transcription.
        ``state``: the fold up to the entry before it."""
        kind = ev.type
        if kind in outcomes.WORKER_TYPES:
            assert self.tokens is not None, "admit() before begin()"
            sealed = batch.sealed.get(entry_id)
            why = outcomes.check(state, ev, sealed[1] if sealed else "", self.tokens, self._alive)
            if why is None:
                assert sealed is not None  # check() refuses an entry without a token
                field = attempt_field(str(ev.task_id), int(ev.attempt or 0))
                self._pending.append((ev.run_id, "" if kind is EventType.TASK_STARTED else field, sealed[0]))
                return True
            if why != "duplicate":
                self._warn(entry_id, ev, why)
            return False
        if kind in outcomes.CLIENT_TYPES:
            return True
        self._warn(entry_id, ev, f"{kind.value} is not written to the feed by workers or clients")
        return False

    def read_upto(self, entry_id: str) -> None:
        """Every feed entry up to ``entry_id`` has been admitted or dropped."""
        self.position = entry_id

    def take(self) -> tuple[list[Transcript], str]:
        """What the next fenced write carries: every pending transcript, and the position to record
        ('' when it is recorded already). Handed over once: a write that fails leaves the term to end
        (a lost lease) or the state to be refolded from the recorded position (a Redis error)."""
        pending, self._pending = self._pending, []
        position = self.position if self.position != self.written else ""
        return pending, position

    def wrote(self, position: str) -> None:
        """A fenced write recorded ``position`` (called after it succeeded)."""
        if position:
            self.written = position

    @property
    def pending(self) -> bool:
        """True while transcripts wait for a write."""
        return bool(self._pending)

    def _warn(self, entry_id: str, ev: Event, why: str) -> None:
        if entry_id in self._warned:
            return
        self._warned[entry_id] = None
        if len(self._warned) > _WARNED_MAX:
            self._warned.popitem(last=False)
        log.warning(
            "dropped feed entry %s (%s of run %r, task %r, attempt %s, source %r): %s",
            entry_id,
            ev.type.value,
            ev.run_id,
            ev.task_id,
            ev.attempt,
            ev.source,
            why,
        )
