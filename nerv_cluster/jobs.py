"""The job message: what the scheduler sends a worker for one attempt of one task (JSON only)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from nerv_cluster import ids, mapping
from nerv_cluster.errors import MalformedJobError, NervError
from nerv_cluster.model import RetryPolicy
from nerv_cluster.outcomes import is_claim
from nerv_cluster.signing import Signer
from nerv_cluster.state import RunState
from nerv_cluster.workflow import resolve_refs


def job_id(run_id: str, task_id: str, attempt: int) -> str:
    """The deterministic Celery task id of one attempt: resending it never makes a second job id."""
    return f"{run_id}:{task_id}:{attempt}"


@dataclass(frozen=True, slots=True)
class Job:
    """One attempt to run, as a worker receives it. Upstream results are already in the arguments."""

    run_id: str
    task_id: str
    attempt: int
    fn: str
    args: list[Any]
    kwargs: dict[str, Any]
    workflow: str = ""
    context: dict[str, Any] | None = None
    retry: RetryPolicy | None = None
    timeout: float | None = None
    #: The scheduler expects this job's success to make a dependent on the same queue ready: after
    #: running it (alone in its message) the worker waits briefly for that dependent to be handed to it
    #: directly (see ``constants.HANDOFF_WAIT_S``).
    handoff: bool = False
    #: The first attempt of the task's current round (after a rerun), from which its retry policy
    #: counts (see ``failures.failure_outcome``).
    first: int = 1
    #: The run tree the job belongs to (for a child run, its root run; "" for a run with no parent):
    #: the scheduler may pack jobs of one tree into one message (``scheduler.dispatch.pack``). Only the
    #: scheduler uses it; it does not travel.
    family: str = field(default="", compare=False)
    #: The attempt's claim token (``nerv_cluster.outcomes``): minted by the scheduler as it sends the
    #: job, presented with every event the worker writes about the attempt.
    token: str = field(default="", compare=False)
    #: A handed job's claim (``nerv_cluster.handoff``): the one its waiting worker's outcome named, by
    #: which that process finds the nonce it keeps for it ('' for a job sent through Celery).
    claim: str = field(default="", compare=False)

    @property
    def id(self) -> str:
        """The Celery task id."""
        return job_id(self.run_id, self.task_id, self.attempt)

    def to_dict(self) -> dict[str, Any]:
        """The JSON body, with short keys."""
        out: dict[str, Any] = {"r": self.run_id, "k": self.task_id, "a": self.attempt, "fn": self.fn}
        if self.args:
            out["args"] = self.args
        if self.kwargs:
            out["kwargs"] = self.kwargs
        if self.workflow:
            out["w"] = self.workflow
        if self.context is not None:
            out["ctx"] = self.context
        if self.retry is not None:
            out["retry"] = self.retry.to_dict()
        if self.timeout is not None:
            out["t"] = self.timeout
        if self.handoff:
            out["h"] = 1
        if self.first != 1:
            out["f"] = self.first
        if self.token:
            out["tok"] = self.token
        if self.claim:
            out["c"] = self.claim
        return out

    def to_wire(self, signer: Signer, token: str) -> str:
        """The signed message of this job carrying ``token`` (``nerv_cluster.signing``): the JSON is
        made and signed once."""
        body = self.to_dict()
        body["tok"] = token
        return signer.seal(json.dumps(body, separators=(",", ":")))

    @classmethod
    def from_wire(cls, wire: object, signer: Signer) -> Job:
        """The job of a signed message; :class:`~nerv_cluster.errors.JobSignatureError` when it is not
        signed by ``signer``'s key or was altered, :class:`~nerv_cluster.errors.MalformedJobError` (or
        ValueError for text that is no JSON) on a signed body that is no job (:func:`parse_job`)."""
        return parse_job(json.loads(signer.open(wire)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        """Inverse of :meth:`to_dict`; KeyError/TypeError on a malformed body."""
        retry = data.get("retry")
        return cls(
            run_id=str(data["r"]),
            task_id=str(data["k"]),
            attempt=int(data["a"]),
            fn=str(data["fn"]),
            args=list(data.get("args", [])),
            kwargs=dict(data.get("kwargs", {})),
            workflow=str(data.get("w", "")),
            context=data.get("ctx"),
            retry=RetryPolicy.from_dict(retry) if retry else None,
            timeout=data.get("t"),
            handoff=bool(data.get("h")),
            first=int(data.get("f", 1)),
            token=str(data.get("tok", "")),
            claim=str(data.get("c", "")),
        )


#: Longest task id a job may name (a map element's id is its map's id and an index, nested maps more).
MAX_JOB_TASK_ID = 1024


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MalformedJobError(f"the job's {what} is not a positive integer: {value!r:.80}")
    return value


def parse_job(data: Any) -> Job:
    """:meth:`Job.from_dict` for untrusted input: every field checked for its type, so the job it
    returns can be claimed, run and recorded; :class:`MalformedJobError` (with what is wrong) for
    anything else. Used by the worker on every Celery message and hand-off entry."""
    if not isinstance(data, dict):
        raise MalformedJobError(f"a job is a JSON object, got {data!r:.80}")
    run_id, task_id, fn = data.get("r"), data.get("k"), data.get("fn")
    if not ids.is_valid_id(run_id):
        raise MalformedJobError(f"the job names no valid run id: {run_id!r:.80}")
    if not isinstance(task_id, str) or not task_id or len(task_id) > MAX_JOB_TASK_ID:
        raise MalformedJobError(f"the job names no valid task id: {task_id!r:.80}")
    if not isinstance(fn, str) or not fn:
        raise MalformedJobError(f"the job names no task function: {fn!r:.80}")
    attempt, first = _int(data.get("a"), "attempt"), _int(data.get("f", 1), "first attempt")
    args, kwargs = data.get("args", []), data.get("kwargs", {})
    if not isinstance(args, list):
        raise MalformedJobError(f"the job's args are not a list: {args!r:.80}")
    if not isinstance(kwargs, dict):
        raise MalformedJobError(f"the job's kwargs are not an object: {kwargs!r:.80}")
    workflow, ctx, timeout = data.get("w", ""), data.get("ctx"), data.get("t")
    if not isinstance(workflow, str):
        raise MalformedJobError(f"the job's workflow name is not a string: {workflow!r:.80}")
    if ctx is not None and not isinstance(ctx, dict):
        raise MalformedJobError(f"the job's context is not an object: {ctx!r:.80}")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < math.inf
    ):
        raise MalformedJobError(f"the job's timeout is not a positive number: {timeout!r:.80}")
    retry, token = data.get("retry"), data.get("tok", "")
    if not isinstance(token, str):
        raise MalformedJobError(f"the job's claim token is not a string: {token!r:.80}")
    claim = data.get("c", "")
    if claim != "" and not is_claim(claim):
        raise MalformedJobError(f"the job's claim is not one: {claim!r:.80}")
    try:
        policy = RetryPolicy.from_dict(retry) if retry else None
    except (NervError, TypeError, ValueError, AttributeError) as exc:
        raise MalformedJobError(f"the job's retry policy is malformed: {exc!s:.120}") from None
    return Job(
        run_id=run_id,  # type: ignore[arg-type]  # is_valid_id checked it is a str
        task_id=task_id,
        attempt=attempt,
        fn=fn,
        args=args,
        kwargs=kwargs,
        workflow=workflow,
        context=ctx,
        retry=policy,
        timeout=timeout,
        handoff=bool(data.get("h")),
        first=first,
        token=token,
        claim=claim,
    )


def build_job(run: RunState, task_id: str, handoff: bool = False) -> Job:
    """The job for the current attempt of ``task_id``, its references replaced by upstream results."""
    td = run.defs[task_id]
    ts = run.tasks[task_id]
    tasks = run.tasks
    if run.growth.layers:  # a map's result is its elements' results
        upstream = {d: mapping.result_of(run, d) for d in td.dependencies}
    else:
        upstream = {d: tasks[d].result for d in td.dependencies}
    return Job(
        run_id=run.run_id,
        task_id=task_id,
        attempt=ts.attempt,
        fn=td.fn,
        args=resolve_refs(list(td.args), upstream) if td.args else [],
        kwargs=resolve_refs(dict(td.kwargs), upstream) if td.kwargs else {},
        workflow=run.name,
        context=upstream if td.context else None,
        retry=td.retry,
        timeout=td.timeout,
        handoff=handoff,
        first=ts.first,
        family=run.definition.root,
    )
