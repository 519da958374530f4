"""Workers' events: what a worker may write, the claim tokens that bind it to its attempts, and the
check the scheduler makes before it transcribes a worker's event into a run's log (pure, no Redis).

Workers write only their attempts' claims and outcomes (``start.lua``, ``finish.lua``) and put the
events on the feed; only the scheduler writes run logs (design.md §12). A feed entry of a worker type
is folded, and transcribed into its run's log in the scheduler's next fenced write, only when:

- its run is one the scheduler runs and its task is in that run;
- it carries the claim token of its attempt: ``HMAC-SHA256(secret, run, task, attempt)`` under a secret
  only the scheduler reads, handed to the worker inside the (signed) job, so a worker cannot make the
  token of an attempt it was not given;
- an outcome also presents its claim's nonce: the process that claims an attempt makes a random nonce
  and its TASK_STARTED names only the nonce's hash (``claim``, folded into ``TaskState.claim``), so
  the outcome of a started attempt is taken only from the process that started it. The token alone is
  no proof: every worker can read the queues (and the feed) that carry it. A handed job's claim comes
  from the waiting worker's outcome before it (``handoff_claim``), so its nonce, too, never leaves
  that process;
- a TASK_STARTED of an attempt another process runs (a takeover) is taken only when that process's
  heartbeat is gone: a live holder's attempt cannot be claimed away from it;
- its attempt was dispatched: it is the task's current attempt and the task was sent (an earlier
  attempt's event is stale, a later one's was never dispatched);
- it is no duplicate: a second outcome of an attempt, or a TASK_STARTED of an attempt that same
  worker already runs.

Anything else is dropped, with one warning per entry, and never stops the scheduler. A rerun's request
(``CLIENT_TYPES``: the scheduler's own rerun of a child run) goes on to be taken back from its log; any
other type on the feed (a submission, a cancel, a signal: clients ask through the intake; a run's
outcome, a dispatch: the scheduler's own events, which it never puts there) is a forgery and is
dropped.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from typing import Any

from nerv_cluster import state as st
from nerv_cluster.constants import CLAIM_KEY, CREDENTIAL_SEP
from nerv_cluster.model import Event, EventType, TaskStatus
from nerv_cluster.signing import set_once

#: The events a worker writes, about its own attempt.
WORKER_TYPES = frozenset(
    {
        EventType.TASK_STARTED,
        EventType.TASK_COMPLETED,
        EventType.TASK_FAILED,
        EventType.TASK_RETRYING,
        EventType.TASK_SPAWNED,
    }
)
#: A worker's events that end its attempt (each attempt has at most one).
OUTCOME_TYPES = WORKER_TYPES - {EventType.TASK_STARTED}
#: The one type the feed carries that no worker writes: a rerun's request, which ``rerun.lua`` puts
#: there when the scheduler itself reruns a child run for its parent. It is never folded from the feed:
#: the run is taken back from its log (``scheduler.reruns.take_back``), so a forged one costs a refold
#: and changes nothing. Clients write nothing to the feed (they ask through the intake, issue 13): a
#: submission, cancel, signal, limit or schedule event found there is a forgery, dropped like others.
CLIENT_TYPES = frozenset({EventType.WORKFLOW_RERUN_REQUESTED})
#: Bytes of the claim secret, and of a token (128 bits: not to be guessed).
SECRET_BYTES = 32
TOKEN_BYTES = 16
#: Bytes of a claim's nonce; its claim (the hash named by TASK_STARTED) is ``CLAIM_CHARS`` hex digits.
NONCE_BYTES = 16
CLAIM_CHARS = 32
_HEX = frozenset("0123456789abcdef")


def new_nonce() -> str:
    """A fresh claim nonce (kept in the claiming process's memory only)."""
    return secrets.token_hex(NONCE_BYTES)


def claim_of(nonce: str) -> str:
    """The claim a TASK_STARTED names for ``nonce``: its SHA-256, shortened (128 bits)."""
    return hashlib.sha256(nonce.encode()).hexdigest()[:CLAIM_CHARS]


def is_claim(value: object) -> bool:
    """Whether ``value`` is a well-formed claim (as :func:`claim_of` makes them)."""
    return isinstance(value, str) and len(value) == CLAIM_CHARS and _HEX.issuperset(value)


def credential(token: str, nonce: str) -> str:
    """What a worker's feed entry carries in its token field: the token, and the nonce for an outcome."""
    return f"{token}{CREDENTIAL_SEP}{nonce}" if nonce else token


def split_credential(value: str) -> tuple[str, str]:
    """The token and the nonce ('' when none) of a feed entry's token field."""
    token, _, nonce = value.partition(CREDENTIAL_SEP)
    return token, nonce


class AttemptTokens:
    """Mints and checks claim tokens under the scheduler's secret."""

    __slots__ = ("_secret",)

    def __init__(self, secret: bytes) -> None:
        if not secret:
            raise ValueError("the claim secret must not be empty")
        self._secret = secret

    def mint(self, run_id: str, task_id: str, attempt: int) -> str:
        """The token of one attempt (the NUL separators keep ``a:b`` + ``c`` apart from ``a`` + ``b:c``)."""
        msg = f"{run_id}\0{task_id}\0{attempt}".encode()
        return hmac.digest(self._secret, msg, "sha256")[:TOKEN_BYTES].hex()

    def valid(self, run_id: str, task_id: str, attempt: int, token: str) -> bool:
        """Whether ``token`` is that attempt's (compared in constant time)."""
        return hmac.compare_digest(self.mint(run_id, task_id, attempt), token)


def claim_secret(client: Any, key: str) -> bytes:
    """The cluster's claim secret: created by the first leader (``SET NX``), read by every later one,
    so tokens minted by one leader hold under the next (one round trip, when a term begins)."""
    return set_once(client, key, secrets.token_hex(SECRET_BYTES))


def no_heartbeats(worker: str) -> bool:
    """The ``alive`` of a check that sees no heartbeats (every takeover is taken: tests, replays)."""
    return False


def check(
    state: st.State,
    ev: Event,
    presented: str,
    tokens: AttemptTokens,
    alive: Callable[[str], bool] = no_heartbeats,
) -> str | None:
    """Why the worker's event ``ev`` (of a type in ``WORKER_TYPES``) presenting ``presented`` (its feed
    entry's token field: :func:`credential`) must not be transcribed, or None when it may; ``state`` is
    the fold up to the entry before it. ``alive(worker)``: whether that worker process's heartbeat is
    there (asked only for a takeover). ``"duplicate"`` names a copy of an event already folded (a resent
    script call writes one): no forgery, no warning."""
    run = state.runs.get(ev.run_id)
    if run is None:
        return "its run is not one the scheduler runs"
    task_id, attempt = ev.task_id, ev.attempt
    if task_id is None or attempt is None:
        return "it names no attempt"
    ts = run.tasks.get(task_id)
    if ts is None:
        return f"its run has no task {task_id!r}"
    token, nonce = split_credential(presented)
    if not token or not tokens.valid(ev.run_id, task_id, attempt, token):
        return f"it presents no valid claim token for attempt {attempt} of {task_id!r}"
    if attempt > ts.attempt or (attempt == ts.attempt and not ts.dispatched):
        return f"attempt {attempt} of {task_id!r} was never dispatched"
    if attempt < ts.attempt:
        return f"attempt {attempt} of {task_id!r} is over (the task is at attempt {ts.attempt})"
    if ev.type is EventType.TASK_STARTED:
        if not is_claim(ev.data.get(CLAIM_KEY)):
            return f"its start of attempt {attempt} of {task_id!r} names no claim"
        if ts.status is TaskStatus.RUNNING and ts.worker == ev.data.get("worker"):
            return "duplicate"
        if ts.status not in (TaskStatus.READY, TaskStatus.RUNNING):
            return f"attempt {attempt} of {task_id!r} is over ({ts.status.value})"
        if ts.status is TaskStatus.RUNNING and ts.worker and alive(ts.worker):
            return f"attempt {attempt} of {task_id!r} is running on {ts.worker}, which is alive"
        return None
    if ts.status not in (TaskStatus.READY, TaskStatus.RUNNING) or ts.spawn is not None or ts.child:
        return f"attempt {attempt} of {task_id!r} has its outcome already ({ts.status.value})"
    if ts.status is not TaskStatus.RUNNING:
        return f"attempt {attempt} of {task_id!r} was never started"
    # A start logged before claims existed names none: its token is all there is to check.
    if ts.claim is not None and not hmac.compare_digest(claim_of(nonce), ts.claim):
        return f"it presents no nonce of the claim on attempt {attempt} of {task_id!r}"
    return None
