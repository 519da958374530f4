"""Signed jobs, claim tokens and the check of workers' feed events (pure: no Redis)."""

from __future__ import annotations

import json

import pytest

from nerv_cluster import outcomes
from nerv_cluster.errors import JobSignatureError, MalformedJobError
from nerv_cluster.eventlog import Batch, _decode
from nerv_cluster.jobs import Job
from nerv_cluster.model import Event, EventType
from nerv_cluster.signing import SIGNATURE_CHARS, Signer, claimed_id
from nerv_cluster.state import fold
from scheduler.handoff_match import HandoffMatcher
from scheduler.transcribe import Transcriber
from tests.unit.helpers import RUN, completes, ev, submitted, td, wdef

E = EventType
TOKENS = outcomes.AttemptTokens(b"the scheduler's secret")
SIGNER = Signer(b"the cluster's signing key")


def _job(**kw: object) -> Job:
    base: dict[str, object] = {
        "run_id": RUN,
        "task_id": "a",
        "attempt": 1,
        "fn": "t.add",
        "args": [1, 2],
        "kwargs": {"k": "v"},
    }
    return Job(**{**base, **kw})  # type: ignore[arg-type]


# -- signing ------------------------------------------------------------------------------------------


def test_a_signed_job_opens_to_the_same_job_with_its_token() -> None:
    job = _job(timeout=3.0, handoff=True, first=2)
    wire = job.to_wire(SIGNER, "t0k")
    back = Job.from_wire(wire, SIGNER)
    assert back == job and back.token == "t0k"
    assert len(wire) > SIGNATURE_CHARS and json.loads(wire[SIGNATURE_CHARS:])["tok"] == "t0k"


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ('"args":[1,2]', '"args":[1,3]'),
        ('"fn":"t.add"', '"fn":"t.rm"'),
        ('"kwargs":{"k":"v"}', '"kwargs":{"k":"w"}'),
        ('"a":1', '"a":2'),
        ('"k":"a"', '"k":"b"'),
        ('"tok":"t0k"', '"tok":"t1k"'),
        ('"t":3.0', '"t":300.0'),
    ],
)
def test_any_change_to_what_a_worker_acts_on_breaks_the_signature(old: str, new: str) -> None:
    wire = _job(timeout=3.0).to_wire(SIGNER, "t0k")
    assert old in wire
    with pytest.raises(JobSignatureError, match="does not match"):
        Job.from_wire(wire.replace(old, new), SIGNER)


def test_unsigned_foreign_key_and_non_string_messages_are_refused() -> None:
    body = json.dumps(_job().to_dict())
    for bad in (body, {"r": RUN}, None, "", "0" * SIGNATURE_CHARS):
        with pytest.raises(JobSignatureError):
            Job.from_wire(bad, SIGNER)
    with pytest.raises(JobSignatureError, match="does not match"):
        Job.from_wire(Signer(b"another key").seal(body), SIGNER)
    with pytest.raises(ValueError):
        Signer(b"")


def test_a_refused_message_is_named_by_its_claimed_id_only() -> None:
    wire = _job().to_wire(SIGNER, "t0k")
    assert claimed_id(wire) == f"{RUN}:a:1"
    assert claimed_id(json.dumps(_job().to_dict())) == f"{RUN}:a:1"
    assert claimed_id(_job().to_dict()) == f"{RUN}:a:1"
    assert claimed_id({"r": 1}) == "?" and claimed_id("garbage") == "?" and claimed_id(3) == "<int>"


# -- tokens -------------------------------------------------------------------------------------------


def test_tokens_bind_run_task_and_attempt_and_need_the_secret() -> None:
    tok = TOKENS.mint(RUN, "a", 1)
    assert len(tok) == 2 * outcomes.TOKEN_BYTES and tok == TOKENS.mint(RUN, "a", 1)
    assert TOKENS.valid(RUN, "a", 1, tok)
    for other in ((RUN, "a", 2), (RUN, "b", 1), ("run-2", "a", 1), (RUN + "\0a", "", 1)):
        assert not TOKENS.valid(*other, tok)  # type: ignore[arg-type]
    assert not outcomes.AttemptTokens(b"a guess").valid(RUN, "a", 1, tok)
    assert not TOKENS.valid(RUN, "a", 1, "")
    # The separators keep ids that would run together apart.
    assert TOKENS.mint("r:a", "b", 1) != TOKENS.mint("r", "a:b", 1)


# -- the check of a worker's event ---------------------------------------------------------------------


def _state(*events: Event):  # type: ignore[no-untyped-def]
    return fold([submitted(wdef(td("a"), td("b", "a"))), ev(E.WORKFLOW_STARTED), *events])


NONCE = outcomes.new_nonce()
CLAIM = outcomes.claim_of(NONCE)


