"""The job message: what the scheduler sends a worker for one attempt of one task (JSON only)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from nerv_cluster import mapping
from nerv_cluster.model import RetryPolicy
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
        signed by ``signer``'s key or was altered, KeyError/TypeError/ValueError on a malformed body."""
        data = json.loads(signer.open(wire))
        if not isinstance(data, dict):
            raise TypeError("a job body is a JSON object")
        return cls.from_dict(data)

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
