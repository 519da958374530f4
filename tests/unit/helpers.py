"""Builders for hand-made definitions and events, and a pure in-memory scheduler simulation."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable
from typing import Any

from nerv_cluster.jobs import Job
from nerv_cluster.model import Event, EventType, TaskDef, TaskPriority, TaskStatus, TriggerRule, WorkflowDef
from nerv_cluster.state import EMPTY, RunState, State, apply, rule_outcome
from scheduler.decisions import Decisions, decide

RUN = "run-1"
FN = "tests.noop"

_clock = itertools.count(1)


def tick() -> float:
    """A strictly increasing timestamp, so event order and timestamps agree."""
    return float(next(_clock))


def td(
    tid: str,
    *deps: str,
    trigger: TriggerRule | str = TriggerRule.ALL_SUCCESS,
    priority: TaskPriority = TaskPriority.MEDIUM,
    **kw: Any,
) -> TaskDef:
    """A task definition with ``name == id``."""
    return TaskDef(
        id=tid,
        fn=kw.pop("fn", FN),
        name=tid,
        dependencies=tuple(deps),
        trigger=TriggerRule.parse(trigger),
        priority=priority,
        **kw,
    )


def wdef(*tasks: TaskDef, name: str = "wf") -> WorkflowDef:
    return WorkflowDef(name=name, tasks=tuple(tasks))


def diamond(**d_kw: Any) -> WorkflowDef:
    """a -> (b, c) -> d."""
    return wdef(td("a"), td("b", "a"), td("c", "a"), td("d", "b", "c", **d_kw), name="diamond")


def ev(
    kind: EventType,
    task: str | None = None,
    attempt: int | None = None,
    run_id: str = RUN,
    ts: float | None = None,
    **data: Any,
) -> Event:
    return Event(kind, run_id, task, attempt, data, ts=tick() if ts is None else ts)


def submitted(definition: WorkflowDef, run_id: str = RUN) -> Event:
    return ev(EventType.WORKFLOW_SUBMITTED, run_id=run_id, workflow=definition.to_dict())


def completes(tid: str, result: Any = None, attempt: int = 1, worker: str = "w1") -> list[Event]:
    """DISPATCHED, STARTED, COMPLETED of one attempt."""
    return [
        ev(EventType.TASK_DISPATCHED, tid, attempt, queue="cpu"),
        ev(EventType.TASK_STARTED, tid, attempt, worker=worker),
        ev(EventType.TASK_COMPLETED, tid, attempt, result=result, worker=worker),
    ]


def fails(tid: str, message: str = "boom", attempt: int = 1, worker: str = "w1") -> list[Event]:
    """DISPATCHED, STARTED, FAILED of one attempt."""
    error = {"type": "ValueError", "message": message, "types": ["ValueError", "Exception"]}
    return [
        ev(EventType.TASK_DISPATCHED, tid, attempt, queue="cpu"),
        ev(EventType.TASK_STARTED, tid, attempt, worker=worker),
        ev(EventType.TASK_FAILED, tid, attempt, error=error, worker=worker),
    ]


def run_of(state: State, run_id: str = RUN) -> RunState:
    return state.runs[run_id]


# --------------------------------------------------------------------------------------------------
# a random DAG and a simulated cluster


def random_dag(
    n: int, rng: random.Random, max_deps: int = 3, window: int = 50, triggers: bool = False
) -> WorkflowDef:
    """``n`` tasks; task ``i`` takes the results of up to ``max_deps`` earlier tasks and its own index.

    Arguments are wire-form: a dependency appears as a reference marker, as ``Workflow.add`` writes it.
    With ``triggers``, about a third of the tasks get a trigger rule other than ``all_success``.
    """
    tasks = []
    rules = list(TriggerRule)
    for i in range(n):
        k = rng.randint(0, min(max_deps, i))
        deps = sorted(rng.sample(range(max(0, i - window), i), k)) if k else []
        ids = [f"t{d}" for d in deps]
        args = [{"__nerv_ref__": d} for d in ids] + [i]
        trigger = rng.choice(rules) if triggers and rng.random() < 0.35 else TriggerRule.ALL_SUCCESS
        tasks.append(
            TaskDef(
                id=f"t{i}",
                fn="sim.mix",
                name=f"t{i}",
                dependencies=tuple(ids),
                args=tuple(args),
                priority=TaskPriority(rng.randint(0, 3)),
                trigger=trigger,
            )
        )
    return WorkflowDef(name="random", tasks=tuple(tasks))


def mix(args: Iterable[Any]) -> int:
    """What the simulated task ``sim.mix`` computes from its (already resolved) arguments (a list
    argument, a map's result, is mixed in as the mix of its items)."""
    acc = 7
    for a in args:
        if isinstance(a, list):
            a = mix(a)
        acc = (acc * 31 + (a or 0)) % 1_000_003
    return acc


def compute(job: Job) -> Any:
    """What a simulated job returns: ``sim.range`` tasks ``list(range(first argument))``, a list for a
    map to map over (map tests); every other task :func:`mix` of its arguments."""
    if job.fn == "sim.range":
        return list(range(job.args[0]))
    return mix(job.args)


def expected_results(definition: WorkflowDef) -> dict[str, int]:
    """Every task's result when all succeed, computed straight from the definition (topological order)."""
    out: dict[str, int] = {}
    for t in definition.tasks:
        out[t.id] = mix(out[a["__nerv_ref__"]] if isinstance(a, dict) else a for a in t.args)
    return out


def _error(message: str) -> dict[str, Any]:
    return {"type": "ValueError", "message": message, "types": ["ValueError", "Exception"]}


class Sim:
    """The scheduler loop in pure code: decide -> fold the decisions -> workers run some jobs -> ...

    Workers misbehave on request: ``fail_first`` tasks fail their first attempt and are retried after
    ``retry_delay``; ``fail_always`` tasks fail for good; ``lose_first`` tasks lose their worker during
    the first attempt (TASK_PENDING, re-dispatched); ``takeover`` tasks are started by a second worker
    after the first one (the same attempt taken over).
    """

    def __init__(
        self,
        definition: WorkflowDef,
        rng: random.Random,
        *,
        fail_first: Iterable[str] = (),
        fail_always: Iterable[str] = (),
        lose_first: Iterable[str] = (),
        takeover: Iterable[str] = (),
        retry_delay: float = 0.0,
        run_id: str = RUN,
    ) -> None:
        self.rng = rng
        self.run_id = run_id
        self.now = 1_000.0
        self.state = EMPTY
        self.log: list[Event] = []
        self.inbox: list[Job] = []
        self.fail_first = set(fail_first)
        self.fail_always = set(fail_always)
        self.lose_first = set(lose_first)
        self.takeover = set(takeover)
        self.retry_delay = retry_delay
        self.runs: list[tuple[str, int]] = []  # (task, attempt) in execution order
        self.jobs: list[Job] = []  # every job sent, in order
        self.violations: list[str] = []
        sub = Event(EventType.WORKFLOW_SUBMITTED, run_id, data={"workflow": definition.to_dict()}, ts=1e3)
        self.emit([sub])

    @property
    def run(self) -> RunState:
        return self.state.runs[self.run_id]

    def emit(self, events: Iterable[Event]) -> None:
        for e in events:
            self.log.append(e)
            self.state = apply(self.state, e)

    def event(self, kind: EventType, job: Job, **data: Any) -> None:
        self.now += 0.001
        self.emit([Event(kind, self.run_id, job.task_id, job.attempt, data, ts=self.now, source="worker")])

    def schedule(self) -> Decisions:
        out = Decisions()
        decide(self.run, self.now, "scheduler:1", out)
        self.emit(out.events)
        sent = [job for job, _queue in out.jobs]
        self.inbox.extend(sent)
        self.jobs.extend(sent)
        return out

    def _check_may_run(self, job: Job) -> None:
        run = self.run
        td = run.defs[job.task_id]
        statuses = [run.tasks[d].status for d in td.dependencies]
        ok = sum(s is TaskStatus.COMPLETED for s in statuses)
        failed = sum(s is TaskStatus.FAILED for s in statuses)
        skipped = sum(s in (TaskStatus.SKIPPED, TaskStatus.CANCELLED) for s in statuses)
        if td.dependencies and rule_outcome(td.trigger, len(statuses), ok, failed, skipped) is not True:
            self.violations.append(f"{job.task_id} ({td.trigger.value}) ran with upstream {statuses}")

    def work(self, k: int) -> None:
        """Run ``k`` random jobs of the inbox to their end."""
        self.rng.shuffle(self.inbox)
        batch, self.inbox = self.inbox[:k], self.inbox[k:]
        for job in batch:
            self._check_may_run(job)
            self.runs.append((job.task_id, job.attempt))
            self.event(EventType.TASK_STARTED, job, worker="w1")
            first = job.attempt == 1
            if first and job.task_id in self.takeover:
                self.event(EventType.TASK_STARTED, job, worker="w9")
            if first and job.task_id in self.lose_first:
                self.event(EventType.TASK_PENDING, job, next_attempt=2, reason="worker lost")
            elif first and job.task_id in self.fail_first:
                due = self.now + self.retry_delay
                self.event(EventType.TASK_RETRYING, job, error=_error("flaky"), next_attempt=2, due_at=due)
            elif job.task_id in self.fail_always:
                self.event(EventType.TASK_FAILED, job, error=_error(f"{job.task_id} broke"))
            else:
                self.event(EventType.TASK_COMPLETED, job, result=compute(job), worker="w1")

    def run_to_end(self, max_rounds: int = 100_000) -> None:
        for _ in range(max_rounds):
            out = self.schedule()
            if self.run.status.terminal:
                return
            if self.inbox:
                self.work(self.rng.randint(1, len(self.inbox)))
            elif out.delayed:
                self.now = max(self.now, min(d[0] for d in out.delayed))
            elif not out.events:
                raise AssertionError(f"simulation stuck: {dict(self.run.counts)}")
        raise AssertionError("simulation did not finish")