def _check(
    state,
    kind: EventType,
    task: str = "a",
    attempt: int = 1,
    token: str | None = None,
    nonce: str = NONCE,
    alive=outcomes.no_heartbeats,
    **data,
):  # type: ignore[no-untyped-def]
    tok = TOKENS.mint(RUN, task, attempt) if token is None else token
    if kind is E.TASK_STARTED:
        data.setdefault("claim", CLAIM)
    presented = f"{tok}.{nonce}" if nonce and kind is not E.TASK_STARTED else tok
    return outcomes.check(state, ev(kind, task, attempt, **data), presented, TOKENS, alive)


def test_a_dispatched_attempts_own_events_pass() -> None:
    sent = _state(ev(E.TASK_DISPATCHED, "a", 1, queue="cpu"))
    assert _check(sent, E.TASK_STARTED, worker="w1") is None
    running = fold([ev(E.TASK_STARTED, "a", 1, worker="w1", claim=CLAIM)], sent)
    assert running.runs[RUN].tasks["a"].claim == CLAIM
    for kind in (E.TASK_COMPLETED, E.TASK_FAILED, E.TASK_RETRYING, E.TASK_SPAWNED):
        assert _check(running, kind) is None
    # Another process taking over a dead holder's attempt: a second TASK_STARTED, another worker.
    assert _check(running, E.TASK_STARTED, worker="w2", claim=outcomes.claim_of("n2")) is None


def test_an_outcome_needs_the_nonce_of_the_claim_its_start_named() -> None:
    sent = _state(ev(E.TASK_DISPATCHED, "a", 1, queue="cpu"))
    running = fold([ev(E.TASK_STARTED, "a", 1, worker="w1", claim=CLAIM)], sent)
    # The token alone (every worker can read it off the queue) and another nonce get nothing.
    assert "no nonce of the claim" in str(_check(running, E.TASK_COMPLETED, nonce=""))
    assert "no nonce of the claim" in str(_check(running, E.TASK_COMPLETED, nonce=outcomes.new_nonce()))
    assert "no nonce of the claim" in str(_check(running, E.TASK_COMPLETED, nonce=CLAIM))  # the hash
    # An attempt no process started has no outcome to take (its holder claims it first).
    assert "never started" in str(_check(sent, E.TASK_COMPLETED))
    # A start must name a well-formed claim.
    for bad in (None, "", "x" * 32, CLAIM[:-1], 7):
        assert "names no claim" in str(_check(sent, E.TASK_STARTED, worker="w1", claim=bad))
    # A start logged before claims existed names none: its token is all there is.
    legacy = fold([ev(E.TASK_STARTED, "a", 1, worker="w1")], sent)
    assert legacy.runs[RUN].tasks["a"].claim is None
    assert _check(legacy, E.TASK_COMPLETED, nonce="") is None


def test_an_attempt_cannot_be_claimed_away_from_a_live_holder() -> None:
    running = _state(
        ev(E.TASK_DISPATCHED, "a", 1, queue="cpu"), ev(E.TASK_STARTED, "a", 1, worker="w1", claim=CLAIM)
    )
    mine = outcomes.claim_of("the thief's nonce")
    asked: list[str] = []

    def alive(worker: str) -> bool:
        asked.append(worker)
        return worker == "w1"

    why = _check(running, E.TASK_STARTED, worker="evil", claim=mine, alive=alive)
    assert "running on w1, which is alive" in str(why) and asked == ["w1"]
    # Once w1's heartbeat is gone the takeover is taken, and the claim is the new holder's.
    assert _check(running, E.TASK_STARTED, worker="w2", claim=mine, alive=lambda w: False) is None
    taken = fold([ev(E.TASK_STARTED, "a", 1, worker="w2", claim=mine)], running)
    assert taken.runs[RUN].tasks["a"].claim == mine
    assert "no nonce of the claim" in str(_check(taken, E.TASK_COMPLETED))  # w1's nonce: no longer
    assert _check(taken, E.TASK_COMPLETED, nonce="the thief's nonce") is None
    # A start naming the holder itself is a copy (dropped without a warning), whatever its claim.
    assert _check(running, E.TASK_STARTED, worker="w1", claim=mine, alive=alive) == "duplicate"


def test_forgeries_and_copies_are_refused_with_a_reason() -> None:
    sent = _state(
        ev(E.TASK_DISPATCHED, "a", 1, queue="cpu"), ev(E.TASK_STARTED, "a", 1, worker="w1", claim=CLAIM)
    )
    assert "no valid claim token" in str(_check(sent, E.TASK_COMPLETED, token=""))
    assert "no valid claim token" in str(_check(sent, E.TASK_COMPLETED, token=TOKENS.mint(RUN, "b", 1)))
    assert "never dispatched" in str(_check(sent, E.TASK_STARTED, "b"))  # b is not even ready
    assert "never dispatched" in str(_check(sent, E.TASK_COMPLETED, "a", 2))
    assert "no task 'zz'" in str(_check(sent, E.TASK_COMPLETED, "zz"))
    other = outcomes.check(sent, ev(E.TASK_COMPLETED, "a", 1, run_id="nope"), "x", TOKENS)
    assert "not one the scheduler runs" in str(other)
    assert _check(sent, E.TASK_STARTED, worker="w1") == "duplicate"  # a resent claim: no warning
    done = fold([ev(E.TASK_COMPLETED, "a", 1, result=1)], sent)
    assert "has its outcome already" in str(_check(done, E.TASK_COMPLETED))
    assert "is over" in str(_check(done, E.TASK_STARTED, worker="w9"))
    retried = fold([ev(E.TASK_RETRYING, "a", 1)], sent)
    assert "is over" in str(_check(retried, E.TASK_COMPLETED, "a", 1))


def test_credentials_split_into_token_and_nonce() -> None:
    assert outcomes.split_credential(outcomes.credential("t0k", "n0n")) == ("t0k", "n0n")
    assert outcomes.split_credential(outcomes.credential("t0k", "")) == ("t0k", "")
    assert outcomes.is_claim(CLAIM) and len(NONCE) == 2 * outcomes.NONCE_BYTES


def test_the_transcriber_folds_only_what_it_queues_and_records_its_position() -> None:
    state = _state(*completes("a", 1)[:1])  # a dispatched
    rows = [
        (
            "1-0",
            {
                "e": ev(E.TASK_STARTED, "a", 1, worker="w1", claim=CLAIM).to_json(),
                "t": TOKENS.mint(RUN, "a", 1),
            },
        ),
        ("2-0", {"e": ev(E.TASK_COMPLETED, "a", 1, result=5).to_json(), "t": "forged"}),
        ("3-0", {"e": ev(E.WORKFLOW_COMPLETED).to_json()}),
        ("4-0", {"e": ev(E.WORKFLOW_CANCEL_REQUESTED, reason="x").to_json()}),
        ("5-0", {"e": ev(E.TASK_COMPLETED, "a", 1, result=6).to_json()}),  # no token at all
    ]
    batch: Batch = _decode(rows)
    assert set(batch.sealed) == {"1-0", "2-0"}
    tr = Transcriber()
    tr.begin(TOKENS, "0-0")
    admitted = []
    for eid, event in batch:
        if tr.admit(eid, event, batch, state):
            admitted.append(eid)
            state = fold([event], state)
    tr.read_upto(batch.upto)
    # The worker's valid start only: a cancel on the feed is a forgery (clients ask through the intake).
    assert admitted == ["1-0"]
    # The one other type the feed carries: the scheduler's own rerun of a child run (taken back from
    # the run's log, never folded from the feed).
    rerun = ev(E.WORKFLOW_RERUN_REQUESTED, n=1)
    assert tr.admit("6-0", rerun, batch, state)
    transcripts, position = tr.take()
    assert position == "5-0" and [(r, f) for r, f, _ in transcripts] == [(RUN, "")]
    assert transcripts[0][2] == rows[0][1]["e"], "the stored JSON itself is logged"
    tr.wrote(position)
    assert tr.take() == ([], "") and not tr.pending


def test_a_hand_off_claims_the_job_with_the_claim_its_waiter_named() -> None:
    state = _state()
    queue = state.runs[RUN].defs["b"].queue
    job = _job(task_id="b")
    matcher = HandoffMatcher(True)
    # A waiter that names no claim for the job it waits for is handed nothing (Celery sends it).
    matcher.observe(ev(E.TASK_COMPLETED, "a", 1, result=1, handoff="w1"))
    assert matcher.match([(job, queue)], state, "scheduler:1", 1.0) == ([(job, queue)], [])
    matcher.observe(ev(E.TASK_COMPLETED, "a", 1, result=1, handoff="w1", handoff_claim=CLAIM, via="m1"))
    rest, handoffs = matcher.match([(job, queue)], state, "scheduler:1", 1.0)
    assert rest == [] and len(handoffs) == 1
    started = handoffs[0][0]
    assert started.type is E.TASK_STARTED and started.data == {
        "worker": "w1",
        "handoff": True,
        "claim": CLAIM,
        "via": "m1",
    }
    # Folded, the handed attempt takes only its waiter's nonce.
    dispatched = fold([ev(E.TASK_DISPATCHED, "b", 1, queue=queue)], fold(completes("a", 1), state))
    handed = fold([started], dispatched)
    assert _check(handed, E.TASK_COMPLETED, "b") is None
    assert "no nonce of the claim" in str(_check(handed, E.TASK_COMPLETED, "b", nonce=outcomes.new_nonce()))


def test_a_handed_jobs_claim_travels_signed_and_must_be_a_claim() -> None:
    wire = _job(claim=CLAIM).to_wire(SIGNER, "t0k")
    assert Job.from_wire(wire, SIGNER).claim == CLAIM
    assert Job.from_wire(_job().to_wire(SIGNER, "t0k"), SIGNER).claim == ""
    for bad in ("nope", 7, CLAIM.upper()):
        body = {**_job().to_dict(), "c": bad}
        with pytest.raises(MalformedJobError, match="claim is not one"):
            Job.from_wire(SIGNER.seal(json.dumps(body)), SIGNER)
